"""Formatting only: what to show is decided by ``inference.scoring`` / ``inference.selectors``.

``{% image_result image as r %}``: the active version's analysis of an image, for the partial.

With the images fetched through ``inference.selectors.analysis_prefetch()`` / ``with_results()``
this costs no query per image; the active model version is looked up once per request.
"""
from django import template

from .. import scoring

register = template.Library()

_MISSING = object()


def _active_version(context):
    request = context.get("request")
    cached = getattr(request, "_inference_active_version", _MISSING) if request is not None else _MISSING
    if cached is _MISSING:
        cached = scoring.active_version()  # once per request
        if request is not None:
            request._inference_active_version = cached
    return cached


@register.simple_tag(takes_context=True)
def image_result(context, image):
    """The result of ``inference.scoring.image_result`` (which decides state, flag and level)."""
    return scoring.image_result(image, active_version=lambda: _active_version(context))


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


def distinct_digits(value: float, threshold: float | None, max_digits: int = 3) -> int:
    """Fewest decimals (of a percentage) that keep a score and the threshold apart when printed."""
    if threshold is None or value == threshold:
        return 0
    for d in range(max_digits + 1):
        if round(100 * value, d) != round(100 * threshold, d):
            return d
    return max_digits


@register.filter
def percent_vs(value, threshold):
    """``{{ score|percent_vs:threshold }}``: a percentage with enough decimals to tell it apart
    from the threshold (41% vs 40.8%, never "41%" below a "41%" threshold)."""
    if value is None:
        return "–"
    try:
        v = float(value)
        t = None if threshold in (None, "") else float(threshold)
    except (TypeError, ValueError):
        return "–"
    return f"{100 * v:.{distinct_digits(v, t)}f}%"
