"""What a result means for the clinician: its score, THE threshold, "is this analysis flagged".
ONE place for the flag rule, so pages, chart, API (and the review queue) agree.

Every score of a model version -- the image probability and the context-adjusted final score --
is a calibrated melanoma probability on one scale, compared with one operating threshold: the
version's (``ModelVersion.threshold``, chosen on held-out data for a stated sensitivity).

No torch: the web process imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from .models import Analysis, ModelVersion

SCALE = "calibrated_probability"
SCALE_DESCRIPTION = ("calibrated melanoma probability (0-1) on the model version's scale: the image "
                     "probability and the context-adjusted score are both on it and share one threshold")


def threshold_for(analysis: Analysis | None, version: ModelVersion | None = None, *, cache: dict | None = None
                  ) -> float | None:
    """THE operating threshold for this analysis' score: its model version's (one per version)."""
    version = version if version is not None else getattr(analysis, "model_version", None)
    return None if version is None else float(version.threshold)


def is_flagged(analysis: Analysis | None, *, threshold: float | None = None) -> bool:
    """THE flag rule: a finished analysis whose shown score is at or above the version's threshold."""
    if analysis is None or analysis.status != Analysis.Status.DONE:
        return False
    score = analysis.display_score
    if score is None:
        return False
    threshold = threshold if threshold is not None else threshold_for(analysis)
    return threshold is not None and score >= threshold


def level_for(score: float | None, threshold: float | None, flagged: bool) -> str | None:
    """Badge colour: high (flagged), intermediate (at least half the threshold), low."""
    if score is None or threshold is None:
        return None
    if flagged:
        return "high"
    return "intermediate" if score >= threshold / 2 else "low"


