"""Precision chosen by measurement, per member network, on this machine.

bf16 autocast is 1.7x faster than fp32 on one CPU (AVX-512 BF16) and 19x slower on another (AVX2
only): a feature flag cannot tell. ``choose_precision`` runs each member on a probe batch in fp32
and, where the CPU offers bf16 at all, in bf16; it keeps bf16 only when it was measured faster AND
its probabilities stay within ``tolerance`` of fp32's. The decision and its figures are returned
(the worker logs and records them).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

DEFAULT_TOLERANCE = 0.01  # max |p_bf16 - p_fp32| on the probe batch


def bf16_available() -> bool:
    if os.environ.get("ANALYSIS_DISABLE_BF16", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 -- older builds / other platforms
        return False


def probe_arrays(size: int, n: int = 4, seed: int = 1234) -> np.ndarray:
    """Deterministic, lesion-like uint8 images (skin background, dark irregular blob, noise)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(n):
        cx, cy = size * (0.3 + 0.4 * rng.random(2))
        r = size * (0.15 + 0.2 * rng.random())
        ang = np.arctan2(yy - cy, xx - cx)
        inside = np.hypot(xx - cx, yy - cy) < r * (1 + 0.2 * np.sin(3 * ang + rng.random() * 6))
        img = np.empty((size, size, 3), np.float32)
        img[...] = rng.uniform(150, 230, 3)
        img[inside] = rng.uniform(30, 130, 3)
        img += rng.normal(0, 8, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _timed(bundle, i, arrays, amp, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = bundle.member_forward(i, arrays, amp)
        best = min(best, time.perf_counter() - t0)
    return best, out[0]


def choose_precision(bundle, *, force: str | None = None, tolerance: float | None = None,
                     reps: int = 2) -> str:
    """Set ``bundle.amp`` per member; return a short description ("fp32", "bf16" or a mix)."""
    tol = DEFAULT_TOLERANCE if tolerance in (None, "") else float(tolerance)
    bundle.amp = {}
    bundle.precision_report = []
    for i, m in enumerate(bundle.members):
        rec = {"member": m.name, "precision": "fp32"}
        if force == "fp32" or (force is None and not bf16_available()):
            rec["reason"] = "forced" if force else "this CPU offers no native bf16"
        else:
            arrays = probe_arrays(m.input_size)
            bundle.member_forward(i, arrays[:1], None)  # warm-up (first-call allocations)
            t32, lo32 = _timed(bundle, i, arrays, None, reps)
            bundle.member_forward(i, arrays[:1], torch.bfloat16)
            t16, lo16 = _timed(bundle, i, arrays, torch.bfloat16, reps)
            diff = float(np.max(np.abs(1 / (1 + np.exp(-lo32.astype(np.float64)))
                                       - 1 / (1 + np.exp(-lo16.astype(np.float64))))))
            rec.update(fp32_ms=round(t32 * 1000, 1), bf16_ms=round(t16 * 1000, 1), max_abs_diff=diff,
                       tolerance=tol)
            ok = np.isfinite(diff) and diff <= tol
            if force == "bf16" or (ok and t16 < t32):
                bundle.amp[i] = torch.bfloat16
                rec["precision"] = "bf16"
            rec["reason"] = ("forced" if force else
                             "bf16 measured faster and within tolerance" if rec["precision"] == "bf16" else
                             "bf16 outside tolerance" if not ok else "bf16 measured slower")
        bundle.precision_report.append(rec)
    kinds = {r["precision"] for r in bundle.precision_report}
    return kinds.pop() if len(kinds) == 1 else "+".join(r["precision"] for r in bundle.precision_report)
