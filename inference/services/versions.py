"""Model versions: install a checkpoint or bundle, validate it, activate or retire it.

Torch is imported lazily (installing runs in management commands and the worker, never in a page).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

from django.conf import settings
from django.db import transaction

from training.hashing import file_sha256

from ..models import Analysis, ModelVersion
from .queueing import queue_missing

log = logging.getLogger(__name__)


class ModelInstallError(Exception):
    """A checkpoint that cannot be installed; the message says why."""


# ----------------------------------------------------------------------------- runtime decisions
RUNTIME_MACHINES_KEPT = 4


def recorded_runtime(*, model_version: ModelVersion, machine: dict) -> dict | None:
    """The runtime decision recorded for this version on this machine (same weights, CPU, threads,
    libraries: ``training.runtime.machine_key``), or None (the worker measures)."""
    rt = model_version.runtime or {}
    for decision in [rt.get("latest"), *(rt.get("other_machines") or [])]:
        if isinstance(decision, dict) and decision.get("machine") == machine:
            return decision
    return None


def record_runtime(*, model_version: ModelVersion, decision: dict) -> dict:
    """Record the worker's measured runtime choice (per member: every candidate's ms per image,
    max |dp| against fp32, accepted or rejected and why) in ``ModelVersion.runtime``.

    The newest decision is ``latest`` (what the admin and model card show); decisions of up to
    RUNTIME_MACHINES_KEPT - 1 other machines are kept so workers on different CPUs each re-use
    their own. Locked read-modify-write: two workers recording at once lose nothing."""
    if not isinstance(decision, dict) or "machine" not in decision or "members" not in decision:
        raise ValueError("a runtime decision needs 'machine' and 'members'")
    decision = {k: v for k, v in decision.items() if k not in ("reused", "apply_s")}
    with transaction.atomic():
        row = ModelVersion.objects.select_for_update().only("pk", "runtime").get(pk=model_version.pk)
        rt = row.runtime or {}
        others = [d for d in [rt.get("latest"), *(rt.get("other_machines") or [])]
                  if isinstance(d, dict) and d.get("machine") != decision["machine"]]
        runtime = {"latest": decision, "other_machines": others[:RUNTIME_MACHINES_KEPT - 1]}
        ModelVersion.objects.filter(pk=row.pk).update(runtime=runtime)
    model_version.runtime = runtime
    log.info("model version %s: runtime %s recorded (%s)", model_version.name, decision.get("chosen"),
             decision["machine"].get("cpu"))
    return runtime


def runtime_summary(*, model_version: ModelVersion) -> dict | None:
    """What the admin and the model card show of the latest runtime decision: the machine, the
    chosen runtime per member and every candidate's figures. None before a worker measured."""
    d = (model_version.runtime or {}).get("latest")
    if not isinstance(d, dict):
        return None
    machine = d.get("machine") or {}
    return {
        "chosen": d.get("chosen"), "measured_at": d.get("measured_at"), "probe_s": d.get("probe_s"),
        "tolerance": d.get("tolerance"), "cpu": machine.get("cpu"), "threads": machine.get("threads"),
        "versions": machine.get("versions") or {}, "bf16": machine.get("bf16"), "cpu_flags": d.get("cpu_flags") or [],
        "members": [{"member": m.get("member"), "input_size": m.get("input_size"), "chosen": m.get("chosen"),
                     "speedup_vs_fp32": m.get("speedup_vs_fp32"), "timed_batch": m.get("timed_batch"),
                     "embedding_tolerance": m.get("embedding_tolerance"),
                     "candidates": [c for c in m.get("candidates") or [] if isinstance(c, dict)]}
                    for m in d.get("members") or [] if isinstance(m, dict)],
        "other_machines": len((model_version.runtime or {}).get("other_machines") or []),
    }



