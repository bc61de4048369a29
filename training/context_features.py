"""Patient-context features: THE one definition, used by training and by the worker (pure numpy).

The unit of context is the LESION. A patient's lesions are each represented by their latest
visit (latest analysed image); an image of lesion L is compared with the representatives of the
patient's OTHER lesions, never with images. So a follow-up photo of lesion L changes nothing for
any other lesion unless it changes how L looks (its embedding), and never changes a count: no
feature counts images, and no feature counts lesions (a count encodes how a data set happened to
be collected -- in ISIC 2020 patients with many photos had fewer melanomas -- and duplicating a
patient's benign lesions would move every other lesion's score).

Features (``FEATURE_NAMES``), for image i of lesion L of patient P:

=======================  =========================================================================
``logit_prob``           logit(p_i) of the image model (the OFFSET of the context model: it is
                         added with weight 1, the model only learns an adjustment to it)
``ud_distance``          "ugly duckling" distance: 1 - cosine between the embedding of image i and
                         the sum of the unit-normalised embeddings of the representatives (latest
                         image) of P's OTHER lesions; in [0, 2]. Duplicating every other lesion
                         leaves it exactly unchanged (the direction of the sum does not change)
``age``                  age in years when lesion L was first photographed (its earliest image;
                         missing: ``AGE_FILL``), so a follow-up visit does not change it
``age_missing``          1 if that age is unknown, else 0
``sex_male``/``sex_female``  indicators (both 0: other / unknown)
``site_<general site>``  one-hot of the ISIC 2020 general site of the lesion (``GENERAL_SITES``)
=======================  =========================================================================

Display and report-only values (stored with an analysis for the explanation, and evaluated as
REJECTED candidates in the context report; ``validate_context_model`` refuses a model that uses
them): ``n_other_lesions`` (lesions compared with), ``ud_rank`` (1 = the most unlike of the
patient's lesions), ``prob_rank_lesions`` (percentile rank of logit(p_i) among the patient's
lesions), ``log_n_lesions`` (log1p of the number of lesions).

Edge cases (never NaN, never an exception): ``ud_distance`` is 0 when P has no other lesion with a
usable embedding, when image i has no (or a zero) embedding, or when the other lesions' unit
vectors cancel out. Probabilities outside (0, 1) are clipped; NaN probability -> 0.5.

The context model (``apply_context_model``) is a logistic *adjustment*: final logit =
logit(p_i) + intercept + sum_j coef_j * (x_j - mean_j) / scale_j, fitted on simulated patients
with class weights that restore the image model's calibration mix, so the final score is a
calibrated melanoma probability on the SAME scale as the image probability, compared with the SAME
operating threshold (the model version's). The coefficient of ``ud_distance`` is constrained to be
>= 0 (making a lesion more unlike the others never lowers its score).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FEATURE_VERSION = 2

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
UD_FEATURES = ["ud_distance"]
DEMOGRAPHIC_FEATURES = ["age", "age_missing", "sex_male", "sex_female"]
METADATA_FEATURES = DEMOGRAPHIC_FEATURES + SITE_FEATURES
# What a context model may use (besides the logit offset): lesion-level, no counts.
MODEL_FEATURES = UD_FEATURES + METADATA_FEATURES
# Computed for the explanation and the report's rejected candidates; never a model input.
DISPLAY_FEATURES = ["n_other_lesions", "ud_rank", "prob_rank_lesions", "log_n_lesions"]
REJECTED_CANDIDATES = {
    "log_n_lesions": "a lesion count: duplicating a patient's benign lesions would move every other "
                     "lesion's score, and in ISIC 2020 it encodes how patients were photographed",
    "prob_rank_lesions": "a rank among the patient's lesions: adding benign lesions raises every "
                         "other lesion's rank and can flip an unrelated lesion's flag",
}
FEATURE_NAMES = ["logit_prob", *MODEL_FEATURES, *DISPLAY_FEATURES]
# Constraints of the exported model, by feature: the sign its coefficient must have.
NONNEGATIVE = ("ud_distance",)

FEATURE_LABELS = {
    "logit_prob": "Image probability (logit)",
    "ud_distance": "Ugly-duckling distance (cosine, vs the patient's other lesions)",
    "age": "Age when the lesion was first photographed (years)",
    "age_missing": "Age unknown",
    "sex_male": "Sex: male",
    "sex_female": "Sex: female",
    "n_other_lesions": "Other lesions compared with",
    "ud_rank": "Unlikeness rank among the patient's lesions (1 = most unlike)",
    "prob_rank_lesions": "Image-probability rank among the patient's lesions (0-1)",
    "log_n_lesions": "Lesions of this patient (log1p)",
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


def latest_per_lesion(lesion_ids: Sequence, order=None) -> dict:
    """{lesion id: index of its latest image} (``order``: higher = later; ties: later position)."""
    order = np.arange(len(lesion_ids)) if order is None else np.asarray(order)
    latest: dict = {}
    for i, lid in enumerate(lesion_ids):
        j = latest.get(lid)
        if j is None or (order[i], i) >= (order[j], j):
            latest[lid] = i
    return latest


def earliest_per_lesion(lesion_ids: Sequence, order=None) -> dict:
    order = np.arange(len(lesion_ids)) if order is None else np.asarray(order)
    first: dict = {}
    for i, lid in enumerate(lesion_ids):
        j = first.get(lid)
        if j is None or (order[i], i) < (order[j], j):
            first[lid] = i
    return first


def ugly_duckling_distance(embeddings, lesion_ids: Sequence, order=None) -> tuple[np.ndarray, np.ndarray]:
    """(distance, number of other lesions compared) per image: 1 - cosine between the image's
    embedding and the sum of the unit embeddings of the OTHER lesions' latest images."""
    lesion_ids = list(lesion_ids)
    n = len(lesion_ids)
    zeros = (np.zeros(n), np.zeros(n, dtype=np.int64))
    if n == 0 or embeddings is None:
        return zeros
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] == 0:
        return zeros
    unit, ok = _unit_rows(emb)
    reps = {lid: j for lid, j in latest_per_lesion(lesion_ids, order).items() if ok[j]}
    if not reps:
        return zeros
    total = unit[list(reps.values())].sum(axis=0)
    own = np.array([reps.get(lid, -1) for lid in lesion_ids])
    has_own = own >= 0
    others = total[None, :] - np.where(has_own[:, None], unit[np.maximum(own, 0)], 0.0)
    k = len(reps) - has_own.astype(np.int64)
    norms = np.linalg.norm(others, axis=1)
    valid = ok & (k > 0) & (norms >= 1e-9 * np.maximum(k, 1))
    cos = np.einsum("ij,ij->i", unit, others) / np.where(valid, norms, 1.0)
    dist = np.where(valid, np.maximum(0.0, 1.0 - np.clip(cos, -1.0, 1.0)), 0.0)
    return dist, np.where(ok, k, 0)


