"""Patient-context features: THE one definition, used by training and by the worker (pure numpy).

A patient's images are scored by the image model first (probability + embedding). The context
features describe each image *relative to the same patient's other images*, plus the patient's
metadata. ``patient_features`` computes them for all images of one patient at once; the context
model (a logistic regression exported as JSON, see ``apply_context_model``) turns them into the
final score.

Features (``FEATURE_NAMES``, in this order), for image i of patient P:

==========================  =====================================================================
``log_n_images``            log1p(number of images of P)
``log_n_lesions``           log1p(number of distinct lesions of P)
``log_n_region_images``     log1p(number of images of P in the same region as i, i included)
``region_fraction``         that number / number of images of P
``logit_prob``              logit(p_i), p clipped to [1e-6, 1 - 1e-6]
``prob_rank_patient``       percentile rank of p_i among P's images (see ``percentile_rank``)
``prob_z_patient``          z-score of logit(p_i) among P's images (population sd)
``prob_rank_region``        the same rank among P's images in the same region
``prob_z_region``           the same z-score among P's images in the same region
``ud_distance``             "ugly duckling" distance: cosine distance between the embedding of
                            image i and the mean of the unit-normalised embeddings of P's OTHER
                            lesions, each represented by its latest image (leave-one-lesion-out:
                            i's own lesion, all of its images, is left out)
``ud_rank_patient``         percentile rank of ``ud_distance`` among P's images
``age``                     age in years at acquisition (missing: ``AGE_FILL`` = 50)
``age_missing``             1 if the age is unknown, else 0
``sex_male``, ``sex_female``  indicators (both 0: other / unknown)
``site_<general site>``     one-hot of the ISIC 2020 general site (``GENERAL_SITES``), from the
                            ISIC hierarchical value (``general_site``)
==========================  =====================================================================

"Region" = the ISIC 2020 general site (head/neck, upper extremity, lower extremity, torso,
palms/soles, oral/genital, unknown); images without a site form the region "unknown".

Edge cases (never NaN, never an exception):

* ``percentile_rank``: (number of others strictly below + half the number of others tied) /
  (n - 1), in [0, 1]. With n = 1 (one image, or one image in its region) it is **0.5**; all
  values tied -> 0.5 for every image.
* z-scores: 0 when n = 1 or when the sd is below 1e-9 (all tied).
* ``ud_distance``: **0** when the patient has one lesion (no other lesion), when the image has
  no embedding or a zero-norm embedding, when none of the other lesions has a usable embedding,
  or when the mean of the others is (numerically) the zero vector. Otherwise 1 - cos in [0, 2].
  A lesion whose latest image has a missing / zero-norm embedding is left out of the mean of
  the others. Identical
  embeddings give 0 (up to rounding; clipped at >= 0).
* ``ud_rank_patient``: percentile rank as above (one image -> 0.5; all distances 0 -> 0.5).
* probabilities outside (0, 1) are clipped; NaN probability -> 0.5.

``METADATA_FEATURES`` (no image model needed) are used for the ISIC 2020 metadata evaluation;
``IMAGE_CONTEXT_FEATURES`` are the ones that need the image model's outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FEATURE_VERSION = 1

GENERAL_SITES = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "torso",
    "palms/soles",
    "oral/genital",
    "unknown",
)
AGE_FILL = 50.0
EPS_PROB = 1e-6


def _site_key(site: str) -> str:
    return "site_" + site.replace("/", "_").replace(" ", "_")


SITE_FEATURES = [_site_key(s) for s in GENERAL_SITES]
COUNT_FEATURES = ["log_n_images", "log_n_lesions", "log_n_region_images", "region_fraction"]
IMAGE_CONTEXT_FEATURES = [
    "logit_prob",
    "prob_rank_patient",
    "prob_z_patient",
    "prob_rank_region",
    "prob_z_region",
    "ud_distance",
    "ud_rank_patient",
]
DEMOGRAPHIC_FEATURES = ["age", "age_missing", "sex_male", "sex_female"]
FEATURE_NAMES = COUNT_FEATURES + IMAGE_CONTEXT_FEATURES + DEMOGRAPHIC_FEATURES + SITE_FEATURES
# Features that need no image model: the ISIC 2020 metadata evaluation uses these.
METADATA_FEATURES = COUNT_FEATURES + DEMOGRAPHIC_FEATURES + SITE_FEATURES
# Image probability + within-patient image context (no demographics/site).
IMAGE_AND_CONTEXT_FEATURES = COUNT_FEATURES + IMAGE_CONTEXT_FEATURES

FEATURE_LABELS = {
    "log_n_images": "Images of this patient (log1p)",
    "log_n_lesions": "Lesions of this patient (log1p)",
    "log_n_region_images": "Images in the same body region (log1p)",
    "region_fraction": "Share of the patient's images in this region",
    "logit_prob": "Image probability (logit)",
    "prob_rank_patient": "Probability rank within patient (0-1)",
    "prob_z_patient": "Probability z-score within patient",
    "prob_rank_region": "Probability rank within region (0-1)",
    "prob_z_region": "Probability z-score within region",
    "ud_distance": "Ugly-duckling distance (cosine, vs other lesions)",
    "ud_rank_patient": "Ugly-duckling rank within patient (0-1)",
    "age": "Age at acquisition (years)",
    "age_missing": "Age unknown",
    "sex_male": "Sex: male",
    "sex_female": "Sex: female",
    **{_site_key(s): f"Site: {s}" for s in GENERAL_SITES},
}

# ISIC hierarchical site (the app's Lesion.anatomic_site) -> ISIC 2020 general site.
# More specific prefixes first; the first matching prefix wins.
_HIERARCHICAL_PREFIXES = (
    ("Upper extremity:Hand:Palm of hand", "palms/soles"),
    ("Lower extremity:Foot:Sole of foot", "palms/soles"),
    ("Head and neck:Head:Face:Mouth", "oral/genital"),
    ("Anogenital region", "oral/genital"),
    ("Head and neck", "head/neck"),
    ("Upper extremity", "upper extremity"),
    ("Lower extremity", "lower extremity"),
    ("Trunk", "torso"),
)
# Other vocabularies seen in the data (ISIC 2020 general sites, ISIC 2019 / HAM10000 names).
_PLAIN = {
    "head/neck": "head/neck", "head and neck": "head/neck", "head": "head/neck", "neck": "head/neck",
    "face": "head/neck", "scalp": "head/neck", "ear": "head/neck",
    "upper extremity": "upper extremity", "hand": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity",
    "torso": "torso", "trunk": "torso", "back": "torso", "chest": "torso", "abdomen": "torso",
    "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
    "palms/soles": "palms/soles", "acral": "palms/soles",
    "oral/genital": "oral/genital", "genital": "oral/genital",
    "unknown": "unknown", "": "unknown",
}


def general_site(site: str | None) -> str:
    """Map an anatomic site (ISIC hierarchical "Trunk:Posterior trunk", ISIC 2020 general
    "torso", HAM10000 "back", ...) to one of ``GENERAL_SITES``; anything unknown -> "unknown"."""
    if site is None or (isinstance(site, float) and math.isnan(site)):
        return "unknown"
    s = str(site).strip()
    for prefix, general in _HIERARCHICAL_PREFIXES:
        if s == prefix or s.startswith(prefix + ":"):
            return general
    return _PLAIN.get(s.lower(), "unknown")


def logit(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    p = np.where(np.isfinite(p), p, 0.5)
    p = np.clip(p, EPS_PROB, 1 - EPS_PROB)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def percentile_rank(values) -> np.ndarray:
    """(# others strictly below + 0.5 * # others tied) / (n - 1); 0.5 when n == 1."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n <= 1:
        return np.full(n, 0.5)
    below = (v[None, :] < v[:, None]).sum(axis=1)
    tied = (v[None, :] == v[:, None]).sum(axis=1) - 1  # minus itself
    return (below + 0.5 * tied) / (n - 1)


def zscore(values) -> np.ndarray:
    """Population z-score; 0 when n == 1 or the sd is ~0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size <= 1:
        return np.zeros(v.size)
    sd = v.std()
    if not np.isfinite(sd) or sd < 1e-9:
        return np.zeros(v.size)
    return (v - v.mean()) / sd


def _unit_rows(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-normalised rows and a mask of usable (finite, non-zero) rows; unusable rows -> 0."""
    emb = np.asarray(emb, dtype=np.float64)
    finite = np.isfinite(emb).all(axis=1)
    emb = np.where(finite[:, None], emb, 0.0)
    norms = np.linalg.norm(emb, axis=1)
    ok = finite & (norms > 1e-12)
    unit = np.zeros_like(emb)
    unit[ok] = emb[ok] / norms[ok, None]
    return unit, ok


def ugly_duckling_distance(embeddings, lesion_ids: Sequence, order=None) -> np.ndarray:
    """Cosine distance of each image from the mean unit embedding of the patient's other lesions.

    ``order``: sortable key per image (higher = later); a lesion is represented by its latest
    image (ties: the later position in the arrays). Default: array order.
    """
    lesion_ids = list(lesion_ids)
    n = len(lesion_ids)
    if n == 0:
        return np.zeros(0)
    if embeddings is None:
        return np.zeros(n)
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] == 0:
        return np.zeros(n)
    unit, ok = _unit_rows(emb)
    order = np.arange(n) if order is None else np.asarray(order)
    # Latest image of each lesion.
    latest: dict = {}
    for i in range(n):
        lid = lesion_ids[i]
        j = latest.get(lid)
        if j is None or (order[i], i) >= (order[j], j):
            latest[lid] = i
    reps = {lid: j for lid, j in latest.items() if ok[j]}
    if not reps:
        return np.zeros(n)
    total = unit[list(reps.values())].sum(axis=0)
    rep_idx = np.array([reps.get(lid, -1) for lid in lesion_ids])
    has_rep = rep_idx >= 0
    # Sum of the OTHER lesions' unit embeddings (i's own lesion left out), and how many they are.
    others = total[None, :] - np.where(has_rep[:, None], unit[np.maximum(rep_idx, 0)], 0.0)
    k = len(reps) - has_rep.astype(np.int64)
    norms = np.linalg.norm(others, axis=1)
    valid = ok & (k > 0) & (norms >= 1e-9 * np.maximum(k, 1))
    cos = np.einsum("ij,ij->i", unit, others) / np.where(valid, norms, 1.0)
    out = np.where(valid, np.maximum(0.0, 1.0 - np.clip(cos, -1.0, 1.0)), 0.0)
    return out