def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise ModelInstallError(f"{what} file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ModelInstallError(f"{what} {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelInstallError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def validate_checkpoint(*, checkpoint_path, probe_size: int | None = None) -> tuple[dict, dict]:
    """Load a checkpoint with the shared loader and run it on a generated test image.

    Returns ``(card, report)``. Raises ModelInstallError with a readable reason. Imports torch.
    """
    import numpy as np
    from PIL import Image

    from ..predictor import Predictor, probe_arrays

    try:
        pred = Predictor.from_checkpoint(checkpoint_path, bf16=False)
    except Exception as exc:  # noqa: BLE001 -- anything the loader says is the reason
        raise ModelInstallError(f"{checkpoint_path}: cannot be loaded as a melanoma model: {exc}") from exc
    card = dict(pred.card)
    size = int(probe_size or pred.input_size)
    if not pred.bundle.is_ensemble:
        pred.input_size = size
    with tempfile.TemporaryDirectory() as tmp:
        # A JPEG larger than the input, so the real decode path (draft mode, resize) is exercised.
        test_image = Path(tmp) / "validation.jpg"
        Image.fromarray(probe_arrays(size * 2, n=1)[0]).save(test_image, quality=90)
        try:
            out = pred.predict_files([test_image])
        except Exception as exc:  # noqa: BLE001
            raise ModelInstallError(f"{checkpoint_path}: the model failed on a test image: {exc}") from exc
    if not (np.all(np.isfinite(out.probabilities)) and np.all(np.isfinite(out.embeddings))):
        raise ModelInstallError(f"{checkpoint_path}: the model produced non-finite output on a test image")
    report = {"probe_size": size, "probe_probability": float(out.probabilities[0]),
              "probe_inference_ms": round(out.inference_ms, 1),
              "architecture": pred.bundle.architecture, "members": pred.member_names,
              "input_sizes": pred.bundle.input_sizes, "embedding_dim": pred.bundle.embedding_dim}
    return card, report


def _context_model_for(checkpoint: Path, context_model_path=None) -> dict | None:
    """The validated context model given, else the ``context_model.json`` beside the checkpoint,
    else None."""
    path = Path(context_model_path) if context_model_path else checkpoint.parent / "context_model.json"
    if not (context_model_path or path.is_file()):
        return None
    context_model = _read_json(path, "context model")
    _check_context_model(context_model, path)
    return context_model


def install_model_version(*, checkpoint_path, name: str | None = None, activate: bool = False,
                          card_path=None, context_model_path=None, probe_size: int | None = None,
                          skip_if_installed: bool = False) -> ModelVersion:
    """Validate a checkpoint, copy it under MODEL_ROOT by its SHA-256 and record a ModelVersion.

    The same file installed twice is refused (ModelInstallError), or with ``skip_if_installed``
    the existing version is returned (and activated when ``activate``).
    """
    src = Path(checkpoint_path)
    if not src.is_file():
        raise ModelInstallError(f"checkpoint not found: {src}")
    sha = file_sha256(src)
    existing = ModelVersion.objects.filter(sha256=sha).first()
    if existing is not None:
        if not skip_if_installed:
            raise ModelInstallError(
                f"{src} is already installed as model version {existing.name!r} (sha256 {sha[:12]}...); "
                "nothing to do (use --skip-if-installed to accept this)")
        # Another machine (a worker with its own models folder) installs the same file: it gets
        # the weights under its MODEL_ROOT; the database already has the version.
        _store_weights(src, sha, existing.card)
        context_model = _context_model_for(src, context_model_path)
        if context_model is not None:
            replace_context_model(model_version=existing, context_model=context_model)
        if activate and not existing.is_active:
            activate_model_version(model_version=existing)
        return existing
    if name and ModelVersion.objects.filter(name=name).exists():
        raise ModelInstallError(f"a model version named {name!r} already exists; choose another --name")

    card, report = validate_checkpoint(checkpoint_path=src, probe_size=probe_size)
    if card_path:
        card.update(_read_json(Path(card_path), "model card"))
    context_model = _context_model_for(src, context_model_path)

    architecture = str(report.get("architecture") or card.get("architecture") or card.get("backbone")
                       or "se_resnet50")[:50]
    input_size = int(card.get("input_size") or 224)
    metrics = card.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ModelInstallError("the model card's 'metrics' must be a JSON object")
    threshold = card.get("threshold", 0.5)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ModelInstallError(f"the model card's threshold {threshold!r} is not a number") from exc
    if not 0.0 <= threshold <= 1.0:
        raise ModelInstallError(f"the model card's threshold {threshold} is outside [0, 1]")
    name = name or card.get("name") or f"{architecture}-{sha[:12]}"
    if ModelVersion.objects.filter(name=name).exists():
        name = f"{name}-{sha[:8]}"

    dest = _store_weights(src, sha, card)

    version = ModelVersion.objects.create(
        name=name[:100], architecture=architecture, input_size=input_size, sha256=sha,
        weights_path=dest.name, card=card, metrics=metrics, threshold=threshold,
        validated=bool(card.get("validated", False)), context_model=context_model,
    )
    log.info("installed model version %s (%s, %d px, sha256 %s): validation %s", version.name,
             architecture, input_size, sha[:12], report)
    version.validation_report = report
    if activate:
        activate_model_version(model_version=version)
    return version


def _store_weights(src: Path, sha: str, card: dict) -> Path:
    """Copy the checkpoint to this machine's MODEL_ROOT by its SHA-256 (once) with its card.
    Weights are local files on every worker machine, never media in the object store."""
    root = Path(settings.MODEL_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{sha}.pt"
    if not dest.exists():
        tmp = root / f".{sha}.{uuid.uuid4().hex}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    (root / f"{sha}.card.json").write_text(json.dumps(card, indent=2, default=str))
    return dest


def _check_context_model(context_model, path=None) -> None:
    from training.context_features import validate_context_model

    try:
        validate_context_model(context_model)
    except ValueError as exc:
        raise ModelInstallError(f"context model{f' {path}' if path else ''}: {exc}") from exc


def replace_context_model(*, model_version: ModelVersion, context_model: dict) -> int:
    """Give an installed version a new patient-context model (a retrained one shipped beside the
    same checkpoint) and re-score, after commit, every patient with results of that version.
    Returns the number of patients queued; 0 and nothing changed when the model is the same."""
    _check_context_model(context_model)
    if model_version.context_model == context_model:
        return 0
    from . import outbox

    with transaction.atomic():
        ModelVersion.objects.filter(pk=model_version.pk).update(context_model=context_model)
        model_version.context_model = context_model
        patient_ids = sorted(set(Analysis.objects.filter(
            model_version=model_version, status=Analysis.Status.DONE,
        ).values_list("image__lesion__patient_id", flat=True)))
        outbox.dispatch_rescores(outbox.request_rescores(patient_ids=patient_ids, model_version_id=model_version.pk))
    log.info("model version %s: context model replaced; re-scoring %d patients", model_version.name,
             len(patient_ids))
    model_version.context_model_replaced = True
    return len(patient_ids)


def activate_model_version(*, model_version: ModelVersion) -> int:
    """Make this the one active version and queue analyses of every image lacking a result for it.

    Returns the number of analyses queued.
    """
    with transaction.atomic():
        others = list(ModelVersion.objects.select_for_update().filter(is_active=True).exclude(pk=model_version.pk))
        was_active = ModelVersion.objects.select_for_update().filter(pk=model_version.pk, is_active=True).exists()
        ModelVersion.objects.filter(pk__in=[v.pk for v in others]).update(is_active=False)
        ModelVersion.objects.filter(pk=model_version.pk).update(is_active=True)
        for other in others:
            _audit_activation(other, active=False)
        if not was_active:
            _audit_activation(model_version, active=True)
        model_version.is_active = True
    return queue_missing(model_version=model_version)


def deactivate_model_version(*, model_version: ModelVersion) -> None:
    with transaction.atomic():
        if ModelVersion.objects.filter(pk=model_version.pk, is_active=True).update(is_active=False):
            _audit_activation(model_version, active=False)
    model_version.is_active = False


def _audit_activation(model_version: ModelVersion, *, active: bool) -> None:
    """An audit entry (django-auditlog, "update" of is_active) for a change the services make with
    update(), which sends no signal. The actor is the request's user (AuditlogMiddleware) or none
    (a command)."""
    from auditlog.models import LogEntry

    LogEntry.objects.log_create(model_version, action=LogEntry.Action.UPDATE,
                                changes={"is_active": [str(not active), str(active)]})
