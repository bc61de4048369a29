"""Inference runtime chosen by measurement, per member network, on this machine.

A feature flag cannot tell which runtime is fastest: bf16 autocast was 1.7x faster than fp32 on one
CPU (AVX-512 BF16) and 19x slower on another (AVX2 only). So ``choose_runtime`` builds every
candidate runtime available here for each member of a bundle, runs each on the same probe batch,
and keeps the fastest whose probabilities stay within ``tolerance`` (max |p - p_fp32|, default
0.01) of the eager fp32 reference and whose embedding stays within ``EMBEDDING_TOLERANCE``
(relative L2 error; the patient-context features compare embeddings). Nothing qualifying: eager fp32.

Candidates (each a function ``x -> (logits, embeddings)`` on a normalised NCHW float32 batch):

* ``eager-fp32``      the module as trained, contiguous NCHW (the reference);
* ``channels-last``   weights and input in channels_last memory (oneDNN's preferred layout);
* ``bf16-autocast``   channels_last under ``torch.autocast(bfloat16)``, only where the CPU has native bf16;
* ``jit-freeze``      ``torch.jit.trace`` + ``torch.jit.freeze`` (conv-BN folding, constant weights);
* ``int8-dynamic``    ``torch.ao.quantization.quantize_dynamic`` (Linear layers to int8);
* ``onnxruntime``     exported to ONNX, run by ONNX Runtime (only if ``onnxruntime`` and ``onnx`` are installed);
* ``openvino``        converted by OpenVINO (only if ``openvino`` is installed);
* ``torch-compile``   ``torch.compile`` (inductor); off unless ``ANALYSIS_RUNTIME_COMPILE=1``, because
                      compiling takes tens of seconds per member on 2 cores (over the probe budget).

Each candidate's figures (ms per image at the single-upload batch, max |dp|, embedding error,
accepted or rejected and why) are returned as a plain dict that the worker records with the
model version (``ModelVersion.runtime``), keyed by the machine (``machine_key``) so a restart on the
same CPU and torch re-uses the decision instead of measuring again.

Nothing here imports Django.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

DEFAULT_TOLERANCE = 0.01  # max |p_candidate - p_fp32| on the probe batch, per member
EMBEDDING_TOLERANCE = 0.02  # max relative L2 error of the embedding against fp32
DEFAULT_BUDGET_S = 30.0  # whole probe (every member, every candidate), seconds
DECISION_FORMAT = 2  # bump when the candidates or the criteria change: old decisions are re-measured
REFERENCE = "eager-fp32"
# Measuring order: the reference first, then the usual winners (so a spent budget skips the long shots).
ORDER = ("eager-fp32", "channels-last", "jit-freeze", "onnxruntime", "bf16-autocast", "openvino", "int8-dynamic",
         "torch-compile")

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Unavailable(Exception):
    """This candidate cannot run here; the message says why (recorded as the skip reason)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def bf16_available() -> bool:
    if _env_flag("ANALYSIS_DISABLE_BF16"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 -- older builds / other platforms
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide kernels (for the record; the decision is by measurement)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("onnxruntime", "openvino"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def machine_key(sha256: str, threads: int | None = None) -> dict:
    """What a runtime decision depends on: the weights, the CPU, the libraries and the threads."""
    return {"sha256": sha256, "cpu": cpu_model(), "threads": int(threads or torch.get_num_threads()),
            "versions": _versions(), "bf16": bf16_available(), "format": DECISION_FORMAT,
            "compile": _env_flag("ANALYSIS_RUNTIME_COMPILE")}


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


# --------------------------------------------------------------------------- TTA over any runtime

TTA_FLIPS = ((), (3,), (2,), (2, 3))  # identity, horizontal, vertical, both (as training.network)


def tta_forward(fn: Forward, x: torch.Tensor, tta: bool, max_batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean logit and mean embedding over the flips, run as ONE batch (images x flips) through
    ``fn`` (chunks of ``max_batch``): the same numbers as ``MelanomaNet.forward_tta``, which runs
    the flips one after another, in one call per chunk instead of four."""
    flips = TTA_FLIPS if tta else ((),)
    n, k = x.shape[0], len(flips)
    lo_out, em_out = None, None
    step = max(1, max_batch // k)
    for s in range(0, n, step):
        xs = x[s:s + step]
        xb = torch.cat([torch.flip(xs, d) if d else xs for d in flips]) if k > 1 else xs
        lo, em = fn(xb)
        lo = torch.as_tensor(lo).float().reshape(k, -1).mean(0)
        em = torch.as_tensor(em).float().reshape(k, xs.shape[0], -1).mean(0)
        lo_out = lo if lo_out is None else torch.cat([lo_out, lo])
        em_out = em if em_out is None else torch.cat([em_out, em])
    return lo_out.numpy(), em_out.numpy()


# --------------------------------------------------------------------------- candidates

class _Head(torch.nn.Module):
    """(logits, embeddings) of a MelanomaNet as a plain module (what tracers and exporters take)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        emb = self.net.forward_features(x)
        return self.net.head(emb).squeeze(1), emb


def _eager(model, channels_last: bool, amp=None) -> Forward:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(model).float().eval().to(memory_format=fmt)

    @torch.inference_mode()
    def run(x):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            lo, em = net.forward_with_embedding(x.contiguous(memory_format=fmt))
        return lo.float(), em.float()

    run.module = net
    return run


def build_eager_fp32(model, size):
    return _eager(model, channels_last=False)


def build_channels_last(model, size):
    return _eager(model, channels_last=True)


def build_bf16_autocast(model, size):
    if not bf16_available():
        raise Unavailable("this CPU offers no native bf16 (oneDNN reports none)")
    return _eager(model, channels_last=True, amp=torch.bfloat16)


def build_jit_freeze(model, size):
    net = _Head(copy.deepcopy(model).float().eval().to(memory_format=torch.channels_last)).eval()
    example = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))

    @torch.no_grad()
    def run(x):
        lo, em = traced(x.contiguous(memory_format=torch.channels_last))
        return lo, em

    run.module = traced
    return run


def build_int8_dynamic(model, size):
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as exc:  # pragma: no cover -- removed from a future torch
        raise Unavailable(f"torch.ao.quantization.quantize_dynamic missing: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(copy.deepcopy(model).float().eval(), {torch.nn.Linear}, dtype=torch.qint8)
    q = q.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x):
        return q.forward_with_embedding(x.contiguous(memory_format=torch.channels_last))

    run.module = q
    return run


_onnx_cache: dict = {}  # (id(model), size) -> exported bytes, while one model is being measured


def _onnx_bytes(model, size) -> bytes:
    """The member exported to ONNX (dynamic batch); ONNX Runtime and OpenVINO share one export."""
    key = (id(model), int(size))
    if key in _onnx_cache:
        return _onnx_cache[key]
    try:
        import onnx  # noqa: F401 -- torch's exporter needs it
    except ImportError as exc:
        raise Unavailable("the onnx package is not installed (pip install -r requirements-runtimes.txt)") from exc
    buf = io.BytesIO()
    net = _Head(copy.deepcopy(model).float().eval()).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, size, size),), buf, dynamo=False, input_names=["x"],
                          output_names=["logits", "embeddings"], opset_version=17,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "embeddings": {0: "n"}})
    _onnx_cache.clear()
    _onnx_cache[key] = buf.getvalue()
    return _onnx_cache[key]


