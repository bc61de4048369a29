"""Celery tasks: thin, take ids, safe to run twice. No torch at import (the parent worker process,
the beat scheduler and the web process import this module); the model is loaded lazily in the
prefork child by ``inference.predictor`` and cached there (once per worker process).
"""
from __future__ import annotations

import io
import logging
import os
import socket
import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError

log = logging.getLogger(__name__)

def _limit(name: str, default: int) -> int:
    """A settings value if the project defines it, else the environment variable, else the default."""
    return int(getattr(settings, name, None) or os.environ.get(name) or default)


# The first task of a worker process also loads the model (seconds), so the limits are generous.
SOFT_TIME_LIMIT = _limit("ANALYSIS_SOFT_TIME_LIMIT", 300)
HARD_TIME_LIMIT = max(_limit("ANALYSIS_TIME_LIMIT", SOFT_TIME_LIMIT + 60), SOFT_TIME_LIMIT + 10)
DB_RETRY = dict(autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=120, retry_jitter=True,
                max_retries=8)


def _worker_name(task) -> str:
    from .workers import claim_name

    return claim_name(task)


# Errors that may go away by themselves: the claims are handed back for another try (attempts kept,
# so an image that fails every time still ends failed after ANALYSIS_MAX_ATTEMPTS).
TRANSIENT_ERRORS = (SoftTimeLimitExceeded, OperationalError, OSError)
RETRY_DELAY = 10  # seconds before another try of a released analysis


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             soft_time_limit=SOFT_TIME_LIMIT, time_limit=HARD_TIME_LIMIT, **DB_RETRY)
def analyze_image(self, analysis_id: int) -> dict:
    """Analyse this queued analysis, batched with up to ANALYSIS_BATCH_SIZE-1 other queued ones."""
    from . import services

    version = services.version_to_run(analysis_id=analysis_id)
    if version is None:
        return {"analysis": analysis_id, "claimed": 0}  # done, failed, gone or held by a live worker
    # Load (or reuse) the model before claiming, so a claim is held only for the inference itself.
    try:
        model = load_model(version)
    except TRANSIENT_ERRORS as exc:
        # A time limit or a passing error while loading: this analysis gets another try, and the try
        # counts (claim, then hand back), so a model that never loads ends in "failed", not a loop.
        token, claimed = services.claim_analyses(analysis_id=analysis_id, worker=_worker_name(self), batch_size=1)
        _release(token, reason=f"loading the model: {type(exc).__name__}: {exc}")
        if isinstance(exc, SoftTimeLimitExceeded):
            raise
        return {"analysis": analysis_id, "claimed": len(claimed), "released": len(claimed)}
    token, claimed = services.claim_analyses(analysis_id=analysis_id, worker=_worker_name(self))
    if not claimed:
        return {"analysis": analysis_id, "claimed": 0}
    try:
        done = run_claimed(token, claimed, model)
    except SoftTimeLimitExceeded:
        _release(token, reason="time limit")
        raise
    except OperationalError:
        try:  # give the rows back if the database lets us; the sweeper covers the rest
            _release(token, reason="database error")
        except Exception:  # noqa: BLE001
            pass
        raise
    return {"analysis": analysis_id, "claimed": len(claimed), "done": done}


def _release(token: str, *, reason: str, analysis_ids=None) -> list[int]:
    """Hand claims back for another try (attempts kept) and send them again after a short delay."""
    from . import services

    released = services.release_claim(token=token, analysis_ids=analysis_ids, reason=reason)
    if released:
        log.warning("%s: analyses %s released for another try", reason, released)
        services.outbox.send_analyses(released, countdown=RETRY_DELAY)
    return released


def load_model(version):
    """(predictor, loaded_now) from the per-process cache, or the exception if the model is unusable.

    A time limit and errors that may pass (database, I/O: the weights file on a share that comes
    back) are raised, not returned: the caller hands the claims back for another try."""
    from .predictor import predictor_for_version

    try:
        return predictor_for_version(version)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 -- reported on every claimed row by run_claimed
        log.exception("cannot load model version %s", version.pk)
        return exc


