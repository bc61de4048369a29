"""The predictor: the only module of the app that imports torch (besides management commands).

The web process never imports this module; the worker imports it lazily inside its tasks (after
the prefork worker has forked), so the model is loaded once per worker *process* and kept in a
module-level cache keyed by the model version (its weights SHA-256).

Inference path (the same for the worker, ``install_model``'s validation run and the benchmark):
``training.preprocessing.load_rgb`` (JPEG draft mode: never a full-resolution decode) ->
``to_batch`` (ImageNet normalisation, channels_last) -> ``MelanomaNet.forward_tta`` (flip TTA when
the model card's metrics were measured with it, as the demo model's were) under ``torch.inference_mode()``, in bf16 autocast only where the CPU supports bf16 natively AND a
probe batch shows the probabilities stay within ``ANALYSIS_BF16_TOLERANCE`` of fp32 (decided once
per process and model, logged).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.network import EMBEDDING_DIM, load_checkpoint
from training.preprocessing import load_rgb, to_batch

log = logging.getLogger(__name__)

DEFAULT_BF16_TOLERANCE = 0.01  # max |p_bf16 - p_fp32| on the probe batch

_threads_configured = False


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset/cgroups), else cpu_count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(n: int | None = None) -> int:
    """torch threads = cores given to this worker process (env WORKER_THREADS, default: its CPUs)."""
    global _threads_configured
    if n is None:
        n = int(os.environ.get("WORKER_THREADS") or 0) or available_cpus()
    n = max(1, n)
    torch.set_num_threads(n)
    if not _threads_configured:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set or parallel work already started
            pass
    _threads_configured = True
    return n


def bf16_supported() -> bool:
    """True where the CPU has native bf16 (AVX512-BF16 or AMX) that oneDNN uses."""
    if os.environ.get("ANALYSIS_DISABLE_BF16", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 -- older builds / other platforms
        return False


def probe_arrays(size: int, n: int = 4, seed: int = 1234) -> list[np.ndarray]:
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
    return out


@dataclass
class Prediction:
    probabilities: np.ndarray  # (N,) float64
    embeddings: np.ndarray  # (N, 2048) float32
    logits: np.ndarray  # (N,) float32
    inference_ms: float
    preprocess_ms: float = 0.0
    precision: str = "fp32"


@dataclass
class Predictor:
    model: torch.nn.Module
    card: dict
    input_size: int
    use_bf16: bool = False
    bf16_max_diff: float | None = None
    load_ms: float = 0.0
    version_id: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path, *, input_size: int | None = None, bf16: bool | None = None,
                        tolerance: float | None = None, version_id: int | None = None) -> "Predictor":
        t0 = time.perf_counter()
        model, card = load_checkpoint(str(path), map_location="cpu")
        model = model.float().eval().to(memory_format=torch.channels_last)
        size = int(input_size or card.get("input_size") or 224)
        pred = cls(model=model, card=card, input_size=size, version_id=version_id)
        pred.decide_precision(bf16=bf16, tolerance=tolerance)
        pred.load_ms = (time.perf_counter() - t0) * 1000
        return pred

    def decide_precision(self, *, bf16: bool | None = None, tolerance: float | None = None) -> bool:
        """Use bf16 autocast only if supported and the probe batch agrees with fp32 within tolerance."""
        tol = DEFAULT_BF16_TOLERANCE if tolerance in (None, "") else float(tolerance)
        self.use_bf16, self.bf16_max_diff = False, None
        if bf16 is False or not bf16_supported():
            log.info("model %s: fp32 inference (bf16 %s)", self.version_id or "(checkpoint)",
                     "disabled" if bf16 is False else "not supported natively by this CPU")
            return False
        batch = to_batch(probe_arrays(self.input_size))
        p32 = self._run(batch, bf16=False)[0]
        p16 = self._run(batch, bf16=True)[0]
        diff = float(np.max(np.abs(p32 - p16)))
        self.bf16_max_diff = diff
        self.use_bf16 = bool(np.isfinite(diff) and diff <= tol)
        log.info("model %s: bf16 probe max |p_bf16 - p_fp32| = %.5f (tolerance %.5f) -> %s inference",
                 self.version_id or "(checkpoint)", diff, tol, "bf16" if self.use_bf16 else "fp32")
        return self.use_bf16

    # ------------------------------------------------------------------ inference
    @property
    def precision(self) -> str:
        return "bf16" if self.use_bf16 else "fp32"

    @property
    def tta(self) -> bool:
        """Flip TTA exactly when the card says its metrics were measured with it."""
        return bool(self.card.get("tta", False))

    def _run(self, batch: torch.Tensor, *, bf16: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, emb = self.model.forward_tta(batch, tta=self.tta)
        logits = logits.float()
        probs = torch.sigmoid(logits.double()).numpy()
        return probs, emb.float().numpy(), logits.numpy()

    def load(self, source) -> np.ndarray:
        """Decode one image (path or binary file object) at the model's input size (draft mode)."""
        return load_rgb(source, self.input_size)

    def predict_arrays(self, arrays) -> Prediction:
        t0 = time.perf_counter()
        batch = to_batch(arrays)
        t1 = time.perf_counter()
        with self.lock:
            probs, emb, logits = self._run(batch, bf16=self.use_bf16)
        t2 = time.perf_counter()
        if emb.shape != (len(probs), EMBEDDING_DIM):
            raise ValueError(f"model returned embeddings of shape {emb.shape}, expected (N, {EMBEDDING_DIM})")
        return Prediction(probabilities=probs, embeddings=emb, logits=logits, inference_ms=(t2 - t1) * 1000,
                          preprocess_ms=(t1 - t0) * 1000, precision=self.precision)

    def predict_files(self, sources) -> Prediction:
        return self.predict_arrays([self.load(s) for s in sources])


# ---------------------------------------------------------------------- per-process cache
_cache: dict[str, Predictor] = {}
_cache_lock = threading.Lock()


def predictor_for_version(version, *, model_root=None, tolerance: float | None = None) -> tuple[Predictor, bool]:
    """The cached predictor of a ModelVersion (loaded once per process). Returns (predictor, loaded_now)."""
    key = version.sha256 or str(version.pk)  # same weights file -> same predictor
    with _cache_lock:
        pred = _cache.get(key)
        if pred is not None:
            pred.version_id = version.pk
            return pred, False
        if model_root is None:
            from django.conf import settings

            model_root = settings.MODEL_ROOT
            if tolerance is None:
                tolerance = getattr(settings, "ANALYSIS_BF16_TOLERANCE", None) or os.environ.get(
                    "ANALYSIS_BF16_TOLERANCE") or None
        configure_threads()
        path = Path(model_root) / version.weights_path
        pred = Predictor.from_checkpoint(path, input_size=version.input_size, tolerance=tolerance,
                                         version_id=version.pk)
        _cache.clear()  # one model in memory per worker process: a new active version replaces the old
        _cache[key] = pred
        log.info("loaded model version %s (%s, %d px) from %s in %.0f ms, %s, %d torch threads",
                 version.pk, version.architecture, pred.input_size, path, pred.load_ms, pred.precision,
                 torch.get_num_threads())
        return pred, True


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
