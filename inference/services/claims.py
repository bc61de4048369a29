"""The worker's claim protocol: claim a batch, store or fail each result, release, heatmap rows.

No torch here: the worker's task module calls these around the model.
"""
from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, TextField, Value
from django.db.models.functions import Concat
from django.utils import timezone

from ..models import Analysis, ModelVersion

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
            error=Concat(Value(f"Gave up after {max_attempts} attempts: the analysis of this image kept failing, "
                               "crashing or timing out the worker. "), F("error"), output_field=TextField()),
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

    from ..context import usable_context_model

    emb = np.asarray(embedding, dtype=np.float32).tobytes()
    # With a context model the final score is pending until the patient's re-scoring (pages say
    # "context pending" and keep polling); without one the image probability is final.
    pending = usable_context_model(analysis.model_version) is not None
    # A re-analysis replaces the explanation too: the old heatmap goes (the new one follows the score).
    old_heatmap = Analysis.objects.filter(pk=analysis.pk).values_list("heatmap", flat=True).first() or ""
    with transaction.atomic():
        n = Analysis.objects.filter(pk=analysis.pk, claim_token=token, status=Analysis.Status.RUNNING).update(
            status=Analysis.Status.DONE, probability=float(probability), embedding=emb, timings=timings,
            member_probabilities=member_probabilities or None,
            finished_at=timezone.now(), error="",
            final_score=None if pending else float(probability), final_score_source="" if pending else "image",
            context_explanation=None, previous_final_score=None, score_changed_at=None, score_change_reason="",
            heatmap="", heatmap_info={}, context_updated_at=None,
        )
        if n:
            # The patient's context is stale now: recorded with the result (outbox); the caller
            # dispatches one message per patient after its batch (outbox.dispatch_rescores).
            from .outbox import request_rescores

            patient_id = Analysis.objects.filter(pk=analysis.pk).values_list(
                "image__lesion__patient_id", flat=True).first()
            request_rescores(patient_ids=[patient_id], model_version_id=analysis.model_version_id)
    if n and old_heatmap:
        from django.core.files.storage import default_storage

        transaction.on_commit(lambda: default_storage.delete(old_heatmap))
    return bool(n)


def fail_analysis(*, analysis: Analysis, token: str, reason: str) -> bool:
    n = Analysis.objects.filter(pk=analysis.pk, claim_token=token, status=Analysis.Status.RUNNING).update(
        status=Analysis.Status.FAILED, error=reason[:2000], finished_at=timezone.now(),
    )
    return bool(n)


def release_claim(*, token: str, analysis_ids=None, reason: str = "") -> list[int]:
    """Put the analyses still held under ``token`` (or only ``analysis_ids`` of them) back to queued
    for another try (time limit, database trouble, a file that may come back). ``attempts`` is kept,
    so an image that fails every time still ends failed. The rows are pending again (``enqueued_at``
    NULL): the caller dispatches them (``outbox.dispatch_analyses``), else the sweeper does."""
    if not token:
        return []
    rows = Analysis.objects.filter(claim_token=token, status=Analysis.Status.RUNNING)
    if analysis_ids is not None:
        rows = rows.filter(pk__in=list(analysis_ids))
    ids = list(rows.values_list("pk", flat=True))
    Analysis.objects.filter(pk__in=ids, claim_token=token, status=Analysis.Status.RUNNING).update(
        status=Analysis.Status.QUEUED, started_at=None, claim_token="", enqueued_at=None,
        error=f"Another try after: {reason}"[:2000] if reason else "")
    return ids


def release_claims_of_workers(*, workers) -> list[int]:
    """Put the running analyses claimed by these (dead) workers back to queued; returns their ids.
    ``attempts`` is kept (a poison image that kills every worker still ends failed)."""
    workers = list(workers)
    if not workers:
        return []
    with transaction.atomic():
        ids = list(Analysis.objects.select_for_update(skip_locked=True)
                   .filter(status=Analysis.Status.RUNNING, worker__in=workers).values_list("pk", flat=True))
        Analysis.objects.filter(pk__in=ids, status=Analysis.Status.RUNNING).update(
            status=Analysis.Status.QUEUED, started_at=None, claim_token="", enqueued_at=None,
            error="Another try after: the worker that held it died.")
    return ids


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
