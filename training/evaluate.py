"""Evaluation: metrics of a checkpoint on a labelled folder, and the ROC curve picture.

``python -m training evaluate --checkpoint CKPT --data DIR`` decodes every image of DIR with the
worker's preprocessing at the card's input size, scores it (flip TTA as the card says, unless
``--no-tta``), and prints the metrics as ONE JSON line, last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def plot_roc(path: str, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str = "ROC") -> str:
    """Write a ROC picture (PNG). ``curves``: (label, y, p). matplotlib if installed, else Pillow."""
    from . import metrics as M

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        for label, y, p in curves:
            fpr, tpr, _ = M.roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{label} AUC {M.roc_auc(y, p):.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.axhline(0.8, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("sensitivity (TPR)")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    W, m = 500, 50
    img = Image.new("RGB", (W, W), "white")
    d = ImageDraw.Draw(img)
    side = W - 2 * m

    def xy(f, t):
        return m + f * side, W - m - t * side

    d.rectangle([m, m, W - m, W - m], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160))
    d.line([xy(0, 0.8), xy(1, 0.8)], fill=(200, 200, 200))
    for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        d.text((xy(v, 0)[0] - 8, W - m + 6), f"{v:.1f}", fill="black")
        d.text((8, xy(0, v)[1] - 6), f"{v:.1f}", fill="black")
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
              (140, 86, 75), (227, 119, 194)]
    for i, (label, y, p) in enumerate(curves):
        fpr, tpr, _ = M.roc_curve(y, p)
        c = colors[i % len(colors)]
        d.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=c, width=2)
        d.text((m + side * 0.45, W - m - 18 * (len(curves) - i) - 4),
               f"{label} AUC {M.roc_auc(y, p):.3f}", fill=c)
    d.text((W // 2 - 40, 12), title, fill="black")
    d.text((W // 2 - 60, W - 20), "1 - specificity (FPR)", fill="black")
    d.text((5, m - 20), "sensitivity (TPR)", fill="black")
    img.save(path)
    return path


def build_parser(prog: str = "python -m training evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score a labelled folder with a model version (a single checkpoint or an "
                    "ensemble bundle: every member and the combiner, through the inference "
                    "worker's code path) and print its metrics per source and pooled: ROC-AUC with "
                    "a bootstrap CI, pAUC above 80%% sensitivity (ISIC 2024, range 0-0.2), "
                    "sensitivity and specificity at the card's threshold, calibration (slope, "
                    "intercept, ECE). The LAST line of output is one JSON object with the pooled "
                    "roc_auc and a per_source entry.")
    p.add_argument("--checkpoint", required=True,
                   help="model.pt: ensemble bundle, our single format or a legacy state_dict")
    p.add_argument("--data", required=True,
                   help="folder in the dermoscopy layout (labels.csv with image_id, melanoma, file; "
                        "an optional source column splits the report) or another supported "
                        "layout (see --layout); several folders separated by commas")
    p.add_argument("--layout", default="auto", choices=["auto", "dermoscopy", "kaggle", "isic-cli"])
    p.add_argument("--threshold", type=float, default=None,
                   help="operating threshold on the probability (default: the card's)")
    p.add_argument("--no-tta", action="store_true", help="score without flip test-time augmentation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the CIs")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast only where it is faster than fp32 on this CPU and "
                        "stays within 0.01 of the fp32 probabilities (the worker's rule)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images (smoke tests)")
    p.add_argument("--predictions", default=None, help="also write per-image predictions to this CSV")
    p.add_argument("--roc", default=None, help="also write the ROC curves PNG here")
    return p


def report(y, p, threshold: float, sources, groups, n_boot: int) -> dict:
    """Pooled and per-source metric summaries (training.metrics.summary_with_ci)."""
    from . import metrics as M

    y, p, sources, groups = map(np.asarray, (y, p, sources, groups))
    out = M.summary_with_ci(y, p, threshold, groups, n_boot)
    out["per_source"] = {}
    for s in sorted(set(sources.tolist())):
        m = sources == s
        out["per_source"][s] = M.summary_with_ci(y[m], p[m], threshold, groups[m], n_boot)
    return out


def _fmt(v, nd=3):
    return "  n/a" if v is None else f"{v:.{nd}f}"


def print_table(out: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [("pooled", out)] + list(out["per_source"].items())
    print(f"{'source':<14}{'n':>6}{'mel':>6}  {'ROC-AUC (95% CI)':<22}{'pAUC80':>7}{'sens':>7}{'spec':>7}"
          f"{'slope':>7}{'icpt':>7}{'ECE':>7}{'mean p':>8}{'rate':>7}", file=file)
    for s, v in rows:
        ci = v.get("roc_auc_ci95")
        auc = f"{_fmt(v['roc_auc'])} ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else _fmt(v["roc_auc"])
        c = v["calibration"]
        print(f"{s:<14}{v['n']:>6}{v['n_melanoma']:>6}  {auc:<22}{_fmt(v['pauc_80']):>7}"
              f"{_fmt(v['sensitivity']):>7}{_fmt(v['specificity']):>7}{_fmt(c['slope'], 2):>7}"
              f"{_fmt(c['intercept'], 2):>7}{_fmt(c['ece']):>7}{_fmt(c['mean_predicted']):>8}"
              f"{_fmt(c['observed_rate']):>7}", file=file)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from .datasets import read_layout
    from .ensemble import load_bundle
    from .runtime import choose_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_layout(args.data, args.layout)
    if args.limit:
        records = records[:args.limit]
    bundle = load_bundle(args.checkpoint).to_channels_last()
    if args.no_tta:
        for m in bundle.members:
            m.card = dict(m.card, tta=False)
    threshold = args.threshold if args.threshold is not None else float(bundle.card.get("threshold", 0.5))
    t0 = time.time()
    decoded = [bundle.decode(r.path) for r in tqdm(records, desc="decode", mininterval=10, file=sys.stderr)]
    arrays = bundle.stack(decoded)
    del decoded
    precision = choose_precision(bundle, force=None if args.precision == "auto" else args.precision)
    out_b = bundle.predict_arrays(arrays, args.batch_size, progress=True)
    y = np.array([r.target for r in records])
    sources = [r.source or "data" for r in records]
    groups = [r.group for r in records]
    out = report(y, out_b.probabilities, threshold, sources, groups, args.bootstrap)
    print(f"model: {bundle.architecture}; threshold {threshold:.4f}; precision {precision}", flush=True)
    print_table(out)
    if bundle.is_ensemble:
        from . import metrics as M

        for j, m in enumerate(bundle.members):
            aucs = {"pooled": M.roc_auc(y, out_b.member_logits[:, j]) if 0 < y.sum() < len(y) else None}
            for s in sorted(set(sources)):
                mk = np.array(sources) == s
                aucs[s] = M.roc_auc(y[mk], out_b.member_logits[mk, j]) if 0 < y[mk].sum() < mk.sum() else None
            out.setdefault("members", {})[m.name] = {"roc_auc": aucs}
            print(f"member {m.name}: ROC-AUC " + ", ".join(f"{k} {_fmt(v)}" for k, v in aucs.items()))
    out.update({"checkpoint": args.checkpoint, "data": args.data, "architecture": bundle.architecture,
                "input_sizes": bundle.input_sizes, "tta": any(m.tta for m in bundle.members),
                "precision": precision, "seconds": round(time.time() - t0, 1)})
    if args.predictions:
        import csv

        with open(args.predictions, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "source", "target", "logit", "prob",
                        *[f"logit_{m.name}" for m in bundle.members]])
            for k, r in enumerate(records):
                w.writerow([r.image_id, r.source, r.target, f"{out_b.logits[k]:.6f}",
                            f"{out_b.probabilities[k]:.6f}",
                            *[f"{v:.6f}" for v in out_b.member_logits[k]]])
    if args.roc and out["roc_auc"] is not None:
        src = np.array(sources)
        curves = [("pooled", y, out_b.probabilities)] + [
            (s, y[src == s], out_b.probabilities[src == s]) for s in sorted(set(sources))
            if 0 < y[src == s].sum() < (src == s).sum()]
        plot_roc(args.roc, curves, title=f"ROC on {args.data}")
    print(json.dumps(out), flush=True)
    return 0
