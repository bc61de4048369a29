"""Export a finished run: pooled out-of-fold evaluation, model card, checkpoint and OOF files.

Writes into ``out_dir``:

* ``model.pt`` -- our checkpoint format (fp16 by default) of ONE fold's best checkpoint (the fold
  with the highest best validation AUC unless ``ship_fold`` is given), card embedded;
* ``card.json`` -- the model card (same dict as inside model.pt);
* ``oof_predictions.csv`` -- one row per image, columns ``OOF_COLUMNS``;
* ``oof_embeddings.npy`` -- float16 (N, 2048); row i belongs to row i of oof_predictions.csv
  (its ``embedding_row`` column says so explicitly);
* ``folds.csv`` -- image_id, group, target, fold;
* ``roc.png`` -- OOF ROC curves (pooled and per fold).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import shutil
import subprocess

import numpy as np

from . import metrics as M
from .datasets import Record, summary as data_summary

OOF_COLUMNS = ["embedding_row", "image_id", "group", "patient_id", "lesion_id", "fold", "target",
               "logit", "prob", "age_approx", "sex", "anatom_site"]
DISCLAIMER = "Not validated for clinical use."


def code_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def collect_oof(run_dir: str, n: int, n_folds: int):
    logits = np.full(n, np.nan, dtype=np.float64)
    embs = np.zeros((n, 2048), dtype=np.float16)
    fold_of = np.full(n, -1, dtype=np.int64)
    done = []
    for k in range(n_folds):
        fdir = os.path.join(run_dir, f"fold{k}")
        path = os.path.join(fdir, "oof.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: fold {k} has not finished; run train again "
                                    f"(it resumes) before exporting")
        z = np.load(path)
        idx = z["index"]
        logits[idx] = z["logits"]
        embs[idx] = z["embeddings"]
        fold_of[idx] = k
        with open(os.path.join(fdir, "done.json")) as f:
            done.append(json.load(f))
    if np.isnan(logits).any():
        raise ValueError(f"{int(np.isnan(logits).sum())} images have no out-of-fold prediction")
    return logits, embs, fold_of, done


def _ci(fn, y, s, groups, n_boot, seed):
    est, lo, hi = M.bootstrap_ci(fn, y, s, n=n_boot, seed=seed, groups=groups)
    return est, [lo, hi]


def finalize(run_dir: str, out_dir: str, records: list[Record], *, ship_fold: int | None = None,
             fp16: bool = True, threshold_method: str = "sens>=0.9", n_boot: int = 1000,
             intended_use: str | None = None, extra_card: dict | None = None) -> dict:
    from .loop import sigmoid
    from .network import load_checkpoint, save_checkpoint

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    n_folds = cfg["folds"]
    y = np.array([r.target for r in records], dtype=np.int64)
    groups = np.array([r.group for r in records])
    logits, embs, fold_of, done = collect_oof(run_dir, len(records), n_folds)
    prob = sigmoid(logits)

    threshold = float(sigmoid(M.choose_threshold(y, logits, threshold_method)))
    def sens(yy, ss):
        return M.sensitivity_specificity(yy, sigmoid(ss), threshold)[0]

    def spec(yy, ss):
        return M.sensitivity_specificity(yy, sigmoid(ss), threshold)[1]

    boot = {}
    for name, fn, seed in (("roc_auc", M.roc_auc, 1), ("pauc_80", M.partial_auc_above_tpr, 2),
                           ("sensitivity", sens, 3), ("specificity", spec, 4)):
        boot[name] = _ci(fn, y, logits, groups, n_boot, seed)
    per_fold = []
    for k in range(n_folds):
        m = fold_of == k
        per_fold.append({"fold": k, "n": int(m.sum()), "n_melanoma": int(y[m].sum()),
                         "roc_auc": M.roc_auc(y[m], logits[m]),
                         "pauc_80": M.partial_auc_above_tpr(y[m], logits[m]),
                         "best_epoch": done[k]["best_epoch"], "epochs_run": done[k]["epochs_run"],
                         "epochs_scheduled": done[k].get("epochs_scheduled", cfg["epochs"]),
                         "stopped_by": done[k]["stopped_by"],
                         "best_val_auc_no_tta": done[k]["best_val_auc"]})
    if ship_fold is None:
        ship_fold = int(max(done, key=lambda d: d["best_val_auc"])["fold"])
        ship_reason = (f"fold {ship_fold}: the highest best-epoch validation AUC (no TTA) among the "
                       f"{n_folds} folds; its own validation fold is fold {ship_fold}")
    else:
        ship_reason = f"fold {ship_fold}, chosen by the user"
    sf = fold_of == ship_fold
    s_sens, s_spec = M.sensitivity_specificity(y[sf], prob[sf], threshold)

    metrics = {
        "evaluation": (f"pooled out-of-fold predictions over all {n_folds} folds (each image scored "
                       f"by the model that did not train on it; best epoch per fold by validation "
                       f"AUC; flip TTA={cfg.get('tta', True)})"),
        "n": int(len(y)), "n_melanoma": int(y.sum()),
        "roc_auc": boot["roc_auc"][0], "roc_auc_ci95": boot["roc_auc"][1],
        "pauc_80": boot["pauc_80"][0], "pauc_80_ci95": boot["pauc_80"][1],
        "pauc_80_definition": "ISIC 2024: area under ROC above TPR 0.8, range 0-0.2 (random 0.02)",
        "sensitivity": boot["sensitivity"][0], "sensitivity_ci95": boot["sensitivity"][1],
        "specificity": boot["specificity"][0], "specificity_ci95": boot["specificity"][1],
        "ci_method": (f"percentile bootstrap, {n_boot} resamples of whole groups "
                      f"(lesion where known, else image); threshold held fixed"),
        "per_fold": per_fold,
        "shipped_fold_on_its_validation": {"fold": ship_fold, "n": int(sf.sum()),
                                           "roc_auc": M.roc_auc(y[sf], logits[sf]),
                                           "sensitivity": s_sens, "specificity": s_spec},
    }
    from .loop import _card_base, TrainConfig

    base = _card_base(TrainConfig(**{k: v for k, v in cfg.items()
                                     if k in TrainConfig.__dataclass_fields__}))
    card = dict(base)
    card.update({
        "name": os.path.basename(os.path.normpath(out_dir)),
        "format": "melanoma-records/1",
        "output": "one logit per image; probability of melanoma = sigmoid(logit)",
        "tta": bool(cfg.get("tta", True)),
        "tta_description": ("mean logit over identity, horizontal, vertical and both flips"
                            if cfg.get("tta", True) else "none: one forward pass per image"),
        "threshold": threshold,
        "threshold_method": (f"{threshold_method} on the pooled out-of-fold predictions: the highest "
                             f"probability threshold whose OOF sensitivity is >= 0.9"
                             if threshold_method.startswith("sens>=") else
                             f"{threshold_method} (max sensitivity + specificity - 1) on the pooled "
                             f"out-of-fold predictions"),
        "metrics": metrics,
        "training_data": dict(data_summary(records), source=cfg.get("data", ""),
                              layout=cfg.get("layout", "auto"),
                              grouping="patient id, else lesion id, else the image alone"),
        "folds": {"n_folds": n_folds, "method": "StratifiedGroupKFold(shuffle=True)",
                  "seed": cfg.get("seed"), "file": "folds.csv"},
        "shipped_checkpoint": ship_reason,
        "training": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "min_lr_ratio", "weight_decay",
                                          "warmup_epochs", "patience", "dropout", "imbalance", "amp",
                                          "aug_strength", "seed", "time_budget_s", "threads") if k in cfg},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "intended_use": intended_use or (
            "Research and software demonstration: ranks dermoscopic images by melanoma likelihood "
            "for the Melanoma Records app. Not a diagnosis; a clinician decides."),
        "validated": False,
        "disclaimer": DISCLAIMER,
        "limitations": ("Trained on public ISIC research images; performance on other cameras, "
                        "populations and clinics is unknown: run `python -m training evaluate` on "
                        "your own labelled data first. " + DISCLAIMER),
    })
    if extra_card:
        card.update(extra_card)

    os.makedirs(out_dir, exist_ok=True)
    model, _ = load_checkpoint(os.path.join(run_dir, f"fold{ship_fold}", "best.pt"))
    save_checkpoint(os.path.join(out_dir, "model.pt"), model, card, fp16=fp16)
    with open(os.path.join(out_dir, "card.json"), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "oof_predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OOF_COLUMNS)
        for i, r in enumerate(records):
            w.writerow([i, r.image_id, r.group, r.patient_id, r.lesion_id, int(fold_of[i]), r.target,
                        f"{logits[i]:.6f}", f"{prob[i]:.6f}",
                        "" if r.age is None else f"{r.age:g}", r.sex, r.site])
    np.save(os.path.join(out_dir, "oof_embeddings.npy"), embs.astype(np.float16))
    shutil.copyfile(os.path.join(run_dir, "folds.csv"), os.path.join(out_dir, "folds.csv"))
    from .evaluate import plot_roc

    curves = [("OOF pooled", y, logits)] + [(f"fold {k}", y[fold_of == k], logits[fold_of == k])
                                            for k in range(n_folds)]
    plot_roc(os.path.join(out_dir, "roc.png"), curves, title="Out-of-fold ROC")
    return card
