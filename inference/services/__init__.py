"""Inference services (keyword-only functions that pages, API, admin, tasks and commands call).

One module per job:

- ``versions``: install, validate, activate and retire model versions;
- ``queueing``: create analyses and send worker tasks; the sweeper;
- ``claims``: the worker's claim protocol (claim, complete, fail, release; heatmap rows);
- ``outbox``: pending work recorded with the change, sent after commit by one robust dispatcher.

Page prefetch helpers are selectors (``inference.selectors``). No torch at import: the web process
imports this package.
"""
from . import outbox
from .claims import (claim_analyses, complete_analysis, fail_analysis, fail_heatmap, heatmap_to_compute,
                     release_claim, release_claims_of_workers, store_heatmap, version_to_run)
from .queueing import (active_model_version, heatmaps_enabled, queue_analyses, queue_heatmap, queue_missing,
                       queue_rescore, requeue_images, sweep_stale)
from .versions import (ModelInstallError, activate_model_version, deactivate_model_version,
                       install_model_version, record_runtime, recorded_runtime, replace_context_model,
                       runtime_summary, validate_checkpoint)

__all__ = [
    "ModelInstallError", "activate_model_version", "active_model_version", "claim_analyses",
    "complete_analysis", "deactivate_model_version", "fail_analysis", "fail_heatmap", "heatmap_to_compute",
    "heatmaps_enabled", "install_model_version", "outbox", "queue_analyses", "queue_heatmap", "queue_missing",
    "queue_rescore", "record_runtime", "recorded_runtime", "release_claim", "release_claims_of_workers",
    "replace_context_model", "runtime_summary", "requeue_images", "store_heatmap",
    "sweep_stale", "validate_checkpoint", "version_to_run",
]