def _sex_indicators(sex) -> tuple[float, float]:
    s = (sex or "").strip().lower() if isinstance(sex, str) else ""
    return (1.0 if s in ("male", "m") else 0.0, 1.0 if s in ("female", "f") else 0.0)


def _age(a) -> float:
    try:
        a = float(a) if a is not None and a != "" else float("nan")
    except (TypeError, ValueError):
        a = float("nan")
    return a


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
    embeddings: (n, d) or None (any d). sites: any site vocabulary (``general_site`` maps it; a
    lesion takes the site of its latest image). ages: years at each image's acquisition (None/NaN
    = unknown; a lesion takes the age of its EARLIEST image). sexes: "male"/"female"/other.
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
    lg = logit(p)
    latest = latest_per_lesion(lesion_ids, order)
    first = earliest_per_lesion(lesion_ids, order)
    X[:, col["logit_prob"]] = lg
    ud, k = ugly_duckling_distance(embeddings, lesion_ids, order)
    X[:, col["ud_distance"]] = ud
    X[:, col["n_other_lesions"]] = k
    # Per lesion (its latest image): unlikeness rank (1 = most unlike) and probability rank of each
    # image among the OTHER lesions (display / report-only values).
    rep_ids = list(latest)
    rep_idx = np.array([latest[lid] for lid in rep_ids])
    position = {lid: j for j, lid in enumerate(rep_ids)}
    own = np.array([position[lid] for lid in lesion_ids])
    not_own = np.ones((n, len(rep_ids)), dtype=bool)
    not_own[np.arange(n), own] = False
    rep_ud, rep_lg = ud[rep_idx], lg[rep_idx]
    X[:, col["ud_rank"]] = 1 + ((rep_ud[None, :] > ud[:, None]) & not_own).sum(axis=1)
    n_others = not_own.sum(axis=1)
    below = ((rep_lg[None, :] < lg[:, None]) & not_own).sum(axis=1)
    tied = ((rep_lg[None, :] == lg[:, None]) & not_own).sum(axis=1)
    X[:, col["prob_rank_lesions"]] = np.where(n_others > 0, (below + 0.5 * tied) / np.maximum(n_others, 1), 0.5)
    X[:, col["log_n_lesions"]] = math.log1p(len(latest))
    ages = [None] * n if ages is None else list(ages)
    sites = [None] * n if sites is None else list(sites)
    for i, s in enumerate(sexes if sexes is not None else [None] * n):
        X[i, col["sex_male"]], X[i, col["sex_female"]] = _sex_indicators(s)
    for i, lid in enumerate(lesion_ids):
        a = _age(ages[first[lid]])
        if math.isfinite(a):
            X[i, col["age"]] = a
        else:
            X[i, col["age"]] = AGE_FILL
            X[i, col["age_missing"]] = 1.0
        X[i, col[_site_key(general_site(sites[latest[lid]]))]] = 1.0
    return X


