"""What a result means for the clinician: its score, THE threshold, "is this analysis flagged".
ONE place for the flag rule, so pages, chart, API (and the review queue) agree.

Every score of a model version -- the image probability and the context-adjusted final score --
is a calibrated melanoma probability on one scale, compared with one operating threshold: the
version's (``ModelVersion.threshold``, chosen on held-out data for a stated sensitivity).

No torch: the web process imports this module.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from django.core.signals import request_finished, request_started
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
    keeps polling. ``active_version`` is a callable (the caller caches it per request)."""
    from . import selectors

    analysis = None
    prefetched = getattr(image, selectors.ACTIVE_ATTR, None)
    if prefetched:
        analysis = prefetched[0]
        if "model_version" not in analysis._state.fields_cache:
            # analysis_prefetch() does not join the version (its JSON would be decoded once per
            # image): the active version, looked up once per request, is the same row.
            active = active_version()
            if active is not None and active.pk == analysis.model_version_id:
                analysis.model_version = active
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


# Within one web request the active version is read once: a page asks for it from several places
# (results, image partials, the context chart) and each read decodes its JSON card, metrics and
# context model. The memo lives in the request's thread from request_started to request_finished;
# outside requests (worker, commands) every call reads the database.
_request = threading.local()


def _begin_request(**kwargs) -> None:
    _request.memo = {}


def _end_request(**kwargs) -> None:
    _request.memo = None


request_started.connect(_begin_request, dispatch_uid="inference.scoring.begin_request")
request_finished.connect(_end_request, dispatch_uid="inference.scoring.end_request")


def active_version() -> ModelVersion | None:
    """The active model version (read once per web request)."""
    memo = getattr(_request, "memo", None)
    if memo is None:
        return ModelVersion.objects.filter(is_active=True).first()
    if "active" not in memo:
        memo["active"] = ModelVersion.objects.filter(is_active=True).first()
    return memo["active"]


# What a result needs of an analysis and its image (score, flag, source, when, heatmap, score
# change); the rest (the embedding, context features, timings, the image's hashes and quality...)
# stays in the database: lists of results read hundreds of rows.
RESULT_FIELDS = ("id", "image", "model_version", "status", "probability", "final_score", "final_score_source",
                 "context_explanation", "previous_final_score", "score_changed_at", "score_change_reason",
                 "queued_at", "started_at", "finished_at", "context_updated_at", "heatmap",
                 "image__id", "image__lesion", "image__acquired_on", "image__uploaded_at", "image__image_type")


def done_analyses(image_filter: dict, version: ModelVersion | None = None):
    """The version's finished analyses of the images matching ``image_filter`` (with their image).
    Each row's ``model_version`` is NOT joined: iterate through :func:`_with_version`, which gives
    every row the one version object (its JSON card, metrics and context model decoded once, not
    once per row)."""
    version = version if version is not None else active_version()
    if version is None:
        return Analysis.objects.none()
    return (Analysis.objects.filter(model_version=version, status=Analysis.Status.DONE, **image_filter)
            .select_related("image").only(*RESULT_FIELDS))


def _with_version(image_filter: dict, version: ModelVersion | None):
    version = version if version is not None else active_version()
    if version is None:
        return []
    rows = list(done_analyses(image_filter, version))
    for a in rows:
        a.model_version = version
    return rows