def is_outlier(distance: float | None, distances: list[float]) -> bool:
    """The patient's "ugly duckling": the lesion farthest from the patient's others (of at least three
    with a distance), clearly above the typical (median) distance."""
    if distance is None or len(distances) < 3:
        return False
    median = sorted(distances)[len(distances) // 2]
    return distance >= max(distances) and distance > 1.5 * max(median, 1e-6)


def image_result(image, *, active_version) -> dict:
    """What the result partial of one image shows, decided here (the template tag only formats it):
    the analysis by the active version (prefetched by ``inference.selectors.analysis_prefetch()`` at
    no query, else looked up), its state, score, threshold, flag, badge level and whether the page
    keeps polling. ``active_version`` is a callable, called only when nothing was prefetched."""
    from . import selectors

    analysis = None
    prefetched = getattr(image, selectors.ACTIVE_ATTR, None)
    if prefetched:
        analysis = prefetched[0]
        version = analysis.model_version
    else:
        version = active_version()
        if prefetched is None and version is not None:
            analysis = selectors.result_for_image(image, version)
    if version is None:
        state = "no_model"
    elif analysis is None:
        state = "not_queued"
    else:
        state = analysis.status
    score = analysis.display_score if analysis is not None else None
    level = threshold = None
    flagged = False
    if score is not None and version is not None:
        threshold = threshold_for(analysis, version)
        flagged = is_flagged(analysis, threshold=threshold)
        level = level_for(score, threshold, flagged)
    pending = bool(analysis is not None and analysis.context_pending)
    return {
        "analysis": analysis, "version": version, "state": state, "score": score, "level": level,
        "threshold": threshold, "flagged": flagged, "context_pending": pending,
        "source": analysis.score_source if analysis is not None else None,
        "metrics": metrics_for(analysis) if analysis is not None and state == "done" else None,
        # Keep polling until the FINAL score is in (context pending counts as not final).
        "polling": state in ("queued", "running", "not_queued") or pending,
    }


@dataclass
class LesionResult:
    """A lesion's current result: the active version's analysis of its latest analysed image."""

    lesion_id: int
    analysis: Analysis
    threshold: float
    flagged: bool
    latest_result_at: object  # datetime of the newest finished analysis of the lesion

    @property
    def score(self) -> float:
        return self.analysis.display_score

    @property
    def version(self) -> ModelVersion:
        return self.analysis.model_version

    @property
    def image_id(self) -> int:
        return self.analysis.image_id

    @property
    def level(self) -> str | None:
        return level_for(self.score, self.threshold, self.flagged)

    @property
    def acquired_on(self):
        return self.analysis.image.acquired_on

    def snapshot(self) -> dict:
        v = self.version
        return {
            "analysis": self.analysis.pk, "image": self.image_id, "acquired_on": self.acquired_on.isoformat(),
            "score": round(float(self.score), 6), "score_source": self.analysis.final_score_source or "image",
            "threshold": round(float(self.threshold), 6), "flagged": self.flagged,
            "model_version": v.name, "model_version_id": v.pk, "validated": bool(v.validated),
        }


def active_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()


def done_analyses(image_filter: dict, version: ModelVersion | None = None):
    version = version if version is not None else active_version()
    if version is None:
        return Analysis.objects.none()
    return (Analysis.objects.filter(model_version=version, status=Analysis.Status.DONE, **image_filter)
            .select_related("model_version", "image").defer("embedding", "context_features"))


def lesion_results(lesion_ids, *, version: ModelVersion | None = None) -> dict[int, LesionResult]:
    """{lesion id: its current result} for lesions with at least one finished analysis by the
    active model version. One query for all the lesions."""
    ids = list(lesion_ids)
    if not ids:
        return {}
    cache: dict = {}
    by_lesion: dict[int, list[Analysis]] = {}
    for a in done_analyses({"image__lesion_id__in": ids}, version):
        by_lesion.setdefault(a.image.lesion_id, []).append(a)
    out = {}
    for lesion_id, rows in by_lesion.items():
        current = max(rows, key=lambda a: (a.image.acquired_on, a.image.uploaded_at, a.image_id))
        threshold = threshold_for(current, cache=cache)
        latest = max((a.finished_at for a in rows if a.finished_at is not None), default=None)
        out[lesion_id] = LesionResult(
            lesion_id=lesion_id, analysis=current, threshold=threshold,
            flagged=is_flagged(current, threshold=threshold), latest_result_at=latest or timezone.now(),
        )
    return out


def image_results(image_ids, *, version: ModelVersion | None = None) -> dict[int, LesionResult]:
    """{image id: that image's result} (same shape as a lesion's), for comparisons and reports."""
    cache: dict = {}
    out = {}
    for a in done_analyses({"image_id__in": list(image_ids)}, version):
        threshold = threshold_for(a, cache=cache)
        out[a.image_id] = LesionResult(lesion_id=a.image.lesion_id, analysis=a, threshold=threshold,
                                       flagged=is_flagged(a, threshold=threshold),
                                       latest_result_at=a.finished_at)
    return out


def metrics_for(analysis: Analysis | None) -> dict | None:
    """The metrics of the model that produced this analysis' score: the image model's held-out
    metrics for an image score, the context model's (image + context, on simulated patients) for a
    context score."""
    if analysis is None or analysis.display_score is None:
        return None
    version = analysis.model_version
    if analysis.score_source == "context":
        cm = (version.context_model_summary or {}).get("metrics") or {}
        return {"producer": "image model + patient context", "roc_auc": cm.get("roc_auc_context"),
                "roc_auc_image_only_same_data": cm.get("roc_auc_image_only"),
                "sensitivity": cm.get("sensitivity_context"), "specificity": cm.get("specificity_context"),
                "data": cm.get("data"), "assumption": cm.get("assumption")}
    m = version.metrics or {}
    return {"producer": "image model", "roc_auc": version.roc_auc, "roc_auc_ci": version.roc_auc_ci,
            "sensitivity": m.get("sensitivity"), "specificity": m.get("specificity"),
            "data": "held-out images"}
