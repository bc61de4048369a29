"""A context pool in ONE embedding space: ``python -m training embed``.

The "ugly duckling" distance compares embeddings of one patient's images with each other, so they
must all come from the same network. The out-of-fold embeddings that ``train`` exports come from
one network per fold (each image is embedded by the fold model that did not train on it): fine for
real patients (patient-grouped folds keep a patient's images in one fold, so in one network), but
a *simulated* patient mixes images of every fold, and a cosine distance between embeddings of two
different networks means nothing.

This command builds a pool for the context model from the checkpoint the app actually ships (the
embedding space the worker computes): it scores the images of that checkpoint's own validation
fold (images it never trained on, so probabilities and embeddings are out-of-sample) with the
worker's preprocessing and flip TTA, and writes them in the OOF format with an
``embedding_model`` column (the checkpoint's SHA-256), plus each image's model-independent colour
descriptor (``training.simulate.colour_descriptor``) for the resemblance simulation.
``python -m training context`` takes the result as ``--oof``/``--embeddings``/``--descriptors``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np


def build_parser(prog: str = "python -m training embed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score one fold's held-out images with a checkpoint and write them as an OOF "
                    "pool (CSV + embeddings .npy) in that checkpoint's embedding space, for "
                    "`python -m training context`.")
    p.add_argument("--checkpoint", required=True, help="model.pt (the one the app installs)")
    p.add_argument("--oof", required=True, help="oof_predictions.csv exported by `train` (gives "
                                                "each image's fold, lesion and metadata)")
    p.add_argument("--data", required=True, help="the labelled image folder the model was trained on")
    p.add_argument("--layout", default="auto", choices=["auto", "dermoscopy", "kaggle", "isic-cli"])
    p.add_argument("--fold", type=int, default=None,
                   help="validation fold of the checkpoint (default: the card's shipped fold)")
    p.add_argument("--out", required=True, help="folder for context_pool.csv, context_pool_embeddings.npy, context_pool_colour.npy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N pool images (smoke tests)")
    return p


def shipped_fold(card: dict) -> int | None:
    fold = (card.get("metrics") or {}).get("shipped_fold_on_its_validation", {}).get("fold")
    return int(fold) if fold is not None else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .datasets import read_layout
    from .hashing import file_sha256
    from .loop import amp_dtype, predict, sigmoid
    from .network import load_checkpoint
    from .preprocessing import load_rgb
    from .simulate import colour_descriptor

    if args.threads:
        torch.set_num_threads(args.threads)
    model, card = load_checkpoint(args.checkpoint)
    model = model.to(memory_format=torch.channels_last)
    fold = args.fold if args.fold is not None else shipped_fold(card)
    if fold is None:
        print(f"{args.checkpoint}: the card does not say which fold the checkpoint was validated on; "
              "pass --fold", file=sys.stderr)
        return 2
    with open(args.oof, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        if "fold" not in fields or "image_id" not in fields:
            print(f"{args.oof}: needs columns image_id and fold (the OOF file `train` exports)",
                  file=sys.stderr)
            return 2
        rows = [r for r in reader if r["fold"] not in ("", None) and int(r["fold"]) == fold]
    if not rows:
        print(f"{args.oof}: no image is in fold {fold}", file=sys.stderr)
        return 2
    if args.limit:
        rows = rows[:args.limit]
    records = {r.image_id: r for r in read_layout(args.data, args.layout)}
    missing = [r["image_id"] for r in rows if r["image_id"] not in records]
    if missing:
        print(f"{args.data}: {len(missing)} images of the OOF file are not in the folder "
              f"(first: {missing[0]})", file=sys.stderr)
        return 2
    size = int(card.get("input_size", 224))
    tta = bool(card.get("tta", True))
    t0 = time.time()
    arrays = np.stack([load_rgb(records[r["image_id"]].path, size) for r in rows])
    logits, emb = predict(model, arrays, args.batch_size, tta=tta,
                          amp=amp_dtype("auto", torch.device("cpu")), progress=True)
    sha = file_sha256(args.checkpoint)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "context_pool.csv")
    npy_path = os.path.join(args.out, "context_pool_embeddings.npy")
    colour_path = os.path.join(args.out, "context_pool_colour.npy")
    out_fields = [c for c in fields if c not in ("embedding_row", "logit", "prob")]
    out_fields = ["embedding_row"] + out_fields + ["logit", "prob", "embedding_model"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=out_fields, extrasaction="ignore")
        w.writeheader()
        for i, (r, lo) in enumerate(zip(rows, logits)):
            w.writerow({**r, "embedding_row": i, "logit": f"{lo:.6f}", "prob": f"{sigmoid(lo):.6f}",
                        "embedding_model": sha})
    np.save(npy_path, emb.astype(np.float16))
    np.save(colour_path, np.stack([colour_descriptor(a) for a in arrays]).astype(np.float32))
    # How far the re-scored logits are from the exported OOF ones (same network, same images):
    # a sanity check that the pool really is the checkpoint's own held-out fold.
    exported = [r.get("logit") for r in rows]
    diff = (float(np.max(np.abs(np.array(exported, dtype=np.float64) - logits)))
            if all(v not in (None, "") for v in exported) else None)
    print(json.dumps({"pool": csv_path, "embeddings": npy_path, "colour_descriptors": colour_path, "fold": fold, "n": len(rows),
                      "n_melanoma": int(sum(int(float(r["target"])) for r in rows)),
                      "embedding_model": sha, "input_size": size, "tta": tta,
                      "max_abs_logit_diff_vs_oof": diff, "seconds": round(time.time() - t0, 1)}),
          flush=True)
    return 0
