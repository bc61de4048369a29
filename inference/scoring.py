"""What a result means for the clinician: the threshold, "is this analysis flagged", each lesion's
current result. ONE place for the flag rule, so it can be changed for pages, queue, worklist,
API and report at once.

No torch: the web process imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from .models import Analysis, ModelVersion


def threshold_for(analysis: Analysis | None, version: ModelVersion | None = None, *, cache: dict | None = None
                  ) -> float | None:
    """The operating threshold on the scale of the score shown (``analysis.display_score``): a
    context-adjusted final score is compared with the context model's threshold, else the card's."""
    version = version if version is not None else getattr(analysis, "model_version", None)
    if version is None:
        return None
    if analysis is not None and analysis.final_score is not None and analysis.final_score_source == "context":
        key = ("context", version.pk)
        if cache is not None and key in cache:
            return cache[key]
        value = None
        try:
            from .context import score_threshold

            value = score_threshold(version)
        except Exception:  # noqa: BLE001 -- never break a page over the colour of a badge
            value = None
        value = float(value) if value is not None else float(version.threshold)
        if cache is not None:
            cache[key] = value
        return value
    return float(version.threshold)


def is_flagged(analysis: Analysis | None, *, threshold: float | None = None) -> bool:
    """THE flag rule: a finished analysis whose shown score is at or above its operating threshold."""
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
