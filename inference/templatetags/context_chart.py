"""Template tags for the patient-context chart and the per-analysis context breakdown.

    {% load context_chart %}
    {% patient_context patient as ctx %}          chart data for templates/inference/_patient_context.html
    {% context_breakdown analysis %}               readable table of analysis.context_features
    {% for row in analysis.context_features|context_rows %}{{ row.label }}: {{ row.value }}{% endfor %}
    {{ analysis|context_threshold }}               THE threshold (the version's) for the analysis' score
"""
from __future__ import annotations

import math

from django import template
from django.utils.html import format_html, format_html_join

from training import context_features as cf

from .. import scoring
from ..context import SOURCE_CONTEXT, score_threshold, usable_context_model
from ..models import Analysis, ModelVersion

register = template.Library()

# Chart geometry (SVG user units).
WIDTH, HEIGHT = 600, 340
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 20, 48
Y_MIN, Y_MAX = 0.002, 0.998  # probability axis on a logit scale
Y_TICKS = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98, 0.995)


def _logit(p: float) -> float:
    p = min(max(p, Y_MIN), Y_MAX)
    return math.log(p / (1 - p))


def _y(p: float) -> float:
    lo, hi = _logit(Y_MIN), _logit(Y_MAX)
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - (_logit(p) - lo) / (hi - lo))


def _x_axis(v: float) -> tuple[float, float]:
    """(axis maximum, tick step): at most 5 steps of a round size, covering v (at least 0.05)."""
    v = max(v, 0.05)
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5):
        if v / step <= 5 + 1e-9:
            return math.ceil(v / step - 1e-9) * step, step
    return 2.0, 0.5


def _fmt_pct(p) -> str:
    if p is None:
        return "–"
    return f"{100 * p:.1f}%" if p >= 0.001 else "<0.1%"


def _version_for(patient):
    from ..scoring import active_version

    version = active_version()
    if version is None:
        version = (ModelVersion.objects.filter(
            analyses__image__lesion__patient=patient, analyses__status=Analysis.Status.DONE
        ).order_by("-installed_at").first())
    return version


@register.simple_tag
def patient_context(patient) -> dict:
    """Everything the patient-context partial needs: version, context model, points, axes, rows."""
    version = _version_for(patient)
    lesions = list(patient.lesions.all())
    ctx = {
        "version": version,
        "context_model": None,
        "context_used": False,
        "validated": bool(version and version.validated),
        "threshold": None,
        "points": [],
        "rows": [],
        "n_lesions": len(lesions),
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT,
        "top": TOP, "bottom": HEIGHT - BOTTOM,
        "x_ticks": [], "y_ticks": [],
        "x_mid": LEFT + (WIDTH - LEFT - RIGHT) // 2, "y_mid": TOP + (HEIGHT - TOP - BOTTOM) // 2,
    }
    if version is None:
        ctx["rows"] = [{"lesion": l, "analysis": None} for l in lesions]
        return ctx
    model = usable_context_model(version)
    ctx["context_model"] = model
    ctx["threshold"] = score_threshold(version)
    analyses = (
        Analysis.objects.filter(image__lesion__patient=patient, model_version=version, status=Analysis.Status.DONE)
        .select_related("image")
        .defer("embedding")
        .order_by("image__acquired_on", "image__uploaded_at", "image_id")
    )
    analyses = list(analyses)
    for a in analyses:  # one version object for all (not its JSON decoded once per row)
        a.model_version = version
    latest: dict[int, Analysis] = {}
    highest: dict[int, Analysis] = {}
    for a in analyses:  # ordered by acquisition: the last one per lesion (its latest visit) wins
        lid = a.image.lesion_id
        latest[lid] = a
        if a.display_score is not None and (lid not in highest or a.display_score > highest[lid].display_score):
            highest[lid] = a
    ctx["context_used"] = any(a.final_score_source == SOURCE_CONTEXT for a in latest.values())
    ctx["context_pending"] = any(a.context_pending for a in latest.values())

    raw = []
    for lesion in lesions:
        a = latest.get(lesion.pk)
        if a is None:
            ctx["rows"].append({"lesion": lesion, "analysis": None})
            continue
        feats = a.context_features or {}
        score = a.display_score
        dist = feats.get("ud_distance")
        raw.append((lesion, a, feats, float(score), None if dist is None else float(dist)))

    dists = [d for *_, d in raw if d is not None]
    x_max, x_step = _x_axis(max(dists) * 1.05 if dists else 0.0)
    thr = ctx["threshold"]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    for lesion, a, feats, score, dist in raw:
        d = dist if dist is not None else 0.0
        outlier = scoring.is_outlier(dist, dists)
        high = scoring.is_flagged(a, threshold=thr)
        top = highest.get(lesion.pk)
        point = {
            "lesion": lesion, "analysis": a, "features": feats,
            "score": score, "score_pct": _fmt_pct(score), "probability_pct": _fmt_pct(a.probability),
            "source": a.score_source, "context_pending": a.context_pending,
            "explanation": (a.context_explanation or {}).get("text", ""),
            "highest": top, "highest_pct": _fmt_pct(top.display_score) if top else "–",
            "highest_is_latest": top is not None and top.pk == a.pk,
            "highest_flagged": scoring.is_flagged(top, threshold=thr) if top else False,
            "distance": dist, "pending": dist is None,
            "cx": round(LEFT + plot_w * min(d, x_max) / x_max, 1), "cy": round(_y(score), 1),
            "r": 10 if outlier else (8 if high else 6),
            "fill": "#c62828" if high else "#546e7a",
            "stroke": "#ef6c00" if outlier else "#ffffff",
            "stroke_width": 3 if outlier else 1,
            "high": high, "outlier": outlier,
        }
        ctx["points"].append(point)
        ctx["rows"].append({"lesion": lesion, "analysis": a, "point": point})
    ctx["points"].sort(key=lambda p: (p["outlier"], p["high"], p["score"]))  # important ones drawn last (on top)
    ctx["rows"].sort(key=lambda r: -(r.get("point") or {}).get("score", -1))
    n_steps = round(x_max / x_step)
    ctx["x_ticks"] = [{"value": f"{x_step * i:.2f}", "x": round(LEFT + plot_w * i / n_steps, 1)}
                      for i in range(n_steps + 1)]
    ctx["y_ticks"] = [{"value": _fmt_pct(t), "y": round(_y(t), 1)} for t in Y_TICKS]
    if thr is not None:
        ctx["threshold_y"] = round(_y(thr), 1)
        ctx["threshold_pct"] = _fmt_pct(thr)
    ctx["x_max"] = x_max
    ctx["plot_h"] = plot_h
    return ctx


