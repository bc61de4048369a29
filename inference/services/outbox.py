"""The transactional outbox: what must happen is recorded in the database, messages are a hint.

Services record the work in the same transaction as the change that needs it:

- an analysis to run is an ``Analysis`` row in status ``queued``; ``enqueued_at`` says when a
  message was last sent for it (NULL: never);
- a patient whose context is stale is a ``PendingRescore`` row (``sent_at`` likewise).

After the transaction commits, :func:`dispatch_analyses` / :func:`dispatch_rescores` send the
task messages. That is the ONE place that talks to the broker for these tasks, and it never
raises: with the broker down it logs, stops trying (one short timeout, not one per message) and
leaves the rows pending. The sweeper (``queueing.sweep_stale``, a beat task) sends whatever is
still pending or was sent long ago without result, a bounded number per sweep. Rows that are
done need nothing: a duplicate message finds nothing to claim (the claim protocol).
"""
from __future__ import annotations

import logging
import uuid

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ..models import Analysis, PendingRescore

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """Publishing failed (connection refused, timeout, ...): the rows stay pending."""


def _publish(task, args, *, countdown=None) -> None:
    """Send one task message. Celery retries a failed publish briefly (CELERY_TASK_PUBLISH_RETRY_POLICY,
    short broker timeouts in settings), then raises kombu's OperationalError or the transport's
    own error; every error becomes BrokerUnavailable."""
    try:
        task.apply_async(args, countdown=countdown)
    except Exception as exc:  # noqa: BLE001 -- kombu/redis/socket errors alike: the row stays pending
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _after_commit(fn) -> None:
    """Run ``fn`` once the current transaction commits (now, outside one); never raises into the
    request (Django's robust on_commit logs any error)."""
    transaction.on_commit(fn, robust=True)


# --- analyses --------------------------------------------------------------------------------------

def send_analyses(ids, *, countdown=None) -> int:
    """Send analyze_image messages for these queued analyses now; returns how many went out.

    Stops at the first broker error (logged; the rest stay pending for the sweeper). Each row sent
    gets ``enqueued_at`` = now, so the sweeper leaves it alone for a while.
    """
    from ..tasks import analyze_image  # celery task module: no torch at import

    ids = list(ids)
    sent = []
    try:
        for pk in ids:
            _publish(analyze_image, (pk,), countdown=countdown)
            sent.append(pk)
    except BrokerUnavailable as exc:
        log.warning("broker unavailable (%s): %d of %d analyses left pending for the sweeper", exc,
                    len(ids) - len(sent), len(ids))
    if sent:
        try:
            Analysis.objects.filter(pk__in=sent, status=Analysis.Status.QUEUED).update(enqueued_at=timezone.now())
        except Exception:  # noqa: BLE001 -- the messages went out; at worst the sweeper sends them again
            log.exception("could not mark analyses %s as sent", sent[:20])
    return len(sent)


def dispatch_analyses(ids, *, countdown=None) -> None:
    """Send these analyses' messages once the current transaction commits (never raises)."""
    ids = list(ids)
    if ids:
        _after_commit(lambda: send_analyses(ids, countdown=countdown))


# --- patient-context re-scoring -------------------------------------------------------------------

def request_rescores(*, patient_ids, model_version_id: int) -> list[tuple[int, int]]:
    """Record (inside the caller's transaction) that these patients' context must be recomputed for
    this version: one ``PendingRescore`` row per patient, new token, not sent yet."""
    patient_ids = sorted({int(p) for p in patient_ids})
    if not patient_ids:
        return []
    now = timezone.now()
    PendingRescore.objects.bulk_create(
        [PendingRescore(patient_id=p, model_version_id=model_version_id, token=uuid.uuid4().hex,
                        requested_at=now, sent_at=None) for p in patient_ids],
        update_conflicts=True, unique_fields=["patient", "model_version"],
        update_fields=["token", "requested_at", "sent_at"],
    )
    return [(p, model_version_id) for p in patient_ids]


def send_rescores(pairs) -> int:
    """Send rescore_patient messages for these (patient, version) pairs that are still pending."""
    from ..tasks import rescore_patient

    pairs = list(pairs)
    sent = []
    try:
        for patient_id, version_id in pairs:
            _publish(rescore_patient, (patient_id, version_id))
            sent.append((patient_id, version_id))
    except BrokerUnavailable as exc:
        log.warning("broker unavailable (%s): %d of %d patient re-scorings left pending for the sweeper", exc,
                    len(pairs) - len(sent), len(pairs))
    now = timezone.now()
    for patient_id, version_id in sent:
        try:
            PendingRescore.objects.filter(patient_id=patient_id, model_version_id=version_id).update(
                sent_at=now, sends=F("sends") + 1)
        except Exception:  # noqa: BLE001
            log.exception("could not mark the re-scoring of patient %s as sent", patient_id)
    return len(sent)


def dispatch_rescores(pairs) -> None:
    pairs = list(pairs)
    if pairs:
        _after_commit(lambda: send_rescores(pairs))


def request_rescore(*, patient_id: int, model_version_id: int, dispatch: bool = True) -> None:
    pairs = request_rescores(patient_ids=[patient_id], model_version_id=model_version_id)
    if dispatch:
        dispatch_rescores(pairs)


# --- heatmaps --------------------------------------------------------------------------------------

def dispatch_heatmap(analysis_id: int) -> None:
    """Heatmaps are a courtesy after the score: sent after commit, never raising (a lost one is
    recomputed by ``reanalyze``)."""
    from ..tasks import compute_heatmap

    def send():
        try:
            _publish(compute_heatmap, (analysis_id,))
        except BrokerUnavailable as exc:
            log.warning("broker unavailable (%s): heatmap of analysis %s not queued", exc, analysis_id)

    _after_commit(send)
