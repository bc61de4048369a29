"""Inference business logic (keyword-only services).

No torch at module level: the web process imports this module. The functions that need the model
(``install_model_version``) import it lazily; they run in management commands and the worker.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Prefetch, Q
from django.utils import timezone

from patients.models import LesionImage
from training.hashing import file_sha256

from .models import Analysis, ModelVersion

log = logging.getLogger(__name__)


class ModelInstallError(Exception):
    """A checkpoint that cannot be installed; the message says why."""


# ------------------------------------------------------------------ model versions

def active_model_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()




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

    from .predictor import Predictor, probe_arrays

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

    root = Path(settings.MODEL_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{sha}.pt"
    if not dest.exists():
        tmp = root / f".{sha}.{uuid.uuid4().hex}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    (root / f"{sha}.card.json").write_text(json.dumps(card, indent=2, default=str))

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
    from .tasks import rescore_patient

    with transaction.atomic():
        ModelVersion.objects.filter(pk=model_version.pk).update(context_model=context_model)
        model_version.context_model = context_model
        patient_ids = sorted(set(Analysis.objects.filter(
            model_version=model_version, status=Analysis.Status.DONE,
        ).values_list("image__lesion__patient_id", flat=True)))
        for pid in patient_ids:
            rescore_patient.delay_on_commit(pid, model_version.pk)
    log.info("model version %s: context model replaced; re-scoring %d patients", model_version.name,
             len(patient_ids))
    model_version.context_model_replaced = True
    return len(patient_ids)


def activate_model_version(*, model_version: ModelVersion) -> int:
    """Make this the one active version and queue analyses of every image lacking a result for it.

    Returns the number of analyses queued.
    """
    with transaction.atomic():
        ModelVersion.objects.filter(is_active=True).exclude(pk=model_version.pk).update(is_active=False)
        ModelVersion.objects.filter(pk=model_version.pk).update(is_active=True)
        model_version.is_active = True
    return queue_missing(model_version=model_version)


def deactivate_model_version(*, model_version: ModelVersion) -> None:
    ModelVersion.objects.filter(pk=model_version.pk).update(is_active=False)
    model_version.is_active = False


# ------------------------------------------------------------------ queueing

def _send(ids, *, on_commit: bool = True) -> None:
    from .tasks import analyze_image  # celery task module: no torch at import

    for pk in ids:
        if on_commit:
            analyze_image.delay_on_commit(pk)
        else:
            analyze_image.delay(pk)


def queue_rescore(*, patient_id: int) -> bool:
    """Re-score a patient's images (patient context) for the active version after commit."""
    from .tasks import rescore_patient

    version = active_model_version()
    if version is None:
        return False
    rescore_patient.delay_on_commit(patient_id, version.pk)
    return True


def queue_analyses(*, images, model_version: ModelVersion | None = None) -> list[Analysis]:
    """Create queued analyses of ``images`` for the active model version and enqueue them after commit.

    Called (through the ``images_stored`` signal) inside the upload's transaction: messages go out
    only when it commits, so a rolled-back upload queues nothing. No active version: nothing is
    created; the images wait (pages say so) and are queued when a version is activated.
    """
    version = model_version or active_model_version()
    images = list(images)
    if version is None or not images:
        return []
    now = timezone.now()
    Analysis.objects.bulk_create(
        [Analysis(image_id=img.pk, model_version=version, enqueued_at=now) for img in images],
        ignore_conflicts=True,
    )
    rows = list(Analysis.objects.filter(model_version=version, image_id__in=[i.pk for i in images],
                                        status=Analysis.Status.QUEUED))
    _send([a.pk for a in rows])
    return rows