def build_onnxruntime(model, size):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Unavailable("onnxruntime is not installed (optional: pip install -r requirements-runtimes.txt)") from exc
    data = _onnx_bytes(model, size)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def run(x):
        lo, em = sess.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(lo), torch.from_numpy(em)

    run.module = sess
    return run


def build_openvino(model, size):
    try:
        import openvino as ov
    except ImportError as exc:
        raise Unavailable("openvino is not installed (optional: pip install -r requirements-runtimes.txt)") from exc
    with tempfile.TemporaryDirectory() as tmp:  # via ONNX: no tracing differences from onnxruntime
        path = os.path.join(tmp, "m.onnx")
        with open(path, "wb") as fh:
            fh.write(_onnx_bytes(model, size))
        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()

    def run(x):
        res = req.infer({0: x.contiguous().numpy()})
        return torch.from_numpy(np.array(res[compiled.output(0)])), torch.from_numpy(np.array(res[compiled.output(1)]))

    run.module = compiled
    return run


def build_torch_compile(model, size):
    if not _env_flag("ANALYSIS_RUNTIME_COMPILE"):
        raise Unavailable("skipped: torch.compile (inductor) takes tens of seconds per member on a 2-core "
                          "CPU, over the probe budget; set ANALYSIS_RUNTIME_COMPILE=1 to measure it")
    net = _Head(copy.deepcopy(model).float().eval().to(memory_format=torch.channels_last)).eval()
    compiled = torch.compile(net)  # default mode; shapes it has not seen compile again (on first use)

    @torch.inference_mode()
    def run(x):
        return compiled(x.contiguous(memory_format=torch.channels_last))

    run.module = compiled
    return run


