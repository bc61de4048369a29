"""The analysis results the clinical pages show beside lesions (scores, flags, unreviewed results).

The records core does not import the app that produces results: ``settings.RESULTS_MODULE`` names
a module (``inference.scoring``) with ``lesion_results(lesion_ids) -> {lesion_id: result}`` where
each result has ``score``, ``flagged``, ``version`` (the model version), ``latest_result_at`` (when
the newest result of the lesion was produced) and ``snapshot()``. Without one, lesions have no
results and nothing is ever waiting for review.
"""
from __future__ import annotations

from importlib import import_module

from django.conf import settings


def provider():
    path = getattr(settings, "RESULTS_MODULE", "")
    return import_module(path) if path else None


def lesion_results(lesion_ids) -> dict:
    module = provider()
    ids = list(lesion_ids)
    return module.lesion_results(ids) if module is not None and ids else {}


def lesion_result_snapshot(lesion) -> dict | None:
    result = lesion_results([lesion.pk]).get(lesion.pk)
    return result.snapshot() if result is not None else None


def is_unreviewed(result, last_reviewed_at) -> bool:
    """A lesion has a result nobody has reviewed: a result newer than its latest review."""
    if result is None or result.latest_result_at is None:
        return False
    return last_reviewed_at is None or result.latest_result_at > last_reviewed_at
