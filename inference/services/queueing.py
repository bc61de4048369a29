"""Queueing: create analyses, send worker tasks, re-send what was lost (sweeper)."""
from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from patients.models import LesionImage

from ..models import Analysis, ModelVersion
from .claims import _stale_cutoff

log = logging.getLogger(__name__)


def active_model_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()

def _send(ids, *, on_commit: bool = True) -> None:
    from ..tasks import analyze_image  # celery task module: no torch at import

    for pk in ids:
        if on_commit:
            analyze_image.delay_on_commit(pk)
        else:
            analyze_image.delay(pk)


def queue_rescore(*, patient_id: int) -> bool:
    """Re-score a patient's images (patient context) for the active version after commit."""
    from ..tasks import rescore_patient

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


def heatmaps_enabled() -> bool:
    return bool(getattr(settings, "ANALYSIS_HEATMAPS", True))


def queue_heatmap(*, analysis_id: int) -> None:
    """Compute the analysis's heatmap after the current transaction commits (never before the score)."""
    from ..tasks import compute_heatmap

    if heatmaps_enabled():
        compute_heatmap.delay_on_commit(analysis_id)
