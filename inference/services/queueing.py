"""Queueing: create analyses, send worker tasks, re-send what was lost (sweeper)."""
from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from patients.models import LesionImage

from ..models import Analysis, ModelVersion, PendingRescore
from . import outbox
from .claims import _stale_cutoff

log = logging.getLogger(__name__)


def active_model_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()

def queue_rescore(*, patient_id: int, model_version: ModelVersion | None = None) -> bool:
    """Record that a patient's context must be recomputed (active version), in the caller's
    transaction; the message goes after commit (outbox: a broker that is down loses nothing)."""
    version = model_version or active_model_version()
    if version is None:
        return False
    outbox.request_rescore(patient_id=patient_id, model_version_id=version.pk)
    return True


def queue_analyses(*, images, model_version: ModelVersion | None = None) -> list[Analysis]:
    """Create queued analyses of ``images`` for the active model version and enqueue them after commit.

    Called (through the ``images_stored`` signal) inside the upload's transaction: the rows are the
    outbox (queued, ``enqueued_at`` NULL until a message went out); messages go only when it
    commits, so a rolled-back upload queues nothing, and a broker that is down fails nothing (the
    sweeper sends them later). No active version: nothing is
    created; the images wait (pages say so) and are queued when a version is activated.
    """
    version = model_version or active_model_version()
    images = list(images)
    if version is None or not images:
        return []
    Analysis.objects.bulk_create(
        [Analysis(image_id=img.pk, model_version=version) for img in images], ignore_conflicts=True,
    )
    rows = list(Analysis.objects.filter(model_version=version, image_id__in=[i.pk for i in images],
                                        status=Analysis.Status.QUEUED))
    outbox.dispatch_analyses([a.pk for a in rows])
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
        outbox.dispatch_analyses(stale_queued)
        total += len(stale_queued)
    return total


def requeue_images(*, model_version: ModelVersion, image_ids, redo_done: bool = True) -> int:
    """Re-queue the analyses of these images for ``model_version`` (reanalyze). Returns how many."""
    image_ids = list(image_ids)
    with transaction.atomic():
        Analysis.objects.bulk_create(
            [Analysis(image_id=i, model_version=model_version) for i in image_ids],
            ignore_conflicts=True,
        )
        rows = Analysis.objects.filter(model_version=model_version, image_id__in=image_ids)
        if not redo_done:
            rows = rows.exclude(status=Analysis.Status.DONE)
        # Running rows are left to their worker (the sweeper re-sends them if it died).
        rows = rows.exclude(status=Analysis.Status.RUNNING)
        ids = list(rows.values_list("pk", flat=True))
        Analysis.objects.filter(pk__in=ids).update(
            status=Analysis.Status.QUEUED, attempts=0, error="", claim_token="", enqueued_at=None,
            started_at=None, finished_at=None,
        )
        outbox.dispatch_analyses(ids)
    return len(ids)


def _queue_of(task_name: str) -> str:
    """The queue this process sends ``task_name`` to (the router's choice, else the default queue)."""
    from melanoma_site.celery import app, route_task

    route = route_task(task_name, (), {}, {}) or {}
    return route.get("queue") or app.conf.task_default_queue


def broker_backlog(queue: str | None = None) -> int:
    """Messages waiting in ``queue`` (default: this app's default queue); 0 when the broker cannot say."""
    from melanoma_site.celery import app

    try:
        with app.connection_for_write() as conn:
            ok = conn.default_channel.queue_declare(queue=queue or app.conf.task_default_queue, passive=True)
            return int(ok.message_count or 0)
    except Exception:  # noqa: BLE001 -- an empty Redis queue does not exist ("not found"): nothing waits
        return 0