def features_to_dict(row) -> dict[str, float]:
    """One row of ``patient_features`` as {name: float} (what Analysis.context_features stores)."""
    return {name: float(v) for name, v in zip(FEATURE_NAMES, np.asarray(row, dtype=np.float64))}


# --- the exported context model ---------------------------------------------------------------

MODEL_FORMAT = "melanoma-records/context-model"
MODEL_KIND = "logit_adjustment"


def validate_context_model(model: dict) -> None:
    """Raise ValueError unless ``model`` is a usable exported context model (this feature version,
    lesion-level features only, the ugly-duckling coefficient >= 0)."""
    if not isinstance(model, dict):
        raise ValueError("context model must be a JSON object")
    if model.get("kind") != MODEL_KIND:
        raise ValueError(f"unsupported context model kind {model.get('kind')!r} (this code applies "
                         f"{MODEL_KIND!r} models: retrain it with `python -m training context`)")
    version = model.get("feature_version")
    if version != FEATURE_VERSION:
        raise ValueError(f"context model was trained on feature version {version}; this code computes "
                         f"version {FEATURE_VERSION}: retrain it")
    names = model.get("feature_names")
    if not isinstance(names, list):
        raise ValueError("context model has no feature_names")
    unknown = [f for f in names if f not in MODEL_FEATURES]
    if unknown:
        raise ValueError(f"context model uses features that are not allowed: {unknown} "
                         f"(allowed: {MODEL_FEATURES})")
    for key in ("means", "scales", "coefficients"):
        v = model.get(key)
        if not isinstance(v, list) or len(v) != len(names):
            raise ValueError(f"context model {key} must be a list of {len(names)} numbers")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ValueError(f"context model {key} has non-finite values")
    if not isinstance(model.get("intercept"), (int, float)) or not math.isfinite(model["intercept"]):
        raise ValueError("context model intercept must be a finite number")
    for name, coef in zip(names, model["coefficients"]):
        if name in NONNEGATIVE and coef < 0:
            raise ValueError(f"context model coefficient of {name} is {coef} < 0: a lesion more unlike the "
                             "others would score lower")


def context_contributions(model: dict, X: np.ndarray, feature_names: Sequence[str] = tuple(FEATURE_NAMES)
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(per-feature logit contributions (n, k), total logit adjustment (n,)) of the model."""
    validate_context_model(model)
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    k = len(model["feature_names"])
    if X.shape[0] == 0:
        return np.zeros((0, k)), np.zeros(0)
    index = {name: j for j, name in enumerate(feature_names)}
    cols = [index[f] for f in model["feature_names"]]
    means = np.asarray(model["means"], dtype=np.float64)
    scales = np.asarray(model["scales"], dtype=np.float64)
    scales = np.where(np.abs(scales) > 0, scales, 1.0)
    contrib = (X[:, cols] - means) / scales * np.asarray(model["coefficients"], dtype=np.float64)
    return contrib, contrib.sum(axis=1) + float(model["intercept"])


def apply_context_model(model: dict, X: np.ndarray, feature_names: Sequence[str] = tuple(FEATURE_NAMES)) -> np.ndarray:
    """Context-adjusted melanoma probability per row of X (numpy only):
    sigmoid(logit_prob + adjustment), on the image probability's scale."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    _, adjustment = context_contributions(model, X, feature_names)
    if X.shape[0] == 0:
        return np.zeros(0)
    lg = X[:, list(feature_names).index("logit_prob")]
    return sigmoid(lg + adjustment)
