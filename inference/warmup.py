"""Warm model before the first upload: each worker process loads the active model version, gives
its members their measured runtime (``training.runtime``; the decision recorded for this machine is
re-used, so a restart does not measure again) and runs one probe image through the whole path
(decode, batch, every member, combiner) before it takes its first task.

Wired from ``melanoma_site.celery``: on ``worker_init`` (the main process, after Celery's Django
fixup has installed its own per-process hooks) ``install`` connects ``on_process_init`` to
``worker_process_init``, so it runs in every prefork child after the fixup has dropped the
database connections inherited from the parent. A solo/threads pool has no child processes: there
``worker_ready`` warms the main process. The prefork pool waits for a child's start-up up to
``CELERY_WORKER_PROC_ALIVE_TIMEOUT`` seconds (settings), which covers a first measurement.

Nothing here imports torch at import time (the main worker process imports this module).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

_installed = False
last_warmup: dict = {}  # what the last warm-up in this process did (for logs and tests)


def warm_up() -> dict:
    """Load, probe and run the active model version once in this process. Never raises: a model
    that cannot load is reported by the first task on every row it claims."""
    from django.conf import settings
    from django.db import close_old_connections

    result: dict = {"warmed": False}
    if not getattr(settings, "ANALYSIS_WARMUP", True):
        result["reason"] = "ANALYSIS_WARMUP is off"
        return _done(result)
    t0 = time.perf_counter()
    try:
        from .services import active_model_version

        version = active_model_version()
        if version is None:
            result["reason"] = "no active model version"
            return _done(result)
        from training.runtime import probe_arrays

        from .predictor import predictor_for_version

        pred, loaded_now = predictor_for_version(version)
        # One image through the real path: first-call allocations and kernel choice happen now.
        decoded = [{s: probe_arrays(s, n=1, seed=99)[0] for s in pred.bundle.input_sizes}]
        pred.predict_arrays(decoded)
        result.update(warmed=True, version=version.pk, loaded_now=loaded_now, runtime=pred.precision,
                      reused=bool(pred.runtime_decision.get("reused")), load_ms=round(pred.load_ms, 1))
    except Exception as exc:  # noqa: BLE001 -- never keep a worker from starting
        log.exception("model warm-up failed; the first task will load the model")
        result["reason"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_old_connections()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return _done(result)


def _done(result: dict) -> dict:
    last_warmup.clear()
    last_warmup.update(result)
    if result.get("warmed"):
        log.info("model warm: version %s, runtime %s (%s), ready in %.1fs", result["version"], result["runtime"],
                 "decision re-used" if result["reused"] else "measured now", result["seconds"])
    else:
        log.info("model warm-up skipped: %s", result.get("reason"))
    return result


def on_process_init(**kwargs) -> None:
    warm_up()


def on_worker_ready(sender=None, **kwargs) -> None:
    """Solo and thread pools run tasks in the main process: warm it (prefork children warm themselves)."""
    pool = getattr(getattr(sender, "controller", None), "pool_cls", None)
    name = getattr(pool, "__module__", "") + "." + getattr(pool, "__name__", str(pool))
    if "prefork" in name or "asynpool" in name:
        return
    warm_up()


def install(**kwargs) -> None:
    """Connect the warm-up hooks (called on ``worker_init``; idempotent)."""
    global _installed
    if _installed:
        return
    from celery.signals import worker_process_init, worker_ready

    worker_process_init.connect(on_process_init, weak=False)
    worker_ready.connect(on_worker_ready, weak=False)
    _installed = True
