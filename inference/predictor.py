"""The predictor: the only module of the app that imports torch (besides management commands).

The web process never imports this module; the worker imports it lazily inside its tasks (after
the prefork worker has forked), so the model is loaded once per worker *process* and kept in a
module-level cache keyed by the model version (its weights SHA-256).

A model version is a *bundle* (``training.ensemble``): one network, or several member networks and
a combiner learnt on held-out predictions. Inference path (the same for the worker,
``install_model``'s validation run, ``python -m training evaluate`` and the benchmark):
``Bundle.decode`` (``training.preprocessing.load_rgb`` once per member input size: JPEG draft mode,
never a full-resolution decode) -> ``Bundle.predict_arrays`` (each member: its own normalisation,
channels_last, flip TTA when its card says its metrics were measured with it; then the combiner)
under ``torch.inference_mode()``. The runtime of each member (eager fp32, channels_last, bf16
autocast, TorchScript freeze, int8, ONNX Runtime, OpenVINO...) is chosen by measurement on this
machine (``training.runtime.choose_runtime``: the fastest within ``ANALYSIS_RUNTIME_TOLERANCE`` of the
fp32 probabilities), once per model version and machine: the decision is recorded in
``ModelVersion.runtime`` (``services.record_runtime``) and re-used by the next worker start on the
same CPU, torch and threads. The worker loads and probes at start (``inference.warmup``).
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

from training.ensemble import Bundle, load_bundle
from training.runtime import DEFAULT_TOLERANCE as DEFAULT_BF16_TOLERANCE  # noqa: F401
from training.runtime import (  # noqa: F401 (re-exported)
    BUILDERS,
    MemberRuntime,
    bf16_available,
    choose_runtime,
    machine_key,
    probe_arrays,
)

log = logging.getLogger(__name__)

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
    return bf16_available()


@dataclass
class Prediction:
    probabilities: np.ndarray  # (N,) float64: the model version's (ensemble's) probability
    embeddings: np.ndarray  # (N, D) float32 of the card's embedding member
    logits: np.ndarray  # (N,) float64: the combiner's logit
    inference_ms: float
    preprocess_ms: float = 0.0
    precision: str = "fp32"
    member_names: list = field(default_factory=list)
    member_probabilities: np.ndarray | None = None  # (N, M) each member's own sigmoid(logit)

    def members_of(self, i: int) -> dict:
        """Image ``i``'s per-member probabilities by member name (what an analysis records)."""
        if self.member_probabilities is None:
            return {}
        return {n: float(p) for n, p in zip(self.member_names, self.member_probabilities[i])}


@dataclass
class Predictor:
    bundle: Bundle
    load_ms: float = 0.0
    version_id: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path, *, input_size: int | None = None, bf16: bool | None = None,
                        tolerance: float | None = None, version_id: int | None = None,
                        runtime: str | list[str] | None = None, sha256: str = "",
                        cached: dict | None = None, budget_s: float | None = None) -> "Predictor":
        """Load a checkpoint or bundle and give its members their runtime.

        Default: measured (``choose_runtime``; a ``cached`` decision for this machine is re-used).
        ``runtime="<candidate>"`` (or one name per member): that runtime, no measuring
        (``bf16=False`` is the eager fp32 reference, ``bf16=True`` bf16 autocast where the CPU has it)."""
        t0 = time.perf_counter()
        bundle = load_bundle(str(path), map_location="cpu").to_channels_last()
        if input_size and not bundle.is_ensemble:
            m = bundle.members[0]
            m.card = dict(m.card, input_size=int(input_size))
        pred = cls(bundle=bundle, version_id=version_id)
        if runtime is None and bf16 is not None:
            runtime = "bf16-autocast" if bf16 and bf16_available() else "eager-fp32"
        if runtime is not None:
            pred.use_runtime(runtime)
        else:
            pred.decide_runtime(tolerance=tolerance, sha256=sha256, cached=cached, budget_s=budget_s)
        pred.load_ms = (time.perf_counter() - t0) * 1000
        return pred

    # ------------------------------------------------------------------ description
    @property
    def card(self) -> dict:
        return self.bundle.card

    @card.setter
    def card(self, value: dict) -> None:
        self.bundle.card = dict(value)
        if not self.bundle.is_ensemble:  # one network: its card is the version's card
            self.bundle.members[0].card = dict(value)

    @property
    def model(self) -> torch.nn.Module:
        """The first member network (the only one of a single-checkpoint version)."""
        return self.bundle.members[0].model

    @property
    def input_size(self) -> int:
        return max(self.bundle.input_sizes)

    @input_size.setter
    def input_size(self, size: int) -> None:
        if self.bundle.is_ensemble:
            raise ValueError("an ensemble's members keep their own input sizes")
        self.bundle.members[0].card = dict(self.bundle.members[0].card, input_size=int(size))

    @property
    def tta(self) -> bool:
        """Flip TTA exactly when the (members') card says its metrics were measured with it."""
        return any(m.tta for m in self.bundle.members)

    @property
    def use_bf16(self) -> bool:
        return any(r.name == "bf16-autocast" for r in self.bundle.runtimes.values())

    @property
    def precision(self) -> str:
        """The runtime each member runs with, "+"-joined when they differ (what analyses record)."""
        return self.bundle.precision

    @property
    def runtime_decision(self) -> dict:
        return self.bundle.runtime_decision

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.bundle.members]

    def use_runtime(self, name: str | list[str]) -> None:
        """Run every member with the named runtime (or each member with its own: a list),
        unmeasured (tests, validation, comparisons with what the worker chose)."""
        names = [name] * len(self.bundle.members) if isinstance(name, str) else list(name)
        if len(names) != len(self.bundle.members):
            raise ValueError(f"{len(names)} runtimes for {len(self.bundle.members)} members")
        for n in names:
            if n not in BUILDERS:
                raise ValueError(f"unknown runtime {n!r}; one of {sorted(BUILDERS)}")
        self.bundle.runtimes = {i: MemberRuntime(n, BUILDERS[n](m.model, m.input_size))
                                for i, (n, m) in enumerate(zip(names, self.bundle.members))}
        self.bundle.runtime_decision = {"chosen": "+".join(names) if len(set(names)) > 1 else names[0],
                                        "forced": True}

    def decide_runtime(self, *, tolerance: float | None = None, sha256: str = "", cached: dict | None = None,
                       **kwargs) -> dict:
        """Measure the candidate runtimes per member and keep the fastest within tolerance (or
        re-use ``cached`` when it was measured on this machine). Returns the decision."""
        decision = choose_runtime(self.bundle, sha256=sha256, tolerance=tolerance, cached=cached, **kwargs)
        self.bundle.runtime_decision = decision
        log.info("model %s: runtime %s (%s in %.1fs)", self.version_id or "(checkpoint)", decision["chosen"],
                 "re-used for this machine" if decision.get("reused") else "measured",
                 decision.get("apply_s") or decision.get("probe_s") or 0)
        return decision

    # ------------------------------------------------------------------ inference
    def load(self, source) -> dict:
        """Decode one image (path or binary file object) at every member input size (draft mode)."""
        return self.bundle.decode(source)

    def _by_size(self, arrays) -> dict:
        items = list(arrays) if not isinstance(arrays, dict) else None
        if items is None:
            return arrays
        if items and isinstance(items[0], dict):
            return self.bundle.stack(items)
        if len(self.bundle.input_sizes) != 1:
            raise ValueError("an ensemble with several input sizes needs decoded images from load()")
        return {self.bundle.input_sizes[0]: np.stack(items) if items else np.empty((0,))}

    def predict_arrays(self, arrays) -> Prediction:
        """Score decoded images: a list of ``load()`` results, or uint8 HxWx3 arrays at the input
        size of a single-size model."""
        t0 = time.perf_counter()
        by_size = self._by_size(arrays)
        t1 = time.perf_counter()
        with self.lock:
            out = self.bundle.predict_arrays(by_size)
        t2 = time.perf_counter()
        if out.embeddings.shape != (len(out.probabilities), self.bundle.embedding_dim):
            raise ValueError(f"model returned embeddings of shape {out.embeddings.shape}, expected "
                             f"(N, {self.bundle.embedding_dim})")
        return Prediction(probabilities=out.probabilities, embeddings=out.embeddings, logits=out.logits,
                          inference_ms=(t2 - t1) * 1000, preprocess_ms=(t1 - t0) * 1000,
                          precision=self.precision, member_names=self.member_names,
                          member_probabilities=out.member_probabilities())

    def predict_files(self, sources) -> Prediction:
        return self.predict_arrays([self.load(s) for s in sources])