def queue_missing(*, model_version: ModelVersion, chunk: int = 500) -> int:
    """Queue analyses for every image that has none for this version (and re-send its queued ones)."""
    total = 0
    missing = LesionImage.objects.exclude(analyses__model_version=model_version).values_list("pk", flat=True)
    ids = list(missing)
    for start in range(0, len(ids), chunk):
        with transaction.atomic():
            total += len(queue_analyses(images=[LesionImage(pk=i) for i in ids[start:start + chunk]],
                                        model_version=model_version))
    stale_queued = list(Analysis.objects.filter(model_version=model_version, status=Analysis.Status.QUEUED)
                        .exclude(image_id__in=ids).values_list("pk", flat=True))
    if stale_queued:
        Analysis.objects.filter(pk__in=stale_queued).update(enqueued_at=timezone.now())
        _send(stale_queued, on_commit=False)
        total += len(stale_queued)
    return total


def requeue_images(*, model_version: ModelVersion, image_ids, redo_done: bool = True) -> int:
    """Re-queue the analyses of these images for ``model_version`` (reanalyze). Returns how many."""
    image_ids = list(image_ids)
    now = timezone.now()
    with transaction.atomic():
        Analysis.objects.bulk_create(
            [Analysis(image_id=i, model_version=model_version, enqueued_at=now) for i in image_ids],
            ignore_conflicts=True,
        )
        rows = Analysis.objects.filter(model_version=model_version, image_id__in=image_ids)
        if not redo_done:
            rows = rows.exclude(status=Analysis.Status.DONE)
        # Running rows are left to their worker (the sweeper re-sends them if it died).
        rows = rows.exclude(status=Analysis.Status.RUNNING)
        ids = list(rows.values_list("pk", flat=True))
        Analysis.objects.filter(pk__in=ids).update(
            status=Analysis.Status.QUEUED, attempts=0, error="", claim_token="", enqueued_at=now,
            started_at=None, finished_at=None,
        )
        _send(ids)
    return len(ids)


# ------------------------------------------------------------------ worker side (no torch)

def _stale_cutoff():
    return timezone.now() - timedelta(seconds=settings.ANALYSIS_STALE_SECONDS)


def _claimable(cutoff) -> Q:
    return Q(status=Analysis.Status.QUEUED) | Q(status=Analysis.Status.RUNNING, started_at__lt=cutoff)


def version_to_run(*, analysis_id: int) -> ModelVersion | None:
    """The model version of this analysis if it is claimable now (queued, or running but stale)."""
    row = Analysis.objects.filter(pk=analysis_id).filter(_claimable(_stale_cutoff())).select_related(
        "model_version").only("model_version").first()
    return row.model_version if row is not None else None


def claim_analyses(*, analysis_id: int, worker: str, batch_size: int | None = None) -> tuple[str, list[Analysis]]:
    """Claim this analysis and up to ``batch_size - 1`` other queued ones of the same model version.

    A claim is a conditional UPDATE (queued -> running, or running-but-stale -> running) that
    increments ``attempts`` and stamps a claim token; a row another worker claimed first is simply
    not matched. A row whose attempts already reached ANALYSIS_MAX_ATTEMPTS (it kept killing or
    timing out workers) is marked failed instead. Returns ``(token, claimed analyses)``.
    """
    batch_size = max(1, int(batch_size or settings.ANALYSIS_BATCH_SIZE))
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.ANALYSIS_STALE_SECONDS)
    claimable = _claimable(cutoff)
    first = Analysis.objects.filter(pk=analysis_id).filter(claimable).values("model_version_id", "attempts").first()
    if first is None:
        return "", []  # gone, done, failed or held by a live worker: nothing to do (duplicate delivery)
    if first["attempts"]:
        batch_size = 1  # tried before (maybe it crashed the worker): alone, so it cannot take others down
    token = uuid.uuid4().hex
    max_attempts = settings.ANALYSIS_MAX_ATTEMPTS
    with transaction.atomic():
        others = []
        if batch_size > 1:
            others = list(
                Analysis.objects.select_for_update(skip_locked=True)
                .filter(model_version_id=first["model_version_id"], status=Analysis.Status.QUEUED, attempts=0)
                .exclude(pk=analysis_id).order_by("queued_at", "pk").values_list("pk", flat=True)[: batch_size - 1]
            )
        ids = [analysis_id, *others]
        Analysis.objects.filter(pk__in=ids).filter(claimable, attempts__gte=max_attempts).update(
            status=Analysis.Status.FAILED, finished_at=now, claim_token="",
            error=f"Gave up after {max_attempts} attempts: the analysis of this image kept crashing or "
                  "timing out the worker.",
        )
        Analysis.objects.filter(pk__in=ids).filter(claimable).update(
            status=Analysis.Status.RUNNING, started_at=now, finished_at=None, attempts=F("attempts") + 1,
            worker=worker[:200], claim_token=token,
        )
    claimed = list(Analysis.objects.filter(claim_token=token, status=Analysis.Status.RUNNING)
                   .select_related("model_version", "image", "image__lesion").order_by("pk"))
    return token, claimed


