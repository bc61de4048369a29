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


def metric_summary(y, logits, threshold: float) -> dict:
    from . import metrics as M
    from .loop import sigmoid

    p = sigmoid(logits)
    y = np.asarray(y)
    out = {"n": int(len(y)), "n_melanoma": int(y.sum()), "threshold": float(threshold)}
    if 0 < y.sum() < len(y):
        # ranking metrics on logits (sigmoid can saturate into ties), threshold on probabilities
        out["roc_auc"] = M.roc_auc(y, logits)
        out["pauc_80"] = M.partial_auc_above_tpr(y, logits, 0.8)
    else:
        out["roc_auc"] = out["pauc_80"] = None
    out["sensitivity"], out["specificity"] = M.sensitivity_specificity(y, p, threshold)
    return out


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
        description="Score a labelled folder with a checkpoint and print its metrics. The LAST "
                    "line of output is one JSON object: roc_auc, pauc_80 (ISIC 2024 pAUC above "
                    "80%% sensitivity, range 0-0.2), sensitivity and specificity at the card's "
                    "threshold, n, n_melanoma.")
    p.add_argument("--checkpoint", required=True, help="model.pt (our format or a legacy state_dict)")
    p.add_argument("--data", required=True,
                   help="folder in the dermoscopy layout (labels.csv with image_id, melanoma, file) "
                        "or another supported layout (see --layout)")
    p.add_argument("--layout", default="auto", choices=["auto", "dermoscopy", "kaggle", "isic-cli"])
    p.add_argument("--threshold", type=float, default=None,
                   help="operating threshold on the probability (default: the card's)")
    p.add_argument("--no-tta", action="store_true", help="score without flip test-time augmentation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images (smoke tests)")
    p.add_argument("--predictions", default=None, help="also write per-image predictions to this CSV")
    p.add_argument("--roc", default=None, help="also write the ROC curve PNG here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from .datasets import read_layout
    from .loop import amp_dtype, predict
    from .network import load_checkpoint
    from .preprocessing import load_rgb

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_layout(args.data, args.layout)
    if args.limit:
        records = records[:args.limit]
    model, card = load_checkpoint(args.checkpoint)
    model = model.to(memory_format=torch.channels_last)
    size = int(card.get("input_size", 224))
    threshold = args.threshold if args.threshold is not None else float(card.get("threshold", 0.5))
    tta = bool(card.get("tta", True)) and not args.no_tta
    t0 = time.time()
    arrays = np.stack([load_rgb(r.path, size) for r in tqdm(records, desc=f"decode {size}px",
                                                             mininterval=5, file=sys.stderr)])
    adt = amp_dtype("auto", torch.device("cpu"))
    logits, _ = predict(model, arrays, args.batch_size, tta=tta, amp=adt, progress=True)
    y = np.array([r.target for r in records])
    out = metric_summary(y, logits, threshold)
    out.update({"checkpoint": args.checkpoint, "data": args.data, "input_size": size, "tta": tta,
                "seconds": round(time.time() - t0, 1)})
    if args.predictions:
        import csv
        from .loop import sigmoid

        with open(args.predictions, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "target", "logit", "prob"])
            for r, lo in zip(records, logits):
                w.writerow([r.image_id, r.target, f"{lo:.6f}", f"{sigmoid(lo):.6f}"])
    if args.roc and out["roc_auc"] is not None:
        plot_roc(args.roc, [("model", y, logits)], title=f"ROC on {args.data}")
    print(json.dumps(out), flush=True)
    return 0