# ---------------------------------------------------------------------- per-process cache
_cache: dict[str, Predictor] = {}
_cache_lock = threading.Lock()


def _runtime_lock(model_root, sha: str):
    """An exclusive file lock per weights file on this machine: two worker processes starting
    together measure once (the second finds the first's recorded decision)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def lock():
        path = Path(model_root) / f".runtime-{(sha or 'unknown')[:16]}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")
        except OSError:  # read-only model folder: measure without the lock
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    return lock()


def predictor_for_version(version, *, model_root=None, tolerance: float | None = None) -> tuple[Predictor, bool]:
    """The cached predictor of a ModelVersion (loaded once per process). Returns (predictor, loaded_now).

    Loading also gives each member its runtime: the decision recorded in ``version.runtime`` for
    this machine if there is one, else measured now and recorded (``services.record_runtime``)."""
    key = version.sha256 or str(version.pk)  # same weights file -> same predictor
    with _cache_lock:
        pred = _cache.get(key)
        if pred is not None:
            pred.version_id = version.pk
            return pred, False
        from django.conf import settings

        if model_root is None:
            model_root = settings.MODEL_ROOT
        if tolerance is None:
            tolerance = getattr(settings, "ANALYSIS_RUNTIME_TOLERANCE", None)
        configure_threads()
        path = Path(model_root) / version.weights_path
        from .services import record_runtime, recorded_runtime

        with _runtime_lock(model_root, version.sha256):
            try:
                version.refresh_from_db(fields=["runtime"])
            except Exception:  # noqa: BLE001 -- an unsaved version (validation runs): nothing recorded
                pass
            cached = recorded_runtime(model_version=version, machine=machine_key(version.sha256))
            pred = Predictor.from_checkpoint(path, input_size=version.input_size, tolerance=tolerance,
                                             version_id=version.pk, sha256=version.sha256, cached=cached,
                                             budget_s=getattr(settings, "ANALYSIS_RUNTIME_BUDGET_S", None))
            if not pred.runtime_decision.get("reused"):
                try:
                    record_runtime(model_version=version, decision=pred.runtime_decision)
                except Exception:  # noqa: BLE001 -- the choice still applies to this process
                    log.exception("could not record the runtime decision of model version %s", version.pk)
        _cache.clear()  # one model in memory per worker process: a new active version replaces the old
        _cache[key] = pred
        log.info("loaded model version %s (%s, %s px) from %s in %.0f ms, runtime %s, %d torch threads",
                 version.pk, version.architecture, pred.bundle.input_sizes, path, pred.load_ms,
                 pred.precision, torch.get_num_threads())
        return pred, True


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
