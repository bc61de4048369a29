"""What a result means for the clinician: its score, THE threshold, "is this analysis flagged".
ONE place for the flag rule, so pages, chart, API (and the review queue) agree.

Every score of a model version -- the image probability and the context-adjusted final score --
is a calibrated melanoma probability on one scale, compared with one operating threshold: the
version's (``ModelVersion.threshold``, chosen on held-out data for a stated sensitivity).

No torch: the web process imports this module.
"""
from __future__ import annotations

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