def _num(v, digits=3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


@register.filter
def context_rows(features) -> list[dict]:
    """Readable rows of an analysis' context_features: [{"name", "label", "value"}]."""
    if not isinstance(features, dict) or not features:
        return []
    f = features
    rows = []

    def add(name, label, value):
        rows.append({"name": name, "label": label, "value": value})

    if "logit_prob" in f:
        p = 1 / (1 + math.exp(-f["logit_prob"]))
        add("logit_prob", "Image probability", f"{_fmt_pct(p)} (logit {_num(f['logit_prob'], 2)})")
    if "ud_distance" in f:
        add("ud_distance", cf.FEATURE_LABELS["ud_distance"], _num(f["ud_distance"], 3))
    if "ud_rank" in f and "n_other_lesions" in f:
        add("ud_rank", "Unlikeness among the patient's lesions",
            f"{int(f['ud_rank'])} of {int(f['n_other_lesions']) + 1} (1 = most unlike)")
    if "age" in f:
        add("age", "Age when the lesion was first photographed",
            "unknown" if f.get("age_missing") else f"{f['age']:.0f} years")
    if "sex_male" in f:
        add("sex", "Sex", "male" if f.get("sex_male") else ("female" if f.get("sex_female") else "other/unknown"))
    sites = [s for s in cf.GENERAL_SITES if f.get(cf.SITE_FEATURES[cf.GENERAL_SITES.index(s)])]
    if sites:
        add("site", "Site (ISIC 2020 general)", sites[0])
    return rows


@register.simple_tag
def context_breakdown(analysis):
    """A small HTML table: final score (and its source) + the readable context features."""
    if analysis is None or not getattr(analysis, "context_features", None):
        return format_html('<p class="context-breakdown empty">{}</p>', "Patient context: not computed yet.")
    source = analysis.score_source or "image"
    head = format_html(
        "<tr><th scope=\"row\">Score</th><td>{} ({})</td></tr>",
        _fmt_pct(analysis.display_score),
        "image + patient context" if source == SOURCE_CONTEXT else (
            "context pending" if analysis.context_pending else "image probability only, no context model"),
    )
    body = format_html_join(
        "", "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
        ((r["label"], r["value"]) for r in context_rows(analysis.context_features)),
    )
    return format_html(
        '<table class="context-breakdown"><caption>Patient context</caption><tbody>{}{}</tbody></table>', head, body
    )


@register.filter
def context_threshold(analysis):
    """THE operating threshold of this analysis' score: its model version's (one scale)."""
    return score_threshold(getattr(analysis, "model_version", None))
