"""Patient-level context re-scoring (the worker side of the patient-context model).

``rescore_patient(patient_id=..., model_version_id=...)`` recomputes, for EVERY done analysis of
the patient under that model version, the lesion-level context features
(``training.context_features``: the one definition shared with training) and the final score:

* the version has a usable context model (``ModelVersion.context_model``, exported by
  ``python -m training context``): final score = sigmoid(image logit + the model's adjustment),
  source "context";
* it has none: final score = the image probability, source "image".

Both are calibrated melanoma probabilities on the image model's scale, compared with ONE
threshold, the version's (``score_threshold``). Each lesion is represented by its latest visit;
an image is compared with the OTHER lesions' representatives, so follow-up photos of an unchanged
lesion change no score. A score that changes because something other than its own image changed
(another lesion added, a site edited) keeps its previous value and the reason.

Concurrency: everything happens in one transaction that first locks the patient row
(``SELECT ... FOR UPDATE``), and each call recomputes everything from the current rows
(idempotent), provided the caller re-scores after its own analysis has committed.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from django.db import transaction
from django.utils import timezone

from patients.models import Patient
from training import context_features as cf

from .models import Analysis, ModelVersion, PendingRescore

log = logging.getLogger(__name__)

SOURCE_CONTEXT = "context"
SOURCE_IMAGE = "image"
# A final score moving by less than this (absolute probability) is "unchanged".
CHANGE_TOLERANCE = 5e-4
# Context changing the score by less than this (absolute probability) is "no material change".
EXPLAIN_TOLERANCE = 5e-3
OWN_INPUTS = ("logit_prob", "age", "age_missing", "sex_male", "sex_female", *cf.SITE_FEATURES)


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
    """THE operating threshold of every score of this version (image-only and context-adjusted are
    on one scale): the version's, chosen on held-out data for a stated sensitivity."""
    return None if version is None else float(version.threshold)


def analysis_threshold(analysis: Analysis) -> float | None:
    """The operating threshold that applies to ``analysis.display_score``: the model version's (one
    threshold for image-only and context-adjusted scores alike)."""
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
    # one scale, one threshold: every score of a version is compared with the version's threshold
    threshold = Cast(F("model_version__threshold"), FloatField())
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


