"""Patient-level context re-scoring (the worker side of the patient-context model).

``rescore_patient(patient_id=..., model_version_id=...)`` recomputes, for EVERY done analysis of
the patient under that model version, the context features (``training.context_features``: the
one definition shared with training), and the final score:

* the version has a context model (``ModelVersion.context_model``, the JSON exported by
  ``python -m training context``): final_score = the model's output, source "context";
* it has none (or an unusable one): final_score = the image probability, source "image".

Concurrency: everything happens in one transaction that first locks the patient row
(``SELECT ... FOR UPDATE``), so two re-scorings of one patient run one after the other, and the
analyses are read *after* the lock is held. Each call recomputes everything from the current
rows, so the final state equals one pass over all of the patient's images (idempotent), whatever
the order in which concurrent uploads were scored -- provided the caller re-scores after its own
analysis has committed (``inference.tasks.rescore_patient`` does).
"""
from __future__ import annotations

import logging

import numpy as np
from django.db import transaction
from django.utils import timezone

from patients.models import Patient
from training import context_features as cf

from .models import Analysis, ModelVersion

log = logging.getLogger(__name__)

SOURCE_CONTEXT = "context"
SOURCE_IMAGE = "image"


def usable_context_model(version: ModelVersion | None) -> dict | None:
    """The version's context model if it is present and valid, else None (logged)."""
    model = getattr(version, "context_model", None)
    if not model:
        return None
    try:
        cf.validate_context_model(model)
    except ValueError as exc:
        log.warning("model version %s: context model ignored: %s", version.pk, exc)
        return None
    return model


def score_threshold(version: ModelVersion | None) -> float | None:
    """Operating threshold for ``final_score``: the context model's own threshold when the version
    has a usable context model (its scores are on another scale), else the version's threshold."""
    if version is None:
        return None
    model = usable_context_model(version)
    if model is not None and isinstance(model.get("threshold"), (int, float)):
        return float(model["threshold"])
    return float(version.threshold)


def analysis_threshold(analysis: Analysis) -> float | None:
    """The operating threshold that applies to ``analysis.display_score``: the context model's own
    threshold for a context-adjusted final score, else the model version's."""
    version = getattr(analysis, "model_version", None)
    if version is None:
        return None
    if analysis.final_score is not None and analysis.final_score_source == SOURCE_CONTEXT:
        return score_threshold(version)
    return float(version.threshold)


def is_flagged(analysis: Analysis) -> bool | None:
    """Score at or above its operating threshold; None while the analysis has no score."""
    score, threshold = analysis.display_score, analysis_threshold(analysis)
    return None if score is None or threshold is None else score >= threshold


def flag_annotations() -> dict:
    """The same rule as :func:`score_threshold`, as SQL, for filtering and listing many analyses at
    once: ``flag_score`` (the final score, else the image probability), ``flag_threshold`` (the
    context model's threshold for a context score, else the version's) and ``is_flagged`` (score at
    or above it; NULL while there is no score). tests/test_api_contract.py checks both agree."""
    from django.db.models import Case, F, FloatField, When
    from django.db.models.fields.json import KeyTextTransform
    from django.db.models.functions import Cast, Coalesce
    from django.db.models.lookups import GreaterThanOrEqual

    score = Coalesce(F("final_score"), F("probability"))
    context_threshold = Cast(KeyTextTransform("threshold", "model_version__context_model"), FloatField())
    threshold = Case(
        When(final_score__isnull=False, final_score_source=SOURCE_CONTEXT,
             then=Coalesce(context_threshold, F("model_version__threshold"))),
        default=F("model_version__threshold"), output_field=FloatField(),
    )
    return {"flag_score": score, "flag_threshold": threshold, "is_flagged": GreaterThanOrEqual(score, threshold)}


def _embedding_matrix(analyses: list[Analysis]) -> np.ndarray | None:
    vectors = [a.get_embedding() for a in analyses]
    dims = [v.size for v in vectors if v is not None and v.size]
    if not dims:
        return None
    d = max(set(dims), key=dims.count)  # the version's dimension; a stray other size counts as missing
    emb = np.zeros((len(analyses), d), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None and v.size == d:
            emb[i] = v
    return emb


def compute_patient_context(patient: Patient, analyses: list[Analysis], version: ModelVersion):
    """(feature matrix, final scores, source) for these analyses of one patient (no DB writes)."""
    images = [a.image for a in analyses]
    order = sorted(range(len(analyses)),
                   key=lambda i: (images[i].acquired_on, images[i].uploaded_at, images[i].pk))
    rank = np.empty(len(analyses), dtype=np.int64)
    rank[order] = np.arange(len(analyses))
    X = cf.patient_features(
        [a.probability for a in analyses],
        [img.lesion_id for img in images],
        embeddings=_embedding_matrix(analyses),
        sites=[img.lesion.anatomic_site for img in images],
        ages=[patient.age_on(img.acquired_on) if patient.birth_date else None for img in images],
        sexes=[patient.sex for _ in images],
        order=rank,
    )
    model = usable_context_model(version)
    if model is None:
        return X, np.array([float(a.probability) for a in analyses]), SOURCE_IMAGE
    return X, cf.apply_context_model(model, X), SOURCE_CONTEXT


def rescore_patient(*, patient_id: int, model_version_id: int) -> int:
    """Recompute the context features and final score of every done analysis of this patient for
    this model version. Returns the number of analyses re-scored."""
    with transaction.atomic():
        patient = Patient.objects.select_for_update().get(pk=patient_id)
        version = ModelVersion.objects.get(pk=model_version_id)
        analyses = list(
            Analysis.objects.filter(
                image__lesion__patient_id=patient_id,
                model_version_id=model_version_id,
                status=Analysis.Status.DONE,
                probability__isnull=False,
            )
            .select_related("image__lesion")
            .order_by("image__acquired_on", "image__uploaded_at", "image_id")
        )
        if not analyses:
            return 0
        X, scores, source = compute_patient_context(patient, analyses, version)
        now = timezone.now()
        for a, row, score in zip(analyses, X, scores):
            a.context_features = cf.features_to_dict(row)
            a.final_score = float(score)
            a.final_score_source = source
            a.context_updated_at = now
        Analysis.objects.bulk_update(
            analyses, ["context_features", "final_score", "final_score_source", "context_updated_at"]
        )
    return len(analyses)