BUILDERS: dict[str, Callable] = {
    "eager-fp32": build_eager_fp32,
    "channels-last": build_channels_last,
    "bf16-autocast": build_bf16_autocast,
    "jit-freeze": build_jit_freeze,
    "int8-dynamic": build_int8_dynamic,
    "onnxruntime": build_onnxruntime,
    "openvino": build_openvino,
    "torch-compile": build_torch_compile,
}


def candidate_names() -> list[str]:
    """Candidates in measuring order; env ANALYSIS_RUNTIME_CANDIDATES (comma list) narrows them."""
    wanted = [c.strip() for c in os.environ.get("ANALYSIS_RUNTIME_CANDIDATES", "").split(",") if c.strip()]
    names = [n for n in ORDER if not wanted or n in wanted or n == REFERENCE]
    return names


# --------------------------------------------------------------------------- measuring

@dataclass
class MemberRuntime:
    """What a member runs with: the chosen candidate's forward and the record of the choice."""
    name: str
    forward: Forward
    report: dict = field(default_factory=dict)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _time(fn: Forward, x: torch.Tensor, tta: bool, reps: int, budget_s: float) -> float:
    """Best seconds per call over up to ``reps`` calls (after one warm-up), within ``budget_s``."""
    tta_forward(fn, x, tta)  # warm-up: first-call allocations, kernel selection, lazy init
    best, t_end = float("inf"), time.perf_counter() + budget_s
    for i in range(reps):
        t0 = time.perf_counter()
        tta_forward(fn, x, tta)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end and i >= 0:
            break
    return best


