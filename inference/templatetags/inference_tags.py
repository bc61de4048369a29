"""``{% image_result image as r %}``: the active version's analysis of an image, for the partial.

With the images fetched through ``inference.services.analysis_prefetch()`` / ``with_results()``
this costs no query per image; the active model version is looked up once per request.
"""
from django import template

from .. import scoring, services

register = template.Library()

_MISSING = object()


def _active_version(context):
    request = context.get("request")
    cached = getattr(request, "_inference_active_version", _MISSING) if request is not None else _MISSING
    if cached is _MISSING:
        cached = services.active_model_version()
        if request is not None:
            request._inference_active_version = cached
    return cached


def _threshold_for(analysis, version) -> float:
    """The operating threshold on the scale of the score shown (inference.scoring decides)."""
    return scoring.threshold_for(analysis, version)


@register.simple_tag(takes_context=True)
def image_result(context, image):
    analysis = None
    prefetched = getattr(image, services.ACTIVE_ATTR, None)
    if prefetched:
        analysis = prefetched[0]
        version = analysis.model_version
    else:
        version = _active_version(context)
        if prefetched is None and version is not None:
            analysis = services.result_for_image(image, version)
    if version is None:
        state = "no_model"
    elif analysis is None:
        state = "not_queued"
    else:
        state = analysis.status
    score = analysis.display_score if analysis is not None else None
    level = threshold = None
    if score is not None and version is not None:
        threshold = _threshold_for(analysis, version)
        level = scoring.level_for(score, threshold, scoring.is_flagged(analysis, threshold=threshold))
    return {
        "analysis": analysis, "version": version, "state": state, "score": score, "level": level,
        "threshold": threshold,
        "polling": state in ("queued", "running", "not_queued"),
    }


@register.filter
def percent(value, digits=0):
    if value is None:
        return "–"
    try:
        return f"{float(value) * 100:.{int(digits)}f}%"
    except (TypeError, ValueError):
        return "–"


@register.inclusion_tag("inference/_score_badge.html")
def score_badge(result, compact=False):
    """A lesion's (or image's) current score as a badge naming the model version that produced it.

    ``result`` is an ``inference.scoring.LesionResult`` (or None: "no result yet")."""
    return {"result": result, "compact": compact}