def run_claimed(token: str, claimed, model=None) -> int:
    """Decode, batch, infer and store the claimed analyses; then the patients' re-scoring."""
    from . import services

    version = claimed[0].model_version
    if model is None or (not isinstance(model, Exception) and model[0].version_id not in (None, version.pk)):
        try:
            model = load_model(version)
        except TRANSIENT_ERRORS as exc:
            _release(token, reason=f"loading the model: {type(exc).__name__}: {exc}")
            if isinstance(exc, SoftTimeLimitExceeded):
                raise
            return 0
    if isinstance(model, Exception):
        for a in claimed:
            services.fail_analysis(analysis=a, token=token,
                                   reason=f"The model version {version.name!r} could not be loaded: {model}")
        return 0
    pred, loaded_now = model

    arrays, ok, load_ms, unreadable = [], [], [], []
    for a in claimed:
        t0 = time.perf_counter()
        try:  # reading the stored bytes: an I/O error may pass (storage hiccup): another try
            with a.image.file.open("rb") as fh:
                data = fh.read()
        except OSError as exc:
            log.warning("analysis %s: reading %s failed: %s", a.pk, a.image.file.name, exc)
            unreadable.append(a.pk)
            continue
        try:  # decoding: a file that does not decode will not decode next time either
            arrays.append(pred.load(io.BytesIO(data)))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 -- undecodable image: failed now, with the reason
            services.fail_analysis(analysis=a, token=token,
                                   reason=f"The image could not be read: {type(exc).__name__}: {exc}")
            continue
        ok.append(a)
        load_ms.append((time.perf_counter() - t0) * 1000)
    if unreadable:
        _release(token, reason="stored file not readable", analysis_ids=unreadable)
    if not ok:
        return 0
    try:
        out = pred.predict_arrays(arrays)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # noqa: BLE001
        log.exception("inference failed on analyses %s", [a.pk for a in ok])
        for a in ok:
            services.fail_analysis(analysis=a, token=token, reason=f"Inference failed: {type(exc).__name__}: {exc}")
        return 0

    n, patients = len(ok), set()
    for i, a in enumerate(ok):
        timings = {
            "load_ms": round(load_ms[i], 2),
            "preprocess_ms": round(out.preprocess_ms / n, 2),
            "inference_ms": round(out.inference_ms / n, 2),
            "batch_inference_ms": round(out.inference_ms, 2),
            "batch_size": n,
            "precision": out.precision,
            "tta": pred.tta,
            "input_size": pred.input_size,
            "input_sizes": pred.bundle.input_sizes,
        }
        if loaded_now and i == 0:
            timings["model_load_ms"] = round(pred.load_ms, 1)
        if services.complete_analysis(analysis=a, token=token, probability=out.probabilities[i],
                                      embedding=out.embeddings[i], timings=timings,
                                      member_probabilities=out.members_of(i) if pred.bundle.is_ensemble else None):
            patients.add(a.image.lesion.patient_id)
    # complete_analysis recorded each patient's pending re-scoring with the result (outbox).
    rescore_after_analysis(sorted(patients), version.pk)
    # Explanation heatmaps come after the scores, as their own tasks: they never delay a score.
    for a in ok:
        services.queue_heatmap(analysis_id=a.pk)
    return n


def rescore_after_analysis(patient_ids, model_version_id: int) -> None:
    """The patients' context re-scoring after their analyses were stored (committed: the task runs
    in autocommit). Few patients (ANALYSIS_INLINE_RESCORE_MAX, the usual single upload): right here,
    in this task, so the final score does not wait for a second trip through the queue; more (a
    burst, a re-analysis): one ``rescore_patient`` task each. Re-scoring is idempotent, so a failure
    here falls back to the task."""
    from . import services
    from .context import rescore_patient as rescore

    inline = len(patient_ids) <= int(getattr(settings, "ANALYSIS_INLINE_RESCORE_MAX", 4))
    queued = []
    for patient_id in patient_ids:
        if inline:
            try:
                rescore(patient_id=patient_id, model_version_id=model_version_id)  # clears its outbox row
                continue
            except SoftTimeLimitExceeded:
                raise
            except Exception:  # noqa: BLE001 -- the task retries it on its own
                log.exception("inline re-scoring of patient %s failed; queued as a task", patient_id)
        queued.append((patient_id, model_version_id))
    # Pending rows were recorded with the results (complete_analysis): the outbox sends them
    # (never raising; the sweeper re-sends what the broker did not take).
    services.outbox.dispatch_rescores(queued)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             soft_time_limit=SOFT_TIME_LIMIT, time_limit=HARD_TIME_LIMIT, **DB_RETRY)
def rescore_patient(self, patient_id: int, model_version_id: int) -> int:
    """Thin wrapper: the patient-context module re-scores all of this patient's analyses."""
    from .context import rescore_patient as rescore

    return rescore(patient_id=patient_id, model_version_id=model_version_id)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             soft_time_limit=SOFT_TIME_LIMIT, time_limit=HARD_TIME_LIMIT, **DB_RETRY)
def compute_heatmap(self, analysis_id: int) -> bool:
    """Grad-CAM heatmap of a done analysis, with the network that scored it. Idempotent: an
    analysis that already has one (or is no longer done) is left alone. Returns whether one was stored."""
    return make_heatmap(analysis_id, worker=_worker_name(self))


def make_heatmap(analysis_id: int, *, worker: str = "") -> bool:
    from . import services
    from .heatmap import explain_image

    analysis = services.heatmap_to_compute(analysis_id=analysis_id)
    if analysis is None:
        return False
    model = load_model(analysis.model_version)
    if isinstance(model, Exception):
        services.fail_heatmap(analysis=analysis, reason=f"model could not be loaded: {model}")
        return False
    pred = model[0]
    t0 = time.perf_counter()
    try:
        with analysis.image.file.open("rb") as fh:
            png, info = explain_image(pred, fh, width=analysis.image.width, height=analysis.image.height)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # noqa: BLE001 -- an explanation failing never touches the score
        log.exception("heatmap of analysis %s failed", analysis_id)
        services.fail_heatmap(analysis=analysis, reason=f"{type(exc).__name__}: {exc}")
        return False
    info["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    info["model_version"] = analysis.model_version.name
    info["worker"] = worker or socket.gethostname()  # which worker (queue) made it
    return services.store_heatmap(analysis=analysis, png=png, info=info)


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90, **DB_RETRY)
def sweep_analyses() -> dict:
    """Periodic (beat): re-send analyses left queued or running-but-stale; fail exhausted ones."""
    from . import services

    return services.sweep_stale()
