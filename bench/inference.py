"""Inference benchmark: the naive path against the worker's path, measured in the same run.

(a) naive:  full-size decode of a 6000x4000 JPEG, resize to 224, NCHW fp32 tensor, the model run
            eagerly on one image at a time in fp32 (torch.no_grad).
(b) worker: inference.predictor -- JPEG draft-mode decode straight to ~1/8 scale, batch, channels_last,
            torch.inference_mode(), bf16 autocast if this CPU supports it and the probe accepts it.

Also: the model's FLOPs per image (torch.utils.flop_counter), the achieved GFLOP/s of both paths'
model time, and a large matrix multiply (fp32 and bf16) as the machine's practical limit.

    .venv/bin/python bench/inference.py [--checkpoint CKPT] [--naive 4] [--images 16] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from inference.predictor import Predictor, configure_threads  # noqa: E402
from training.network import MelanomaNet, save_checkpoint  # noqa: E402
from training.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def make_big_jpeg(path: Path, w=6000, h=4000, seed=0) -> Path:
    """A camera-sized, lesion-like JPEG (smooth skin, a dark blob, sensor-like noise)."""
    rng = np.random.default_rng(seed)
    small = np.empty((h // 20, w // 20, 3), np.float32)
    small[...] = (215, 170, 150)
    yy, xx = np.mgrid[0:h // 20, 0:w // 20]
    blob = ((xx - w / 40) ** 2 + (yy - h / 40) ** 2) < (h / 80) ** 2
    small[blob] = (90, 60, 45)
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def naive_once(model, path, size=224):
    t0 = time.perf_counter()
    with Image.open(path) as im:
        im = im.convert("RGB")  # full 24 MP decode
        im = im.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    t1 = time.perf_counter()
    with torch.no_grad():
        p = torch.sigmoid(model(x.contiguous()))
    t2 = time.perf_counter()
    return float(p[0]), t1 - t0, t2 - t1


def model_flops(model, size=224) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def matmul_gflops(n=2048, dtype=torch.float32, reps=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint to load (default: random se_resnet50 weights)")
    ap.add_argument("--naive", type=int, default=4, help="images for the naive path")
    ap.add_argument("--images", type=int, default=16, help="images for the worker path")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default WORKER_THREADS or all)")
    args = ap.parse_args()

    threads = configure_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, CPU count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        big = make_big_jpeg(tmp / "big.jpg")
        print(f"generated {big.name}: 6000x4000, {big.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        ckpt = args.checkpoint
        if not ckpt:
            torch.manual_seed(0)
            ckpt = tmp / "random.pt"
            save_checkpoint(str(ckpt), MelanomaNet("se_resnet50"), {"input_size": 224}, fp16=False)
        pred = Predictor.from_checkpoint(ckpt, input_size=224)
        print(f"model loaded in {pred.load_ms:.0f} ms; worker precision: {pred.precision} "
              f"(bf16 probe max |dp| = {pred.bf16_max_diff})")
        naive_model = pred.model.float().eval().to(memory_format=torch.contiguous_format)
        flops = model_flops(naive_model)
        print(f"model: {flops / 1e9:.2f} GFLOP per 224 px image (FlopCounterMode, 2 FLOP per MAC)")

        # (a) naive
        naive_once(naive_model, big)  # warm-up
        rows = [naive_once(naive_model, big) for _ in range(args.naive)]
        n_prep = sum(r[1] for r in rows) / len(rows)
        n_inf = sum(r[2] for r in rows) / len(rows)
        n_lat = n_prep + n_inf

        # (b) worker path (same predictor object the worker would build)
        pred.model = pred.model.to(memory_format=torch.channels_last)
        pred.predict_files([big] * min(2, args.batch))  # warm-up
        n_batches = max(1, args.images // args.batch)
        t_load = t_inf = 0.0
        probs = []
        for _ in range(n_batches):
            t0 = time.perf_counter()
            arrays = [pred.load(big) for _ in range(args.batch)]
            t1 = time.perf_counter()
            out = pred.predict_arrays(arrays)
            t_load += t1 - t0
            t_inf += (time.perf_counter() - t1)
            probs.append(out.probabilities[0])
        n_img = n_batches * args.batch
        w_lat = (t_load + t_inf) / n_img
        w_prep, w_inf = t_load / n_img, t_inf / n_img

        mm32 = matmul_gflops(dtype=torch.float32)
        mm16 = matmul_gflops(dtype=torch.bfloat16)
        print()
        print(f"{'path':38s} {'decode+prep ms':>15s} {'model ms':>9s} {'ms/img':>8s} {'img/s':>7s} {'model GFLOP/s':>14s}")
        print(f"{'(a) naive: full decode, fp32, 1 by 1':38s} {n_prep * 1e3:15.1f} {n_inf * 1e3:9.1f} {n_lat * 1e3:8.1f} "
              f"{1 / n_lat:7.2f} {flops / n_inf / 1e9:14.1f}")
        label = f"(b) worker: draft, batch {args.batch}, {pred.precision}"
        print(f"{label:38s} {w_prep * 1e3:15.1f} {w_inf * 1e3:9.1f} {w_lat * 1e3:8.1f} "
              f"{1 / w_lat:7.2f} {flops / w_inf / 1e9:14.1f}")
        print()
        print(f"speed-up (b)/(a), same run: {n_lat / w_lat:.1f}x end to end "
              f"(decode {n_prep / w_prep:.0f}x, model {n_inf / w_inf:.1f}x)")
        print(f"large matmul (2048^3) in this run: fp32 {mm32:.0f} GFLOP/s, bf16 {mm16:.0f} GFLOP/s")
        print(f"model efficiency: naive fp32 {flops / n_inf / 1e9 / mm32:.0%} of the fp32 matmul; worker "
              f"{pred.precision} {flops / w_inf / 1e9 / (mm16 if pred.use_bf16 else mm32):.0%} of the "
              f"{pred.precision} matmul")
        print(f"scores agree: naive {rows[0][0]:.4f} vs worker {probs[0]:.4f} (draft-mode decode + bf16 differ slightly)")


if __name__ == "__main__":
    main()