def _current_analyses_sql(n_ids: int):
    """The SQL of :func:`lesion_results`, its columns and their converters, built once per number
    of lesion ids from the models' metadata (table and column names): one statement that works on
    PostgreSQL and SQLite (window functions, no DISTINCT ON)."""
    from django.db import connection

    from patients.models import LesionImage

    key = (connection.vendor, n_ids)
    cached = _SQL_CACHE.get(key)
    if cached is not None:
        return cached
    a_fields = [f for f in Analysis._meta.concrete_fields if f.name in RESULT_FIELDS]
    i_fields = [f for f in LesionImage._meta.concrete_fields if f"image__{f.name}" in RESULT_FIELDS]
    finished = Analysis._meta.get_field("finished_at")
    qn = connection.ops.quote_name
    acquired, uploaded = (qn(LesionImage._meta.get_field(n).column) for n in ("acquired_on", "uploaded_at"))
    lesion_col = qn(LesionImage._meta.get_field("lesion").column)
    inner = ", ".join([f"a.{qn(f.column)} AS a{k}" for k, f in enumerate(a_fields)]
                      + [f"i.{qn(f.column)} AS i{k}" for k, f in enumerate(i_fields)])
    placeholders = ", ".join(["%s"] * n_ids)
    sql = (
        f"SELECT {', '.join([f'a{k}' for k in range(len(a_fields))] + [f'i{k}' for k in range(len(i_fields))])}, newest"
        f" FROM (SELECT {inner},"
        f" ROW_NUMBER() OVER (PARTITION BY i.{lesion_col} ORDER BY i.{acquired} DESC, i.{uploaded} DESC,"
        f" a.{qn(Analysis._meta.get_field('image').column)} DESC) AS rn,"
        f" MAX(a.{qn(finished.column)}) OVER (PARTITION BY i.{lesion_col}) AS newest"
        f" FROM {qn(Analysis._meta.db_table)} a"
        f" INNER JOIN {qn(LesionImage._meta.db_table)} i ON a.{qn(Analysis._meta.get_field('image').column)} = i.{qn('id')}"
        f" WHERE a.{qn(Analysis._meta.get_field('model_version').column)} = %s"
        f" AND a.{qn(Analysis._meta.get_field('status').column)} = %s AND i.{lesion_col} IN ({placeholders})) t"
        f" WHERE rn = 1"
    )

    def converters(field, alias):
        col = field.get_col(alias)
        return connection.ops.get_db_converters(col) + col.get_db_converters(connection)

    cached = (sql, a_fields, i_fields,
              [converters(f, "a") for f in a_fields], [converters(f, "i") for f in i_fields],
              converters(finished, "a"))
    if n_ids <= 128:  # the pages' sizes; a long review queue's statement is built each time
        _SQL_CACHE[key] = cached
    return cached


_SQL_CACHE: dict = {}


def lesion_results(lesion_ids, *, version: ModelVersion | None = None) -> dict[int, LesionResult]:
    """{lesion id: its current result} for lesions with at least one finished analysis by the
    active model version: the analysis of the lesion's latest analysed image (by acquisition date,
    then upload) and when the lesion's newest result was produced.

    ONE query for any number of lesions and images (plus the active version, read once per
    request): per lesion, in SQL, its analyses ranked by image date and the newest finish time;
    the rows become model instances directly (what a result shows: no embedding, no context
    features). The worklist and patient pages ask for tens of lesions per request, so this is
    their hot path: an ORM query with two correlated subqueries plus a second query building
    analyses and images cost about 4x more in Python than the database spent on them."""
    from django.db import connection

    from patients.models import LesionImage

    ids = sorted({int(i) for i in lesion_ids})
    if not ids:
        return {}
    version = version if version is not None else active_version()
    if version is None:
        return {}
    sql, a_fields, i_fields, a_conv, i_conv, newest_conv = _current_analyses_sql(len(ids))
    with connection.cursor() as cursor:
        cursor.execute(sql, [version.pk, Analysis.Status.DONE, *ids])
        rows = cursor.fetchall()
    na, ni = len(a_fields), len(i_fields)
    a_names = [f.attname for f in a_fields]
    i_names = [f.attname for f in i_fields]
    db = connection.alias

    def convert(values, fields, convs):
        out = []
        for value, field, conv in zip(values, fields, convs):
            for c in conv:
                value = c(value, field, connection)
            out.append(value)
        return out

    out = {}
    threshold = threshold_for(None, version)
    for row in rows:
        image = LesionImage.from_db(db, i_names, convert(row[na:na + ni], i_fields, i_conv))
        analysis = Analysis.from_db(db, a_names, convert(row[:na], a_fields, a_conv))
        analysis.image = image
        analysis.model_version = version
        latest = row[na + ni]
        for c in newest_conv:
            latest = c(latest, Analysis._meta.get_field("finished_at"), connection)
        out[image.lesion_id] = LesionResult(
            lesion_id=image.lesion_id, analysis=analysis, threshold=threshold,
            flagged=is_flagged(analysis, threshold=threshold), latest_result_at=latest or timezone.now(),
        )
    return out


def image_results(image_ids, *, version: ModelVersion | None = None) -> dict[int, LesionResult]:
    """{image id: that image's result} (same shape as a lesion's), for comparisons and reports."""
    cache: dict = {}
    out = {}
    for a in _with_version({"image_id__in": list(image_ids)}, version):
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
