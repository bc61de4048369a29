"""Benchmark the training data path and training step, naive vs ours, side by side in one run.

naive: every epoch decodes each JPEG at full resolution and resizes it, augments, builds an
       fp32 NCHW batch; the step runs in fp32 with NCHW tensors.
ours:  images decoded once at reduced size (JPEG draft mode) into a uint8 cache; the epoch only
       augments cached arrays; the batch is channels_last; the step runs under bf16 autocast.

    python bench/training.py [--data ../shared/data/dermoscopy] [--images 256] [--size 96]

Prints images/s for each and the ratios. Takes about 1-2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from training.augment import train_transform  # noqa: E402
from training.datasets import read_layout  # noqa: E402
from training.loop import amp_dtype  # noqa: E402
from training.network import MelanomaNet  # noqa: E402
from training.preprocessing import IMAGENET_MEAN, IMAGENET_STD, load_rgb, to_batch  # noqa: E402


def naive_decode(path, size):
    with Image.open(path) as im:
        im = im.convert("RGB")  # full-resolution decode
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def naive_batch(arrays):
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()  # NCHW


def time_pipeline(paths, size, batch, cached, aug):
    t0 = time.perf_counter()
    if cached is None:
        for s in range(0, len(paths), batch):
            naive_batch([aug(image=naive_decode(p, size))["image"] for p in paths[s:s + batch]])
    else:
        for s in range(0, len(cached), batch):
            to_batch([aug(image=a)["image"] for a in cached[s:s + batch]])
    return len(paths) / (time.perf_counter() - t0)


def time_steps(model, size, batch, channels_last, dtype, steps):
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    else:
        model = model.to(memory_format=torch.contiguous_format)
    y = (torch.rand(batch) < 0.2).float()
    model.train()
    times = []
    for i in range(steps + 2):  # the first two steps are warm-up (oneDNN primitive creation)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--data", default=os.path.join(here, "..", "shared", "data", "dermoscopy"))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recs = read_layout(args.data)[:args.images]
    paths = [r.path for r in recs]
    aug = train_transform(args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(paths)} images "
          f"from {args.data}, {args.size}px, batch {args.batch}")

    # --- data pipeline (one epoch over the images)
    for p in paths:  # warm the OS file cache so both sides read from memory
        with open(p, "rb") as f:
            f.read()
    t0 = time.perf_counter()
    cached = np.stack([load_rgb(p, args.size) for p in paths])
    cache_build = len(paths) / (time.perf_counter() - t0)
    naive_pipe = time_pipeline(paths, args.size, args.batch, None, aug)
    ours_pipe = time_pipeline(paths, args.size, args.batch, cached, aug)

    # a camera-sized JPEG (the Kaggle / clinic case), decode+resize only
    big = "/tmp/_bench_big.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((750, 1000, 3)) * 255).astype("uint8")).resize((6000, 4000)).save(big, quality=90)
    t0 = time.perf_counter()
    for _ in range(3):
        naive_decode(big, args.size)
    big_naive = 3 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(3):
        load_rgb(big, args.size)
    big_ours = 3 / (time.perf_counter() - t0)
    os.remove(big)

    # --- training step
    model = MelanomaNet("se_resnet50", dropout=0.2)
    bf16 = amp_dtype("auto", torch.device("cpu"))
    step = {}
    for name, cl, dt in (("naive fp32 NCHW", False, None), ("fp32 channels_last", True, None),
                         ("bf16 NCHW", False, bf16), ("ours bf16 channels_last", True, bf16)):
        if dt is None and name.startswith("bf16"):
            continue
        step[name] = time_steps(model, args.size, args.batch, cl, dt, args.steps)
    naive_step, ours_step = step["naive fp32 NCHW"], step["ours bf16 channels_last"]

    def e2e(pipe, st):  # single process: data and step run one after the other
        return 1.0 / (1.0 / pipe + 1.0 / st)

    print(f"bf16 autocast on this CPU: {'yes' if bf16 else 'no (fp32 used)'}")
    print("data pipeline (images/s, one epoch incl. augmentation):")
    print(f"  naive full decode+resize every epoch : {naive_pipe:8.1f}")
    print(f"  ours cached uint8 arrays             : {ours_pipe:8.1f}   ratio {ours_pipe / naive_pipe:5.1f}x")
    print(f"  (one-off cache build, draft decode   : {cache_build:8.1f} images/s)")
    print(f"  6000x4000 JPEG decode+resize naive   : {big_naive:8.2f}   draft mode {big_ours:6.2f}   "
          f"ratio {big_ours / big_naive:5.1f}x")
    print("training step (images/s, SE-ResNet50, forward+backward+AdamW):")
    for name, v in step.items():
        print(f"  {name:36s} : {v:8.1f}   ratio {v / naive_step:5.2f}x")
    n_e2e, o_e2e = e2e(naive_pipe, naive_step), e2e(ours_pipe, ours_step)
    print(f"end-to-end (data then step, one process): naive {n_e2e:.1f}, ours {o_e2e:.1f} images/s, "
          f"ratio {o_e2e / n_e2e:.2f}x")


if __name__ == "__main__":
    main()