def complete_analysis(*, analysis: Analysis, token: str, probability: float, embedding, timings: dict,
                      member_probabilities: dict | None = None) -> bool:
    """Store a result, only while this worker still holds the claim. Returns whether it was stored.
    ``member_probabilities``: each member network's own probability (ensemble versions)."""
    import numpy as np

    from .context import usable_context_model

    emb = np.asarray(embedding, dtype=np.float32).tobytes()
    # With a context model the final score is pending until the patient's re-scoring (pages say
    # "context pending" and keep polling); without one the image probability is final.
    pending = usable_context_model(analysis.model_version) is not None
    # A re-analysis replaces the explanation too: the old heatmap goes (the new one follows the score).
    old_heatmap = Analysis.objects.filter(pk=analysis.pk).values_list("heatmap", flat=True).first() or ""
    n = Analysis.objects.filter(pk=analysis.pk, claim_token=token, status=Analysis.Status.RUNNING).update(
        status=Analysis.Status.DONE, probability=float(probability), embedding=emb, timings=timings,
        member_probabilities=member_probabilities or None,
        finished_at=timezone.now(), error="",
        final_score=None if pending else float(probability), final_score_source="" if pending else "image",
        context_explanation=None, previous_final_score=None, score_changed_at=None, score_change_reason="",
        heatmap="", heatmap_info={},
    )
    if n and old_heatmap:
        from django.core.files.storage import default_storage

        transaction.on_commit(lambda: default_storage.delete(old_heatmap))
    return bool(n)


def fail_analysis(*, analysis: Analysis, token: str, reason: str) -> bool:
    n = Analysis.objects.filter(pk=analysis.pk, claim_token=token, status=Analysis.Status.RUNNING).update(
        status=Analysis.Status.FAILED, error=reason[:2000], finished_at=timezone.now(),
    )
    return bool(n)


def release_claim(*, token: str) -> list[int]:
    """Put the analyses still held under ``token`` back to queued (time limit, database trouble)."""
    if not token:
        return []
    rows = Analysis.objects.filter(claim_token=token, status=Analysis.Status.RUNNING)
    ids = list(rows.values_list("pk", flat=True))
    Analysis.objects.filter(pk__in=ids, claim_token=token, status=Analysis.Status.RUNNING).update(
        status=Analysis.Status.QUEUED, started_at=None, claim_token="", enqueued_at=timezone.now())
    return ids


