"""Inference benchmark, measured side by side in one run (bounded: a few minutes on 2 cores).

For the bundled model version (default ``models/demo-v2/model.pt``; any checkpoint or bundle with
``--checkpoint``) it prints:

1. the machine's practical limits: a large fp32 and bf16 matrix multiply (GFLOP/s);
2. every runtime candidate of every member (``training.runtime``: eager fp32, channels_last, bf16
   autocast, TorchScript freeze, int8, ONNX Runtime / OpenVINO when installed, torch.compile with
   ``--compile``): ms per image at the single-upload shape (1 image x its TTA flips), the achieved
   GFLOP/s and its share of the matching matmul limit, max |dp| against fp32 and the decision;
3. the naive per-image path (full-resolution decode of a camera-sized JPEG, resize, eager fp32,
   the flips one after another, one image at a time) against the worker path (JPEG draft-mode
   decode, the measured runtimes, flips batched; one upload, and a batch of ``--batch``), with
   decode and model time apart and the achieved GFLOP/s.

    .venv/bin/python bench/inference.py [--checkpoint CKPT] [--threads N] [--naive 3] [--batch 8]
                                          [--budget 120] [--compile]

Loopback only (no network); writes only to a temporary folder.
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
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from inference.predictor import Predictor, configure_threads  # noqa: E402
from training import runtime as rt  # noqa: E402
from training.preprocessing import to_batch  # noqa: E402

DEFAULT_CKPT = ROOT / "models" / "demo-v2" / "model.pt"


def make_camera_jpeg(path: Path, w: int, h: int, seed=0) -> Path:
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


def matmul_gflops(dtype, n=1536, seconds=1.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def member_flops(model, size: int) -> int:
    """FLOPs of one forward pass of one image (FlopCounterMode, 2 FLOP per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.forward_with_embedding(x)
    return int(fc.get_total_flops())


def naive_once(bundle, path):
    """Full decode, resize, eager fp32 contiguous, flips one after another, one image."""
    t0 = time.perf_counter()
    with Image.open(path) as im:
        im = im.convert("RGB")  # the full-resolution decode
        per_size = {s: np.asarray(im.resize((s, s), Image.BILINEAR)) for s in bundle.input_sizes}
    t1 = time.perf_counter()
    logits = []
    with torch.no_grad():
        for m in bundle.members:
            x = to_batch(per_size[m.input_size][None], m.normalisation).contiguous()
            logits.append(float(m.model.forward_tta(x, tta=m.tta)[0][0]))
    t2 = time.perf_counter()
    p = float(bundle.combine(np.array([logits]))[1][0])
    return p, t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CKPT), help="checkpoint or bundle (default: the bundled demo-v2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default WORKER_THREADS or all CPUs)")
    ap.add_argument("--naive", type=int, default=3, help="images through the naive path")
    ap.add_argument("--batch", type=int, default=8, help="images in the worker's batch (bursts)")
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the runtime probe (all members)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    args = ap.parse_args()
    if args.compile:
        os.environ["ANALYSIS_RUNTIME_COMPILE"] = "1"

    t_start = time.perf_counter()
    threads = configure_threads(args.threads)
    print(f"torch {torch.__version__}; {threads} threads; CPU: {rt.cpu_model()} ({', '.join(rt.cpu_flags()) or 'no AVX-512'}); "
          f"native bf16: {rt.bf16_available()}; optional runtimes: "
          f"{', '.join(k for k in rt._versions() if k != 'torch') or 'none installed'}")
    mm32 = matmul_gflops(torch.float32)
    mm16 = matmul_gflops(torch.bfloat16)
    print(f"matmul limit (1536^3, best of 1.5 s): fp32 {mm32:.0f} GFLOP/s, bf16 {mm16:.0f} GFLOP/s\n")

    # ---------------------------------------------------------------- runtime candidates (what the worker does)
    t0 = time.perf_counter()
    pred = Predictor.from_checkpoint(args.checkpoint, budget_s=args.budget)
    load_s = time.perf_counter() - t0
    bundle = pred.bundle
    decision = pred.runtime_decision
    flops = {i: member_flops(m.model, m.input_size) * (4 if m.tta else 1) for i, m in enumerate(bundle.members)}
    print(f"model: {bundle.architecture}; load + runtime probe {load_s:.1f} s (probe {decision['probe_s']} s)")
    print(f"{'member':20s} {'runtime':15s} {'ms/img':>8s} {'GFLOP/s':>8s} {'% limit':>8s} {'max|dp|':>9s} {'emb err':>8s}  decision")
    for i, m in enumerate(decision["members"]):
        gf = flops[i] / 1e9
        for c in m["candidates"]:
            ms = c.get("ms_per_image")
            lim = mm16 if c["candidate"] == "bf16-autocast" else mm32
            rate = f"{gf / (ms / 1000):8.1f} {gf / (ms / 1000) / lim:8.0%}" if ms else f"{'-':>8s} {'-':>8s}"
            dp = c.get("max_abs_dp")
            er = c.get("emb_rel_err")
            verdict = ("CHOSEN " if c.get("chosen") else "") + c["reason"]
            who = f"{m['member']} {m['input_size']}px"
            print(f"{who:20s} {c['candidate']:15s} {ms if ms else '-':>8} {rate} "
                  f"{dp if dp is not None else '-':>9} {er if er is not None else '-':>8}  {verdict[:90]}")
    print(f"(per image: {' + '.join(f'{flops[i] / 1e9:.2f}' for i in flops)} GFLOP incl. flip TTA; "
          f"% limit against the fp32 matmul, bf16 rows against the bf16 one)\n")

    with tempfile.TemporaryDirectory() as tmp:
        big = make_camera_jpeg(Path(tmp) / "camera.jpg", args.width, args.height)
        total_gf = sum(flops.values()) / 1e9

        # ------------------------------------------------------------ naive path
        naive_once(bundle, big)  # warm-up
        rows = [naive_once(bundle, big) for _ in range(args.naive)]
        n_prep = min(r[1] for r in rows)
        n_inf = min(r[2] for r in rows)

        # ------------------------------------------------------------ worker path
        pred.predict_files([big])  # warm-up
        single = []
        for _ in range(3):
            t0 = time.perf_counter()
            arrays = [pred.load(big)]
            t1 = time.perf_counter()
            out1 = pred.predict_arrays(arrays)
            single.append((t1 - t0, time.perf_counter() - t1))
        w1_prep, w1_inf = min(s[0] for s in single), min(s[1] for s in single)
        t0 = time.perf_counter()
        arrays = [pred.load(big) for _ in range(args.batch)]
        t1 = time.perf_counter()
        pred.predict_arrays(arrays)
        wb_prep, wb_inf = (t1 - t0) / args.batch, (time.perf_counter() - t1) / args.batch

    head = f"path ({args.width}x{args.height} JPEG)"
    print(f"{head:44s} {'decode ms':>10s} {'model ms':>9s} {'ms/img':>8s} "
          f"{'img/s':>6s} {'GFLOP/s':>8s} {'% fp32 lim':>10s}")
    for label, prep, inf in (("(a) naive: full decode, eager fp32, 1 by 1", n_prep, n_inf),
                             (f"(b) worker, 1 upload: draft, {pred.precision}", w1_prep, w1_inf),
                             (f"(c) worker, batch {args.batch}: same", wb_prep, wb_inf)):
        print(f"{label[:44]:44s} {prep * 1e3:10.1f} {inf * 1e3:9.1f} {(prep + inf) * 1e3:8.1f} {1 / (prep + inf):6.1f} "
              f"{total_gf / inf:8.1f} {total_gf / inf / mm32:10.0%}")
    print(f"\nworker vs naive, same run: {(n_prep + n_inf) / (w1_prep + w1_inf):.1f}x per single upload "
          f"(decode {n_prep / w1_prep:.0f}x, model {n_inf / w1_inf:.1f}x); batch of {args.batch}: "
          f"{(n_prep + n_inf) / (wb_prep + wb_inf):.1f}x per image")
    print(f"scores agree: naive p={rows[0][0]:.4f}, worker p={float(out1.probabilities[0]):.4f} "
          "(draft-mode decode resizes from a different scale)")
    print(f"worker chose: {decision['chosen']} (fastest within max |dp| <= {decision['tolerance']} of fp32, per member)")
    print(f"bench total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