def sweep_stale(*, limit: int | None = None) -> dict:
    """The sweeper (beat task): send whatever is pending, a bounded number per sweep.

    1. Claims held by workers that no longer exist go back to queued (``inference.workers``).
    2. Running rows stale for ANALYSIS_STALE_SECONDS that used up their attempts are marked failed.
    3. The active version's analyses never sent (broker was down) and those sent longer than
       ANALYSIS_STALE_SECONDS ago without a result are sent, never-sent first.
    4. Done analyses whose patient context was never computed (``context_updated_at`` NULL) get a
       ``PendingRescore`` row; pending re-scorings never sent, or sent that long ago, are sent.

    No flood during a backlog: at most ``limit`` (ANALYSIS_SWEEP_LIMIT) messages per sweep, less
    the messages already waiting in the queue; rows sent recently are skipped.
    """
    from .. import workers

    limit = int(limit if limit is not None else getattr(settings, "ANALYSIS_SWEEP_LIMIT", 200))
    cutoff = _stale_cutoff()
    now = timezone.now()
    reclaimed = workers.reclaim_dead_claims()
    max_attempts = settings.ANALYSIS_MAX_ATTEMPTS
    stale_running = Q(status=Analysis.Status.RUNNING, started_at__lt=cutoff)
    failed = Analysis.objects.filter(stale_running, attempts__gte=max_attempts).update(
        status=Analysis.Status.FAILED, finished_at=now, claim_token="",
        error=f"Gave up after {max_attempts} attempts: the worker died or timed out each time it analysed "
              "this image.",
    )
    analysis_queue, rescore_queue = _queue_of("inference.tasks.analyze_image"), _queue_of("inference.tasks.rescore_patient")
    backlog = broker_backlog(analysis_queue)
    budget = max(0, limit - backlog)
    # Only the active version's: re-sending a retired version's backlog would make workers swap models.
    active = Analysis.objects.filter(model_version__is_active=True)
    never_sent = list(active.filter(status=Analysis.Status.QUEUED, enqueued_at__isnull=True)
                      .order_by("queued_at", "pk").values_list("pk", flat=True)[:budget])
    stale = (Q(status=Analysis.Status.QUEUED) | stale_running) & (Q(enqueued_at__lt=cutoff) | Q(enqueued_at__isnull=True))
    old = list(active.filter(stale).exclude(pk__in=never_sent).order_by("enqueued_at", "pk")
               .values_list("pk", flat=True)[: budget - len(never_sent)]) if budget > len(never_sent) else []
    sent = outbox.send_analyses([*never_sent, *old]) if never_sent or old else 0

    # Safety net: a done analysis whose context was never computed and nothing pending for it.
    missing = (Analysis.objects.filter(status=Analysis.Status.DONE, model_version__is_active=True,
                                       context_updated_at__isnull=True, finished_at__lt=cutoff)
               .exclude(Exists(PendingRescore.objects.filter(patient_id=OuterRef("image__lesion__patient_id"),
                                                             model_version_id=OuterRef("model_version_id"))))
               .values_list("model_version_id", "image__lesion__patient_id").distinct()[:limit])
    by_version: dict[int, set] = {}
    for version_id, patient_id in missing:
        by_version.setdefault(version_id, set()).add(patient_id)
    for version_id, patient_ids in by_version.items():
        outbox.request_rescores(patient_ids=patient_ids, model_version_id=version_id)
    if rescore_queue == analysis_queue:
        rescore_budget = max(0, budget - sent)
    else:
        rescore_backlog = broker_backlog(rescore_queue)
        backlog += rescore_backlog
        rescore_budget = max(0, limit - rescore_backlog)
    pending = list(PendingRescore.objects.filter(Q(sent_at__isnull=True) | Q(sent_at__lt=cutoff))
                   .order_by(F("sent_at").asc(nulls_first=True), "requested_at", "pk")
                   .values_list("patient_id", "model_version_id")[:rescore_budget])
    rescores = outbox.send_rescores(pending) if pending else 0
    # The pages' change stamps keep only each patient's newest row (patients.stamps).
    from patients import stamps

    compacted = stamps.compact() if stamps.enabled() else 0
    result = {"requeued": sent, "failed": failed, "reclaimed": len(reclaimed), "rescores": rescores,
              "backlog": backlog, "stamps_compacted": compacted}
    if sent or rescores or reclaimed or failed:
        log.info("sweeper: %s", result)
    return result


def heatmaps_enabled() -> bool:
    return bool(getattr(settings, "ANALYSIS_HEATMAPS", True))


def queue_heatmap(*, analysis_id: int) -> None:
    """Compute the analysis's heatmap after the current transaction commits (never before the score)."""
    if heatmaps_enabled():
        outbox.dispatch_heatmap(analysis_id)