def sweep_stale(*, limit: int = 1000) -> dict:
    """Re-send the active version's analyses left queued or running-but-stale (Redis was down, a
    worker died). Stale running rows that already used up their attempts are marked failed here.
    """
    cutoff = _stale_cutoff()
    now = timezone.now()
    max_attempts = settings.ANALYSIS_MAX_ATTEMPTS
    stale_running = Q(status=Analysis.Status.RUNNING, started_at__lt=cutoff)
    failed = Analysis.objects.filter(stale_running, attempts__gte=max_attempts).update(
        status=Analysis.Status.FAILED, finished_at=now, claim_token="",
        error=f"Gave up after {max_attempts} attempts: the worker died or timed out each time it analysed "
              "this image.",
    )
    stale = (Q(status=Analysis.Status.QUEUED) & (Q(enqueued_at__lt=cutoff) | Q(enqueued_at__isnull=True))) | (
        stale_running & Q(enqueued_at__lt=cutoff) | stale_running & Q(enqueued_at__isnull=True))
    # Only the active version's: re-sending a retired version's backlog would make workers swap models.
    ids = list(Analysis.objects.filter(stale, model_version__is_active=True).order_by("queued_at")
               .values_list("pk", flat=True)[:limit])
    if ids:
        Analysis.objects.filter(pk__in=ids).update(enqueued_at=now)
        _send(ids, on_commit=False)
        log.info("sweeper re-sent %d stale analyses", len(ids))
    return {"requeued": len(ids), "failed": failed}


# ------------------------------------------------------------------ explanation heatmaps

def heatmaps_enabled() -> bool:
    return bool(getattr(settings, "ANALYSIS_HEATMAPS", True))


def queue_heatmap(*, analysis_id: int) -> None:
    """Compute the analysis's heatmap after the current transaction commits (never before the score)."""
    from .tasks import compute_heatmap

    if heatmaps_enabled():
        compute_heatmap.delay_on_commit(analysis_id)


def heatmap_to_compute(*, analysis_id: int) -> Analysis | None:
    """The analysis if it is done and has no heatmap yet (else None: nothing to do, idempotent)."""
    return (Analysis.objects.filter(pk=analysis_id, status=Analysis.Status.DONE, heatmap="")
            .select_related("model_version", "image").defer("embedding").first())


def store_heatmap(*, analysis: Analysis, png: bytes, info: dict) -> bool:
    """Store a heatmap for a done analysis that has none; False (file removed) if another run or a
    re-analysis got there first. The file is written before the row claims it."""
    from django.core.files.base import ContentFile

    name = Analysis._meta.get_field("heatmap").generate_filename(analysis, "heatmap.png")
    storage = analysis.heatmap.storage
    name = storage.save(name, ContentFile(png))
    stored = Analysis.objects.filter(pk=analysis.pk, status=Analysis.Status.DONE, heatmap="").update(
        heatmap=name, heatmap_info={**info, "computed_at": timezone.now().isoformat()})
    if not stored:
        storage.delete(name)
    return bool(stored)


def fail_heatmap(*, analysis: Analysis, reason: str) -> None:
    Analysis.objects.filter(pk=analysis.pk, heatmap="").update(heatmap_info={"error": reason[:500]})


# ------------------------------------------------------------------ pages: bounded queries

ACTIVE_ATTR = "active_analyses"


def analysis_prefetch(model_version: ModelVersion | None = None, *, prefix: str = "") -> Prefetch:
    """``Prefetch`` of each image's analysis for the active version into ``image.active_analyses``.

    Use on a LesionImage queryset (``prefix=""``) or through a relation, e.g.
    ``Lesion.objects.prefetch_related(analysis_prefetch(prefix="images__"))``. One query for all
    images, so ``{% include "inference/_image_result.html" %}`` costs no query per image.
    """
    version = model_version if model_version is not None else active_model_version()
    qs = Analysis.objects.none() if version is None else (
        Analysis.objects.filter(model_version=version).select_related("model_version").defer("embedding"))
    return Prefetch(f"{prefix}analyses", queryset=qs, to_attr=ACTIVE_ATTR)


def with_results(images_qs, model_version: ModelVersion | None = None):
    return images_qs.prefetch_related(analysis_prefetch(model_version))


def result_for_image(image, model_version: ModelVersion | None = None) -> Analysis | None:
    """The analysis of ``image`` for the active version (prefetched when available)."""
    cached = getattr(image, ACTIVE_ATTR, None)
    if cached is not None:
        return cached[0] if cached else None
    if model_version is None:
        return None
    return (Analysis.objects.filter(image_id=image.pk, model_version=model_version)
            .select_related("model_version").defer("embedding").first())