def _ordinal(k: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")


def explain(model: dict | None, row: np.ndarray, contributions: np.ndarray | None, probability: float,
            final: float) -> dict:
    """Why the context moved (or did not move) this score, in words a clinician reads."""
    f = cf.features_to_dict(row)
    n_lesions = int(f["n_other_lesions"]) + 1
    out = {"image_probability": float(probability), "final_score": float(final), "n_lesions": n_lesions,
           "unlikeness_rank": int(f["ud_rank"]), "ud_distance": f["ud_distance"]}
    if model is None:
        out.update(direction="none", text="No patient-context model for this version: image probability only.")
        return out
    delta = final - probability
    if abs(delta) < EXPLAIN_TOLERANCE:
        out.update(direction="unchanged", text=f"Patient context: no material change ({n_lesions} lesion"
                                              f"{'s' if n_lesions != 1 else ''} compared).")
        return out
    direction = "raised" if delta > 0 else "lowered"
    names = model["feature_names"]
    contrib = dict(zip(names, contributions))
    sign = 1 if delta > 0 else -1
    # Group the site one-hots and sex indicators; pick the largest contribution in the direction moved.
    groups = {"ud_distance": contrib.get("ud_distance", 0.0),
              "age": contrib.get("age", 0.0) + contrib.get("age_missing", 0.0),
              "sex": contrib.get("sex_male", 0.0) + contrib.get("sex_female", 0.0),
              "site": sum(v for k, v in contrib.items() if k.startswith("site_"))}
    main = max(groups, key=lambda k: sign * groups[k])
    if main == "ud_distance":
        rank = int(f["ud_rank"])
        if sign > 0:
            reason = (f"{_ordinal(rank)}most unlike of this patient's {n_lesions} lesions" if n_lesions >= 2
                      else "unlike the patient's other lesions")
        else:
            reason = f"looks like this patient's other lesions ({n_lesions} compared)"
    elif main == "age":
        reason = ("age unknown" if f["age_missing"] else f"age {f['age']:.0f} when the lesion was first photographed")
    elif main == "sex":
        reason = "sex"
    else:
        site = next((s for s, k in zip(cf.GENERAL_SITES, cf.SITE_FEATURES) if f.get(k)), "unknown")
        reason = f"site: {site}"
    out.update(direction=direction, main_reason=main,
               text=f"{direction.capitalize()} from {100 * probability:.0f}% (image only) to "
                    f"{100 * final:.0f}%: {reason}.",
               contributions={k: float(v) for k, v in groups.items()})
    return out


def compute_patient_context(patient: Patient, analyses: list[Analysis], version: ModelVersion):
    """(feature matrix, final scores, source, explanations) for these analyses of one patient (no DB writes)."""
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
    probs = np.array([float(a.probability) for a in analyses])
    model = usable_context_model(version)
    if model is None:
        return X, probs, SOURCE_IMAGE, [explain(None, row, None, p, p) for row, p in zip(X, probs)]
    contrib, _ = cf.context_contributions(model, X)
    scores = cf.apply_context_model(model, X)
    return X, scores, SOURCE_CONTEXT, [explain(model, row, c, p, s)
                                       for row, c, p, s in zip(X, contrib, probs, scores)]


def _change_reason(old: dict | None, new: dict) -> str:
    old = old or {}
    if any(not math.isclose(old.get(k, math.nan), new[k], abs_tol=1e-9) for k in OWN_INPUTS if k in old):
        return "this patient's records (age, sex or the lesion's site) changed"
    n_old, n_new = old.get("n_other_lesions"), new["n_other_lesions"]
    if n_old is not None and n_old != n_new:
        return (f"the patient's other lesions changed ({int(n_old) + 1} -> {int(n_new) + 1} lesions compared)")
    if math.isclose(old.get("ud_distance", math.nan), new["ud_distance"], abs_tol=1e-9):
        return "the model version's patient-context model was replaced"
    return "the patient's other lesions changed (a newer image of another lesion)"


def rescore_patient(*, patient_id: int, model_version_id: int) -> int:
    """Recompute the context features and final score of every done analysis of this patient for
    this model version. Returns the number of analyses re-scored."""
    with transaction.atomic():
        patient = Patient.objects.select_for_update().filter(pk=patient_id).first()
        if patient is None:  # deleted meanwhile (its pending row went with it)
            return 0
        # The outbox row that asked for this pass: done when this pass commits, unless a newer
        # request replaced its token meanwhile (then it stays, and is sent again).
        pending = PendingRescore.objects.filter(patient_id=patient_id, model_version_id=model_version_id)
        token = pending.values_list("token", flat=True).first()
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
            pending.filter(token=token).delete()
            return 0
        X, scores, source, explanations = compute_patient_context(patient, analyses, version)
        now = timezone.now()
        for a, row, score, expl in zip(analyses, X, scores, explanations):
            new_features = cf.features_to_dict(row)
            old_score, old_source = a.final_score, a.final_score_source
            # A change not caused by a new result of this image: keep the previous value and say why.
            if (old_score is not None and old_source == source and a.context_features
                    and abs(float(score) - old_score) >= CHANGE_TOLERANCE):
                a.previous_final_score = old_score
                a.score_changed_at = now
                a.score_change_reason = _change_reason(a.context_features, new_features)[:200]
            a.context_features = new_features
            a.context_explanation = expl
            a.final_score = float(score)
            a.final_score_source = source
            a.context_updated_at = now
        Analysis.objects.bulk_update(
            analyses, ["context_features", "context_explanation", "final_score", "final_score_source",
                       "context_updated_at", "previous_final_score", "score_changed_at", "score_change_reason"]
        )
        pending.filter(token=token).delete()
    return len(analyses)