def _group_apply(keys: Sequence, values: np.ndarray, fn) -> np.ndarray:
    out = np.zeros(len(values))
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for idx in groups.values():
        idx = np.asarray(idx)
        out[idx] = fn(values[idx])
    return out


def _sex_indicators(sex) -> tuple[float, float]:
    s = (sex or "").strip().lower() if isinstance(sex, str) else ""
    return (1.0 if s in ("male", "m") else 0.0, 1.0 if s in ("female", "f") else 0.0)


def patient_features(
    probabilities,
    lesion_ids: Sequence,
    *,
    embeddings=None,
    sites: Sequence | None = None,
    ages: Sequence | None = None,
    sexes: Sequence | None = None,
    order=None,
) -> np.ndarray:
    """Feature matrix (n_images, len(FEATURE_NAMES)) for ALL images of ONE patient.

    probabilities: image-model probability per image. lesion_ids: lesion of each image.
    embeddings: (n, d) or None. sites: any site vocabulary (``general_site`` maps it).
    ages: years at acquisition (None/NaN = unknown). sexes: "male"/"female"/other.
    order: acquisition order key per image (latest image of a lesion = highest).
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    n = p.size
    lesion_ids = list(lesion_ids)
    if len(lesion_ids) != n:
        raise ValueError(f"{n} probabilities but {len(lesion_ids)} lesion ids")
    X = np.zeros((n, len(FEATURE_NAMES)))
    if n == 0:
        return X
    col = {name: k for k, name in enumerate(FEATURE_NAMES)}
    regions = [general_site(s) for s in (sites if sites is not None else [None] * n)]
    lg = logit(p)
    region_counts: dict = {}
    for r in regions:
        region_counts[r] = region_counts.get(r, 0) + 1
    n_region = np.array([region_counts[r] for r in regions], dtype=np.float64)

    X[:, col["log_n_images"]] = math.log1p(n)
    X[:, col["log_n_lesions"]] = math.log1p(len(set(lesion_ids)))
    X[:, col["log_n_region_images"]] = np.log1p(n_region)
    X[:, col["region_fraction"]] = n_region / n
    X[:, col["logit_prob"]] = lg
    X[:, col["prob_rank_patient"]] = percentile_rank(lg)
    X[:, col["prob_z_patient"]] = zscore(lg)
    X[:, col["prob_rank_region"]] = _group_apply(regions, lg, percentile_rank)
    X[:, col["prob_z_region"]] = _group_apply(regions, lg, zscore)
    ud = ugly_duckling_distance(embeddings, lesion_ids, order)
    X[:, col["ud_distance"]] = ud
    X[:, col["ud_rank_patient"]] = percentile_rank(ud)
    if ages is None:
        ages = [None] * n
    for i, a in enumerate(ages):
        try:
            a = float(a) if a is not None and a != "" else float("nan")
        except (TypeError, ValueError):
            a = float("nan")
        if math.isfinite(a):
            X[i, col["age"]] = a
        else:
            X[i, col["age"]] = AGE_FILL
            X[i, col["age_missing"]] = 1.0
    for i, s in enumerate(sexes if sexes is not None else [None] * n):
        X[i, col["sex_male"]], X[i, col["sex_female"]] = _sex_indicators(s)
    for i, r in enumerate(regions):
        X[i, col[_site_key(r)]] = 1.0
    return X


def features_to_dict(row) -> dict[str, float]:
    """One row of ``patient_features`` as {name: float} (what Analysis.context_features stores)."""
    return {name: float(v) for name, v in zip(FEATURE_NAMES, np.asarray(row, dtype=np.float64))}


# --- the exported context model ---------------------------------------------------------------

MODEL_FORMAT = "melanoma-records/context-model"


def validate_context_model(model: dict) -> None:
    """Raise ValueError unless ``model`` is a usable exported context model."""
    if not isinstance(model, dict):
        raise ValueError("context model must be a JSON object")
    if model.get("kind") != "logistic_regression":
        raise ValueError(f"unsupported context model kind {model.get('kind')!r}")
    version = model.get("feature_version", FEATURE_VERSION)
    if version != FEATURE_VERSION:
        raise ValueError(f"context model was trained on feature version {version}; this code computes "
                         f"version {FEATURE_VERSION}: retrain it")
    names = model.get("feature_names")
    if not names or not isinstance(names, list):
        raise ValueError("context model has no feature_names")
    unknown = [f for f in names if f not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"context model uses unknown features {unknown}")
    for key in ("means", "scales", "coefficients"):
        v = model.get(key)
        if not isinstance(v, list) or len(v) != len(names):
            raise ValueError(f"context model {key} must be a list of {len(names)} numbers")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ValueError(f"context model {key} has non-finite values")
    if not isinstance(model.get("intercept"), (int, float)) or not math.isfinite(model["intercept"]):
        raise ValueError("context model intercept must be a finite number")


def apply_context_model(model: dict, X: np.ndarray, feature_names: Sequence[str] = tuple(FEATURE_NAMES)) -> np.ndarray:
    """Context score per row of X (columns named by ``feature_names``), numpy only:
    sigmoid(((x - means) / scales) . coefficients + intercept)."""
    validate_context_model(model)
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[0] == 0:
        return np.zeros(0)
    index = {name: k for k, name in enumerate(feature_names)}
    cols = [index[f] for f in model["feature_names"]]
    means = np.asarray(model["means"], dtype=np.float64)
    scales = np.asarray(model["scales"], dtype=np.float64)
    scales = np.where(np.abs(scales) > 0, scales, 1.0)
    z = (X[:, cols] - means) / scales
    return sigmoid(z @ np.asarray(model["coefficients"], dtype=np.float64) + float(model["intercept"]))