def measure_member(model, *, size: int, normalise: Callable[[np.ndarray], torch.Tensor], tta: bool,
                   tolerance: float = DEFAULT_TOLERANCE, emb_tolerance: float = EMBEDDING_TOLERANCE,
                   names: list[str] | None = None, reps: int = 3, deadline: float | None = None,
                   builders: dict | None = None, keep: bool = False) -> tuple[dict, dict[str, Forward]]:
    """Build and measure each candidate for one member network.

    Speed is measured at the single-upload shape (1 image, with its TTA flips in one batch): that
    is what decides the time from upload to score. Accuracy: every probe image (4) against the
    eager fp32 reference. Returns ``(report, forwards)``: the report lists every candidate with
    ``ms_per_image``, ``max_abs_dp``, ``emb_rel_err``, ``accepted`` and ``reason``, and names the
    ``chosen`` one; ``forwards`` holds the chosen one's forward by name (every accepted one with
    ``keep``, as the benchmark wants).
    """
    builders = builders or BUILDERS
    names = list(names or candidate_names())
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    names.sort(key=lambda n: (n != REFERENCE,))  # the reference first
    arrays = probe_arrays(size, n=4)
    x_all = normalise(arrays)
    x_one = x_all[:1]
    rows, forwards = [], {}
    ref_p = ref_e = None
    for name in names:
        row = {"candidate": name}
        rows.append(row)
        if deadline is not None and time.perf_counter() > deadline and name != REFERENCE:
            row.update(accepted=False, reason="skipped: probe time budget spent")
            continue
        t0 = time.perf_counter()
        try:
            fn = builders[name](model, size)
        except Unavailable as exc:
            row.update(accepted=False, reason=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 -- a runtime that fails to build is just not used
            if name == REFERENCE:
                raise
            row.update(accepted=False, reason=f"could not be built: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        row["build_s"] = round(time.perf_counter() - t0, 2)
        try:
            lo, em = tta_forward(fn, x_all, tta)
            left = 3.0 if deadline is None else max(0.5, min(3.0, deadline - time.perf_counter()))
            sec = _time(fn, x_one, tta, reps, left)
        except Exception as exc:  # noqa: BLE001
            if name == REFERENCE:  # the model itself fails: the caller reports it
                raise
            row.update(accepted=False, reason=f"failed on the probe batch: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        p = _sigmoid(lo)
        row["ms_per_image"] = round(sec * 1000, 2)
        if name == REFERENCE:
            ref_p, ref_e = p, em.astype(np.float64)
            row.update(max_abs_dp=0.0, emb_rel_err=0.0, accepted=True, reason="reference (fp32 as trained)")
            forwards[name] = fn
            continue
        dp = float(np.max(np.abs(p - ref_p))) if np.all(np.isfinite(p)) else float("inf")
        denom = np.linalg.norm(ref_e, axis=1)
        de = float(np.max(np.linalg.norm(em.astype(np.float64) - ref_e, axis=1) / np.maximum(denom, 1e-12)))
        if not np.isfinite(de):
            de = float("inf")
        row.update(max_abs_dp=round(dp, 6) if np.isfinite(dp) else "inf",
                   emb_rel_err=round(de, 6) if np.isfinite(de) else "inf")
        if not dp <= tolerance:
            row.update(accepted=False, reason=f"max |dp| {dp:.4g} exceeds the tolerance {tolerance}")
        elif not de <= emb_tolerance:
            row.update(accepted=False, reason=f"embedding error {de:.4g} exceeds {emb_tolerance}")
        else:
            row.update(accepted=True, reason="within tolerance")
            forwards[name] = fn
    # Run-off: the accepted candidates timed in turns (round robin), so a burst of load from other
    # processes hits them alike instead of deciding the choice.
    ok = [r for r in rows if r.get("accepted") and "ms_per_image" in r]
    if len(ok) > 1:
        best = {r["candidate"]: r["ms_per_image"] / 1000 for r in ok}
        run_off_end = time.perf_counter() + 3.0 if deadline is None else max(deadline, time.perf_counter() + 1.0)
        for rnd in range(reps + 2):
            for r in ok:
                t0 = time.perf_counter()
                tta_forward(forwards[r["candidate"]], x_one, tta)
                best[r["candidate"]] = min(best[r["candidate"]], time.perf_counter() - t0)
            if rnd >= 1 and time.perf_counter() > run_off_end:
                break
        for r in ok:
            r["ms_per_image"] = round(best[r["candidate"]] * 1000, 2)
    best = min(ok, key=lambda r: r["ms_per_image"]) if ok else None
    chosen = best["candidate"] if best else REFERENCE
    _onnx_cache.clear()
    if not keep:
        forwards = {k: v for k, v in forwards.items() if k == chosen}
    ref_ms = next((r.get("ms_per_image") for r in rows if r["candidate"] == REFERENCE), None)
    for r in rows:
        r["chosen"] = r["candidate"] == chosen
        if r["chosen"] and r["candidate"] != REFERENCE:
            r["reason"] = "fastest within tolerance"
        elif r.get("accepted") and r["candidate"] != chosen:
            r["reason"] = "within tolerance, but slower than the chosen one"
    report = {"chosen": chosen, "candidates": rows, "reference_ms_per_image": ref_ms,
              "speedup_vs_fp32": round(ref_ms / best["ms_per_image"], 2) if best and ref_ms else 1.0,
              "tolerance": tolerance, "embedding_tolerance": emb_tolerance, "probe_images": int(len(arrays)),
              "timed_batch": f"1 image x {len(TTA_FLIPS) if tta else 1} flips"}
    return report, forwards


def build_chosen(model, size: int, name: str, builders: dict | None = None) -> tuple[str, Forward]:
    """(name, forward) of the runtime a cached decision names; eager fp32 if it cannot be built."""
    builders = builders or BUILDERS
    try:
        return name, builders[name](model, size)
    except Exception:  # noqa: BLE001 -- e.g. the optional package was uninstalled since
        return REFERENCE, builders[REFERENCE](model, size)
    finally:
        _onnx_cache.clear()


def choose_runtime(bundle, *, sha256: str = "", tolerance: float | None = None, cached: dict | None = None,
                   budget_s: float | None = None, names: list[str] | None = None,
                   builders: dict | None = None) -> dict:
    """Give every member of ``bundle`` its runtime; return the decision (a JSON-able dict).

    ``cached``: a decision recorded earlier; when its ``machine`` equals this machine's key (same
    weights, CPU, threads and libraries) the named runtimes are built without measuring again.
    """
    tol = DEFAULT_TOLERANCE if tolerance in (None, "") else float(tolerance)
    key = machine_key(sha256)
    t_start = time.perf_counter()
    if cached and cached.get("machine") == key and len(cached.get("members", [])) == len(bundle.members) \
            and cached.get("tolerance") == tol:
        bundle.runtimes = {}
        for i, m in enumerate(bundle.members):
            name, fn = build_chosen(m.model, m.input_size, cached["members"][i]["chosen"], builders)
            bundle.runtimes[i] = MemberRuntime(name, fn)
        decision = dict(cached)
        decision["reused"] = True
        decision["apply_s"] = round(time.perf_counter() - t_start, 2)
        return decision
    budget = float(budget_s if budget_s is not None else os.environ.get("ANALYSIS_RUNTIME_BUDGET_S") or DEFAULT_BUDGET_S)
    members, runtimes = [], {}
    for i, m in enumerate(bundle.members):
        # Each member gets an equal share of what is left of the budget.
        deadline = time.perf_counter() + (budget - (time.perf_counter() - t_start)) / (len(bundle.members) - i)
        report, forwards = measure_member(
            m.model, size=m.input_size, normalise=lambda a, m=m: bundle.normalise(m, a), tta=m.tta,
            tolerance=tol, names=names, deadline=deadline, builders=builders)
        report = {"member": m.name, "input_size": m.input_size, **report}
        members.append(report)
        fn = forwards.get(report["chosen"]) or build_eager_fp32(m.model, m.input_size)
        runtimes[i] = MemberRuntime(report["chosen"], fn, report)
        forwards.clear()
    bundle.runtimes = runtimes
    return {"machine": key, "tolerance": tol, "members": members,
            "chosen": "+".join(r["chosen"] for r in members) if len(members) > 1 else members[0]["chosen"],
            "cpu_flags": cpu_flags(), "probe_s": round(time.perf_counter() - t_start, 2), "reused": False,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --------------------------------------------------------------------------- backwards compatible

def choose_precision(bundle, *, force: str | None = None, tolerance: float | None = None, reps: int = 2) -> str:
    """Precision only (fp32 or bf16 autocast per member), as before runtimes were measured: kept for
    ``force`` ("fp32"/"bf16") callers such as tests and the benchmark; returns a short description."""
    names = ["eager-fp32", "channels-last"]
    if force == "bf16" or (force is None and bf16_available()):
        names.append("bf16-autocast")
    tol = 1.0 if force == "bf16" else tolerance
    decision = choose_runtime(bundle, tolerance=tol, names=names)
    if force == "bf16":
        for i, m in enumerate(bundle.members):
            if bf16_available():
                bundle.runtimes[i] = MemberRuntime("bf16-autocast", build_bf16_autocast(m.model, m.input_size))
    elif force == "fp32":
        for i, m in enumerate(bundle.members):
            if bundle.runtimes[i].name == "bf16-autocast":
                bundle.runtimes[i] = MemberRuntime("channels-last", build_channels_last(m.model, m.input_size))
    bundle.runtime_decision = decision
    return bundle.precision
