"""Patient-context model: train, evaluate and export (``python -m training context ...``).

    python -m training context --pool holdout_predictions.csv --embeddings holdout_embeddings.npy \\
        [--card card.json | --threshold T] [--data IMAGE_DIRS] [--resemblance 0.5,0,1] --out DIR

What it learns: an ADJUSTMENT to the image model's logit from lesion-level patient context
(``training.context_features``: the ugly-duckling distance of the lesion from the patient's other
lesions, age when the lesion was first photographed, sex, site; no image or lesion counts). The
final score sigmoid(image logit + adjustment) is a calibrated melanoma probability on the image
model's own scale: the fit weights the classes so that the training rows have the prevalence of
the pool the image model was calibrated on (``prob_crossfit`` of an ensemble's held-out images),
so it is compared with the SAME operating threshold, the model version's (``--card`` / ``--threshold``).
The ugly-duckling coefficient is constrained to be >= 0.

* ``--pool`` (alias ``--oof``): one row per image. Columns (first match wins): an id
  (``image_id``/``image_name``/``isic_id``); the score: ``prob_crossfit`` (an ensemble's
  ``holdout_predictions.csv``), else ``logit``, else a probability (``oof``/``prob``/...); the
  label (``target``/...); optional ``patient_id``, ``lesion_id`` (else ``group`` = ``l:<lesion>``),
  ``age_approx``/``age``, ``sex``, ``anatom_site``..., ``embedding_row`` (row of ``--embeddings``).
* ``--embeddings``: ``.npy`` (n, d) in ONE embedding space (any d: 1280, 2048, ...).
* Without patient ids: **simulated patients** (``training.simulate``) with the real ISIC 2020
  patient AND lesion structure of ``--isic-metadata`` (v2 ground truth: lesion ids): every real
  lesion becomes one simulated lesion filled with a pool lesion of its class (one image: the unit
  of context is the lesion), for each of ``--seeds``; CV over the simulation's folds
  (patient-grouped and image-disjoint). ``--resemblance R1,R2,..`` evaluates each assumed
  within-patient resemblance (needs colour descriptors: ``--descriptors`` or ``--data``, the image
  folders, from which they are computed) and exports the model of the FIRST level.
* With patient ids on every row: the same on those real patients (lesion-level, patient-grouped CV).
* Writes ``DIR/context_model.json`` and ``DIR/context_report.json``: per assumption, what each
  feature group adds over the image model (ROC-AUC), sensitivity/specificity and the share of
  lesions flagged at the ONE threshold, calibration, and the rejected candidates (lesion count,
  probability rank) with why. ``--synthetic N``: synthetic data instead of ``--pool`` (tests).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import sys
import time

import numpy as np
from scipy.optimize import minimize
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from . import context_features as cf
from .hashing import file_sha256
from .simulate import lesion_rows, read_isic_metadata, simulate_patients, standardize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ISIC_METADATA = os.path.normpath(os.path.join(
    REPO_ROOT, "..", "shared", "data", "isic2020", "ISIC_2020_Training_GroundTruth_v2.csv"
))
LR_C = 1.0

ID_COLUMNS = ("image_id", "image_name", "isic_id")
PROB_COLUMNS = ("prob_crossfit", "oof", "oof_prob", "oof_probability", "prob", "probability", "pred",
                "prediction")
TARGET_COLUMNS = ("target", "melanoma", "label", "y")
AGE_COLUMNS = ("age_approx", "age")
SITE_COLUMNS = ("anatom_site_general_challenge", "anatom_site_general", "anatom_site", "site")


# --- reading -----------------------------------------------------------------------------------

class OOFData:
    """Per-image arrays read from an OOF CSV + embeddings."""

    def __init__(self, image_id, prob, target, embeddings, patient_id, lesion_id, age, sex, site, source="",
                 embedding_space=None):
        self.image_id = list(image_id)
        self.prob = np.asarray(prob, dtype=np.float64)
        self.target = np.asarray(target, dtype=np.int64)
        self.embeddings = embeddings
        self.patient_id = list(patient_id)
        self.lesion_id = list(lesion_id)
        self.age = np.asarray(age, dtype=np.float64)
        self.sex = list(sex)
        self.site = list(site)
        self.source = source
        # Which network embedded each image ("" = unknown: one network assumed).
        self.embedding_space = list(embedding_space) if embedding_space is not None else [""] * len(self.image_id)

    def __len__(self):
        return len(self.image_id)

    @property
    def has_patients(self) -> bool:
        return all(self.patient_id)


def _pick(cols, names, what, path, required=True):
    for n in names:
        if n in cols:
            return n
    if required:
        raise ValueError(f"{path}: no {what} column (one of {', '.join(names)}); columns: {sorted(cols)}")
    return None


def read_oof(path: str, embeddings_path: str, isic_metadata: str | None = None) -> OOFData:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    c_id = _pick(cols, ID_COLUMNS, "image id", path)
    # An ensemble's held-out pool: its cross-fitted calibrated probability (what the app shows).
    # Else a logit column (training.export writes one), more precise than a rounded probability.
    c_logit = "logit" if "logit" in cols and "prob_crossfit" not in cols else None
    c_p = c_logit or _pick(cols, PROB_COLUMNS, "probability", path)
    c_t = _pick(cols, TARGET_COLUMNS, "label", path)
    c_age = _pick(cols, AGE_COLUMNS, "age", path, required=False)
    c_site = _pick(cols, SITE_COLUMNS, "site", path, required=False)
    emb = np.load(embeddings_path, mmap_mode="r")
    if emb.ndim != 2:
        raise ValueError(f"{embeddings_path}: expected a 2-d array, got shape {emb.shape}")
    ids, prob, target, patient, lesion, age, sex, site, erow = [], [], [], [], [], [], [], [], []
    # The network that embedded each row: training.embed writes embedding_model; an export of
    # `train` has one network per fold (each image embedded by the model that did not train on it).
    c_space = "embedding_model" if "embedding_model" in cols else ("fold" if "fold" in cols else None)
    space = [(f"{c_space}:{r.get(c_space) or ''}" if c_space else "") for r in rows]
    for line, r in enumerate(rows, start=2):
        try:
            p = float(r[c_p])
            if c_logit:
                p = float(cf.sigmoid(p))
            t = int(float(r[c_t]))
        except ValueError:
            raise ValueError(f"{path}: line {line}: probability {r[c_p]!r} / label {r[c_t]!r} not numeric") from None
        if not np.isfinite(p) or t not in (0, 1):
            raise ValueError(f"{path}: line {line}: probability {p} / label {t} out of range")
        ids.append(r[c_id])
        prob.append(p)
        target.append(t)
        patient.append(r.get("patient_id") or "")
        lid = r.get("lesion_id") or ""
        if not lid and (r.get("group") or "").startswith("l:"):
            lid = r["group"][2:]
        if not patient[-1] and (r.get("group") or "").startswith("p:"):
            patient[-1] = r["group"][2:]
        lesion.append(lid)
        age.append(r.get(c_age, "") if c_age else "")
        sex.append(r.get("sex", "") or "")
        site.append(r.get(c_site, "") if c_site else "")
        erow.append(int(r["embedding_row"]) if r.get("embedding_row") not in (None, "") else len(erow))
    erow = np.asarray(erow)
    if erow.max() >= emb.shape[0]:
        raise ValueError(f"{embeddings_path}: {emb.shape[0]} rows, but the OOF needs row {erow.max()}")
    if "embedding_row" not in cols and emb.shape[0] != len(rows):
        raise ValueError(f"{embeddings_path}: {emb.shape[0]} rows but {path} has {len(rows)} (no embedding_row column)")
    embeddings = np.asarray(emb[erow], dtype=np.float32)
    if isic_metadata and any(patient) and os.path.isfile(isic_metadata):
        meta = {m.image_id: m for m in read_isic_metadata(isic_metadata)}
        for i, iid in enumerate(ids):
            m = meta.get(iid)
            if m is None:
                continue
            lesion[i] = lesion[i] or m.lesion_id
            age[i] = age[i] if age[i] not in ("", None) else m.age
            sex[i] = sex[i] or m.sex
            site[i] = site[i] or m.site
    age = [float(a) if a not in ("", None) else float("nan") for a in age]
    return OOFData(ids, prob, target, embeddings, patient, lesion, age, sex, site, source=path,
                   embedding_space=space)


def check_one_embedding_space(oof: OOFData, per_patient: bool) -> None:
    """Ugly-duckling distances compare embeddings of one patient's images: they must come from
    one network. Simulated patients mix pool images freely, so the whole pool must be one space;
    real patients need one space per patient."""
    if per_patient:
        spaces: dict = {}
        for pid, sp in zip(oof.patient_id, oof.embedding_space):
            spaces.setdefault(pid, set()).add(sp)
        mixed = [pid for pid, s in spaces.items() if len(s) > 1]
        if mixed:
            raise ValueError(f"{len(mixed)} patients (first: {mixed[0]}) have images embedded by different "
                             "networks (folds); their ugly-duckling distances would mean nothing")
        return
    distinct = sorted(set(oof.embedding_space))
    if len(distinct) > 1:
        raise ValueError(
            f"the pool's embeddings come from {len(distinct)} networks ({', '.join(distinct[:4])}): simulated "
            "patients mix pool images, and a cosine distance between embeddings of different networks means "
            "nothing. Build a pool in one embedding space with `python -m training embed --checkpoint "
            "MODEL.pt --oof OOF.csv --data DIR --out POOL` and pass POOL/context_pool.csv and "
            "POOL/context_pool_embeddings.npy")


def synthetic_oof(n: int = 1200, dim: int = 32, seed: int = 0, with_patients: bool = False) -> OOFData:
    """Synthetic OOF data for development and tests: ~16% melanoma, some multi-image lesions,
    benign embeddings clustered, melanoma embeddings shifted (an "ugly duckling" signal)."""
    rng = np.random.default_rng(seed)
    n_lesions = max(2, int(n * 0.8))
    lesion_of = np.sort(rng.integers(0, n_lesions, size=n))
    lesion_y = (rng.random(n_lesions) < 0.16).astype(np.int64)
    y = lesion_y[lesion_of]
    center = rng.normal(size=dim)
    shift = rng.normal(size=dim)
    lesion_emb = center + rng.normal(scale=0.8, size=(n_lesions, dim)) + np.outer(lesion_y, shift) * 1.2
    emb = (lesion_emb[lesion_of] + rng.normal(scale=0.2, size=(n, dim))).astype(np.float32)
    logit = -1.8 + 2.0 * y + rng.normal(scale=1.3, size=n)
    prob = 1 / (1 + np.exp(-logit))
    ids = [f"SYN_{i:06d}" for i in range(n)]
    patients = [f"SP_{lo // 8:05d}" for lo in lesion_of] if with_patients else [""] * n
    sexes = rng.choice(["male", "female"], size=n).tolist()
    sites = rng.choice(["torso", "lower extremity", "upper extremity", "head/neck"], size=n).tolist()
    ages = rng.choice(np.arange(20, 85, 5), size=n).astype(float)
    return OOFData(ids, prob, y, emb, patients, [f"SL_{lo}" for lo in lesion_of], ages, sexes, sites,
                   source=f"synthetic(n={n}, dim={dim}, seed={seed})")


# --- features ----------------------------------------------------------------------------------

def features_for_groups(patient_keys, prob, lesion, embeddings, site, age, sex, order=None,
                        embedding_index=None) -> np.ndarray:
    """Feature matrix for many patients: rows grouped by ``patient_keys`` (any order).
    ``embedding_index``: row i's embedding is ``embeddings[embedding_index[i]]`` (no copy of a
    large pool per simulated row); default: ``embeddings[i]``."""
    n = len(prob)
    X = np.zeros((n, len(cf.FEATURE_NAMES)))
    groups: dict = {}
    for i, k in enumerate(patient_keys):
        groups.setdefault(k, []).append(i)
    order = np.arange(n) if order is None else np.asarray(order)
    age = np.asarray(age, dtype=np.float64)
    for idx in groups.values():
        idx = np.asarray(idx)
        rows = idx if embedding_index is None else np.asarray(embedding_index)[idx]
        X[idx] = cf.patient_features(
            prob[idx], [lesion[i] for i in idx],
            embeddings=None if embeddings is None else np.asarray(embeddings[rows], dtype=np.float64),
            sites=[site[i] for i in idx], ages=age[idx], sexes=[sex[i] for i in idx], order=order[idx],
        )
    return X


def columns(names) -> list[int]:
    return [cf.FEATURE_NAMES.index(n) for n in names]


LOGIT = cf.FEATURE_NAMES.index("logit_prob")


# --- model: a constrained, class-weighted logistic adjustment of the image logit -----------------

def class_weights(y, target_prevalence: float) -> np.ndarray:
    """Sample weights giving the rows the prevalence ``target_prevalence`` (the image model's
    calibration mix), each class's total weight proportional to it; mean weight 1."""
    y = np.asarray(y)
    prev = y.mean()
    if not 0 < prev < 1:
        return np.ones(len(y))
    return np.where(y == 1, target_prevalence / prev, (1 - target_prevalence) / (1 - prev))


class Adjustment:
    """logit(final) = offset + intercept + sum_j coef_j * (x_j - mean_j) / scale_j."""

    def __init__(self, feature_names, means, scales, coef, intercept):
        self.feature_names = list(feature_names)
        self.means, self.scales = np.asarray(means), np.asarray(scales)
        self.coef, self.intercept = np.asarray(coef), float(intercept)

    def logit(self, X_full: np.ndarray) -> np.ndarray:
        Z = (X_full[:, columns(self.feature_names)] - self.means) / self.scales if self.feature_names else \
            np.zeros((len(X_full), 0))
        return X_full[:, LOGIT] + self.intercept + Z @ self.coef

    def predict(self, X_full: np.ndarray) -> np.ndarray:
        return cf.sigmoid(self.logit(X_full))

    def export(self) -> dict:
        return {
            "format": cf.MODEL_FORMAT, "kind": cf.MODEL_KIND, "feature_version": cf.FEATURE_VERSION,
            "offset": "logit_prob", "feature_names": self.feature_names,
            "means": [float(v) for v in self.means], "scales": [float(v) for v in self.scales],
            "coefficients": [float(v) for v in self.coef], "intercept": float(self.intercept),
        }


def fit_adjustment(X_full: np.ndarray, y, feature_names, *, weights=None, C: float = LR_C,
                   nonnegative=cf.NONNEGATIVE, fit_intercept: bool = False) -> Adjustment:
    """Weighted L2 logistic regression with the image logit as offset (coefficient 1), features
    standardised (centred on the training rows), the coefficients of ``nonnegative`` features >= 0.

    ``fit_intercept`` False (the export): no global shift, so at the patients' average context the
    score IS the image probability and the context only moves lesions relative to that -- the
    result stays on the image model's scale (calibrated exactly as far as the image model is) and
    one threshold applies. True: also recalibrate (used to measure the image model's calibration)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    names = list(feature_names)
    raw = X_full[:, columns(names)] if names else np.zeros((len(y), 0))
    means = raw.mean(0) if names else np.zeros(0)
    scales = raw.std(0) if names else np.zeros(0)
    scales = np.where(scales > 1e-12, scales, 1.0)
    Z = (raw - means) / scales
    off = X_full[:, LOGIT]

    def loss(theta):
        b, c = theta[0], theta[1:]
        eta = off + b + Z @ c
        # log(1 + exp(eta)) - y * eta, stably
        ll = np.logaddexp(0, eta) - y * eta
        r = cf.sigmoid(eta) - y
        val = C * (w * ll).sum() + 0.5 * (c @ c)
        grad = np.concatenate([[C * (w * r).sum()], C * (Z.T @ (w * r)) + c])
        return val, grad

    bounds = [(None, None) if fit_intercept else (0.0, 0.0)] + [
        ((0.0, None) if n in nonnegative else (None, None)) for n in names]
    res = minimize(loss, np.zeros(1 + len(names)), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 5000})
    return Adjustment(names, means, scales, res.x[1:], res.x[0])


# --- metrics -----------------------------------------------------------------------------------

def auc(y, p) -> float | None:
    y = np.asarray(y)
    if len(y) == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


def sens_spec(y, p, t) -> tuple[float, float]:
    y, p = np.asarray(y), np.asarray(p)
    return float((p[y == 1] >= t).mean()), float((p[y == 0] < t).mean())


def calibration(y, p, weights, bins: int = 10) -> dict:
    """Weighted calibration: mean predicted vs observed (in the large) and ECE over equal-width bins."""
    y, p, w = np.asarray(y, float), np.asarray(p, float), np.asarray(weights, float)
    edges = np.linspace(0, 1, bins + 1)
    k = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = k == b
        if m.any():
            ece += w[m].sum() / w.sum() * abs(np.average(p[m], weights=w[m]) - np.average(y[m], weights=w[m]))
    return {"mean_predicted": float(np.average(p, weights=w)), "observed": float(np.average(y, weights=w)),
            "ece": float(ece)}


def _summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def score_metrics(y, p, threshold: float, weights) -> dict:
    sens, spec = sens_spec(y, p, threshold)
    return {"roc_auc": auc(y, p), "sensitivity": sens, "specificity": spec,
            "share_flagged": float((np.asarray(p) >= threshold).mean()),
            "calibration_at_pool_mix": calibration(y, p, weights)}


# --- evaluation ----------------------------------------------------------------------------------

FEATURE_SETS = {
    "image_plus_ugly_duckling": cf.UD_FEATURES,
    "image_plus_metadata": cf.METADATA_FEATURES,
    "image_plus_ugly_duckling_plus_metadata": cf.MODEL_FEATURES,
}
EXPORT_SET = "image_plus_ugly_duckling_plus_metadata"
# Evaluated to show what they would add, never exported (see cf.REJECTED_CANDIDATES).
REJECTED_SETS = {
    "rejected_image_plus_lesion_count": ["log_n_lesions"],
    "rejected_image_plus_probability_rank": ["prob_rank_lesions"],
}


def cross_validate(X, y, fold, threshold: float, target_prevalence: float, C=LR_C) -> dict:
    """Per feature set: OOF scores by fold, then metrics on all OOF scores (lesion-level rows)."""
    w = class_weights(y, target_prevalence)
    out = {"image_only": {"features": [], "oof": cf.sigmoid(X[:, LOGIT])}}
    for name, feats in {**FEATURE_SETS, **REJECTED_SETS}.items():
        oof = np.zeros(len(y))
        for k in sorted(set(fold.tolist())):
            tr, te = fold != k, fold == k
            m = fit_adjustment(X[tr], y[tr], feats, weights=w[tr], C=C,
                               nonnegative=cf.NONNEGATIVE if name in FEATURE_SETS else ())
            oof[te] = m.predict(X[te])
        out[name] = {"features": feats, "oof": oof}
    for name, r in out.items():
        r.update(score_metrics(y, r["oof"], threshold, w))
        r["fold_auc"] = [auc(y[fold == k], r["oof"][fold == k]) for k in sorted(set(fold.tolist()))]
    shift = fit_adjustment(X, y, [], weights=w, fit_intercept=True).intercept
    out["image_only"]["logit_shift_that_would_calibrate_it"] = float(shift)
    base = out["image_only"]["roc_auc"]
    for name, r in out.items():
        r["roc_auc_gain_over_image_only"] = None if r["roc_auc"] is None or base is None else r["roc_auc"] - base
    return out


def _public(cv: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "oof"} for k, v in cv.items()}


def one_image_per_lesion(oof: OOFData) -> np.ndarray:
    """Pool rows that represent their lesion (the last row of each lesion; an image without a lesion
    id is its own lesion): the simulation gives every simulated lesion ONE pool lesion's image."""
    last: dict = {}
    for i, lid in enumerate(oof.lesion_id):
        last[lid if lid else f"img:{i}"] = i
    return np.array(sorted(last.values()), dtype=np.int64)


def evaluate_simulated(oof: OOFData, isic_path: str, seeds, *, threshold: float, target_prevalence: float,
                       n_folds=5, n_patients=None, resemblance: float = 0.0, descriptors=None, log=print):
    check_one_embedding_space(oof, per_patient=False)
    rows = lesion_rows(read_isic_metadata(isic_path))
    reps = one_image_per_lesion(oof)
    desc = None if descriptors is None else np.asarray(descriptors)[reps]
    per_seed, X_all, y_all = [], [], []
    for s in seeds:
        t0 = time.time()
        sim = simulate_patients(rows, oof.target[reps], [f"pool:{i}" for i in reps], n_patients=n_patients,
                                n_folds=n_folds, seed=s, resemblance=resemblance, descriptors=desc)
        pi = reps[sim.pool_index]
        X = features_for_groups(sim.patient.tolist(), oof.prob[pi], sim.lesion.tolist(), oof.embeddings,
                                sim.site, sim.age, sim.sex, order=sim.order, embedding_index=pi)
        y = sim.target
        pub = _public(cross_validate(X, y, sim.fold, threshold, target_prevalence))
        per_seed.append({"seed": s, "simulation": sim.stats, "results": pub})
        log(f"  resemblance {resemblance:g} seed {s}: ROC-AUC image only {pub['image_only']['roc_auc']:.4f}, "
            + ", ".join(f"{k} {pub[k]['roc_auc']:.4f}" for k in FEATURE_SETS) + f" ({time.time() - t0:.1f}s)")
        X_all.append(X)
        y_all.append(y)
    return per_seed, summarise(per_seed), np.concatenate(X_all), np.concatenate(y_all)


def summarise(per_seed) -> dict:
    out = {}
    for k in per_seed[0]["results"]:
        rs = [r["results"][k] for r in per_seed]
        out[k] = {m: _summary([r[m] for r in rs]) for m in
                  ("roc_auc", "roc_auc_gain_over_image_only", "sensitivity", "specificity", "share_flagged")}
        out[k]["ece_at_pool_mix"] = _summary([r["calibration_at_pool_mix"]["ece"] for r in rs])
        out[k]["features"] = rs[0]["features"]
        if "logit_shift_that_would_calibrate_it" in rs[0]:
            out[k]["logit_shift_that_would_calibrate_it"] = _summary(
                [r["logit_shift_that_would_calibrate_it"] for r in rs])
    return out


def evaluate_real_patients(oof: OOFData, *, threshold: float, target_prevalence: float, n_folds=5, seed=42):
    """Lesion-level rows (each lesion's latest image) of real patients, patient-grouped CV."""
    check_one_embedding_space(oof, per_patient=True)
    lesion = [l or f"img:{i}" for i, l in zip(oof.image_id, oof.lesion_id)]
    X_img = features_for_groups(oof.patient_id, oof.prob, lesion, oof.embeddings, oof.site, oof.age, oof.sex)
    rep = sorted({(p, l): i for i, (p, l) in enumerate(zip(oof.patient_id, lesion))}.values())
    X, y = X_img[rep], np.array([oof.target[[j for j, l in enumerate(lesion) if l == lesion[i]]].max()
                                  for i in rep])
    pid = [oof.patient_id[i] for i in rep]
    fold = np.full(len(y), -1)
    for k, (_, te) in enumerate(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(X, y, pid)):
        fold[te] = k
    res = _public(cross_validate(X, y, fold, threshold, target_prevalence))
    return {"cv": f"{n_folds}-fold StratifiedGroupKFold grouped by patient_id (random_state={seed}), one row "
                  "per lesion (its latest image)", "n_lesions": len(y), "results": res}, X, y


def evaluate_metadata(isic_path: str, n_folds: int = 5, seed: int = 42) -> dict:
    """(a) Lesion-level, on the REAL ISIC 2020 metadata without images: what age/sex/site tell
    (and what a lesion count would, as a rejected candidate), patient-grouped CV, plain LR
    (intercept = ISIC 2020's own prevalence; only the ROC-AUC is reported)."""
    rows = lesion_rows(read_isic_metadata(isic_path))
    y = np.array([r.target for r in rows])
    pid = [r.patient_id for r in rows]
    X = features_for_groups(pid, np.full(len(rows), 0.5), [r.lesion_id for r in rows], None,
                            [r.site for r in rows], np.array([r.age for r in rows]), [r.sex for r in rows])
    fold = np.full(len(rows), -1)
    for k, (_, te) in enumerate(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(X, y, pid)):
        fold[te] = k
    out = {"what": "(a) lesion-level metadata model on the REAL ISIC 2020 metadata (no images)",
           "data": os.path.basename(isic_path), "n_lesions": len(rows), "n_patients": len(set(pid)),
           "n_melanoma_lesions": int(y.sum()),
           "cv": f"{n_folds}-fold StratifiedGroupKFold by patient_id (random_state={seed})"}
    for name, feats in {"metadata": cf.METADATA_FEATURES,
                        "rejected_metadata_plus_lesion_count": cf.METADATA_FEATURES + ["log_n_lesions"]}.items():
        oof = np.zeros(len(y))
        for k in range(n_folds):
            tr, te = fold != k, fold == k
            oof[te] = fit_adjustment(X[tr], y[tr], feats, nonnegative=(), fit_intercept=True).predict(X[te])
        full = fit_adjustment(X, y, feats, nonnegative=(), fit_intercept=True)
        out[name] = {"features": feats, "roc_auc_pooled_oof": auc(y, oof),
                     "standardized_coefficients": {f: round(float(c), 4) for f, c in zip(feats, full.coef)}}
    return out


# --- colour descriptors for the resemblance assumption --------------------------------------------

def descriptors_from_images(oof: OOFData, data: str, layout: str = "auto", size: int = 64) -> np.ndarray:
    """Model-independent colour descriptors of the pool images, read from the image folders."""
    from .datasets import read_layout
    from .preprocessing import load_rgb
    from .simulate import colour_descriptor

    records = {r.image_id: r for r in read_layout(data, layout)}
    missing = [i for i in oof.image_id if i not in records]
    if missing:
        raise SystemExit(f"--data {data}: {len(missing)} pool images are not there (first: {missing[0]})")
    return np.stack([colour_descriptor(load_rgb(records[i].path, size)) for i in oof.image_id])


# --- main ----------------------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training context", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", "--oof", dest="oof",
                    help="held-out predictions CSV, one row per image (an ensemble's holdout_predictions.csv)")
    ap.add_argument("--embeddings", help=".npy embeddings (n, d) of the pool images, one embedding space")
    ap.add_argument("--card", default=None,
                    help="the model version's card.json: its operating threshold is THE threshold "
                         "(default: card.json beside --pool when there is one)")
    ap.add_argument("--threshold", type=float, default=None, help="the operating threshold (instead of --card)")
    ap.add_argument("--isic-metadata", default=DEFAULT_ISIC_METADATA,
                    help="ISIC 2020 ground-truth CSV (real patient/lesion structure); default: %(default)s")
    ap.add_argument("--out", required=True, help="output folder for context_model.json + context_report.json")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="simulation seeds (simulated patients only)")
    ap.add_argument("--sim-patients", type=int, default=None,
                    help="simulated patients per seed (default: every real ISIC 2020 patient once)")
    ap.add_argument("--skip-metadata", action="store_true", help="skip (a), the metadata-only check")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="use N synthetic pool images instead of --pool/--embeddings (development)")
    ap.add_argument("--model-name", default="", help="image model version the pool came from (recorded)")
    ap.add_argument("--descriptors", default=None,
                    help="colour descriptors .npy aligned with --pool (`training embed` writes "
                         "context_pool_colour.npy); or give --data")
    ap.add_argument("--data", default=None,
                    help="image folder(s), comma-separated, holding the pool images: colour descriptors "
                         "are computed from them (for --resemblance above 0)")
    ap.add_argument("--layout", default="auto", help="layout of --data (see `training train --help`)")
    ap.add_argument("--resemblance", default="0",
                    help="comma-separated within-patient resemblance levels in [0, 1] (an ASSUMPTION: see "
                         "training/simulate.py); every level is evaluated, the FIRST one trains the export")
    return ap


def _threshold(args) -> tuple[float, str]:
    if args.threshold is not None:
        if not 0 < args.threshold < 1:
            raise SystemExit(f"--threshold must be in (0, 1), got {args.threshold}")
        return float(args.threshold), "--threshold"
    card = args.card
    if card is None and args.oof and os.path.isfile(os.path.join(os.path.dirname(args.oof), "card.json")):
        card = os.path.join(os.path.dirname(args.oof), "card.json")
    if card is None:
        raise SystemExit("the operating threshold is needed: pass --card card.json (the model version's) "
                         "or --threshold T")
    try:
        with open(card) as f:
            t = float(json.load(f)["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{card}: no usable 'threshold' ({exc})") from None
    return t, os.path.basename(card)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    have_meta = bool(args.isic_metadata) and os.path.isfile(args.isic_metadata)
    threshold, threshold_from = (args.threshold, "--threshold") if args.synthetic and args.threshold else \
        ((0.2, "synthetic default") if args.synthetic else _threshold(args))
    report: dict = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "feature_version": cf.FEATURE_VERSION,
        "model_features": cf.MODEL_FEATURES,
        "rejected_candidates": cf.REJECTED_CANDIDATES,
        "command": "python -m training context " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threshold": {"value": threshold, "from": threshold_from,
                      "meaning": "THE operating threshold of the model version (image-only and context-adjusted "
                                 "scores are both compared with it)"},
    }
    if args.synthetic:
        oof = synthetic_oof(args.synthetic)
        sources = {"pool": oof.source}
    else:
        if not (args.oof and args.embeddings):
            raise SystemExit("--pool and --embeddings are required (or --synthetic N)")
        oof = read_oof(args.oof, args.embeddings, args.isic_metadata if have_meta else None)
        sources = {"pool": os.path.basename(args.oof), "pool_sha256": file_sha256(args.oof),
                   "embeddings": os.path.basename(args.embeddings),
                   "embeddings_sha256": file_sha256(args.embeddings)}
    prevalence = float(oof.target.mean())
    pool_desc = {**sources, "n_images": len(oof), "n_melanoma": int(oof.target.sum()),
                 "melanoma_share": prevalence, "embedding_dim": int(oof.embeddings.shape[1]),
                 "image_only_roc_auc": auc(oof.target, oof.prob)}
    if args.model_name:
        pool_desc["image_model"] = args.model_name
    print(f"pool: {len(oof)} images ({prevalence:.1%} melanoma, the calibration mix), embeddings "
          f"{oof.embeddings.shape[1]}-d; threshold {threshold:.4f} ({threshold_from})")
    if not args.skip_metadata and have_meta:
        a = evaluate_metadata(args.isic_metadata, n_folds=args.folds)
        report["metadata_real_isic2020"] = a
        print(f"(a) real ISIC 2020 metadata, lesion-level: age/sex/site ROC-AUC "
              f"{a['metadata']['roc_auc_pooled_oof']:.4f}; + lesion count (rejected) "
              f"{a['rejected_metadata_plus_lesion_count']['roc_auc_pooled_oof']:.4f}")

    if oof.has_patients:
        res, X_train, y_train = evaluate_real_patients(oof, threshold=threshold, target_prevalence=prevalence,
                                                       n_folds=args.folds)
        report["real_patients"] = {"pool": pool_desc, **res}
        by_level = {"real patients": {k: {"roc_auc": {"mean": v["roc_auc"]},
                                          "roc_auc_gain_over_image_only": {"mean": v["roc_auc_gain_over_image_only"]},
                                          "sensitivity": {"mean": v["sensitivity"]},
                                          "specificity": {"mean": v["specificity"]},
                                          "share_flagged": {"mean": v["share_flagged"]}}
                                      for k, v in res["results"].items()}}
        training_data = {"kind": "real patients", **pool_desc, "n_patients": len(set(oof.patient_id)),
                         "n_lesions": int(len(y_train))}
        level0 = "real patients"
    else:
        if not have_meta:
            raise SystemExit(f"the pool has no patient ids and there is no ISIC 2020 metadata at "
                             f"{args.isic_metadata} to simulate patients from")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        try:
            levels = [float(v) for v in args.resemblance.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--resemblance: expected numbers in [0, 1], got {args.resemblance!r}") from None
        if not levels or any(not 0 <= v <= 1 for v in levels):
            raise SystemExit(f"--resemblance: expected numbers in [0, 1], got {args.resemblance!r}")
        descriptors = None
        if args.descriptors:
            descriptors = np.load(args.descriptors)
            if descriptors.ndim != 2 or descriptors.shape[0] != len(oof):
                raise SystemExit(f"{args.descriptors}: expected one row per pool row ({len(oof)}), "
                                 f"got shape {descriptors.shape}")
        elif args.data and any(v > 0 for v in levels):
            t0 = time.time()
            descriptors = descriptors_from_images(oof, args.data, args.layout)
            print(f"colour descriptors of {len(oof)} pool images from {args.data} ({time.time() - t0:.0f}s)")
        elif any(v > 0 for v in levels):
            raise SystemExit("--resemblance above 0 needs --descriptors or --data (the pool's image folders)")
        try:
            check_one_embedding_space(oof, per_patient=False)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        by_level, per_level = {}, {}
        X_train = y_train = None
        for level in levels:
            per_seed, summary, X, y = evaluate_simulated(
                oof, args.isic_metadata, seeds, threshold=threshold, target_prevalence=prevalence,
                n_folds=args.folds, n_patients=args.sim_patients, resemblance=level, descriptors=descriptors)
            by_level[f"resemblance {level:g}"] = summary
            per_level[f"resemblance {level:g}"] = per_seed
            if X_train is None:
                X_train, y_train, sim_stats = X, y, per_seed[0]["simulation"]
        level0 = f"resemblance {levels[0]:g}"
        report["simulated_patients"] = {
            "what": ("SIMULATED PATIENTS: the real ISIC 2020 patients with their real lesions (lesion ids of the "
                     "v2 ground truth; a lesion's class, age at its first image, sex and site), every lesion "
                     "filled with one held-out pool lesion of the same class (its probability and embedding). "
                     "One row per lesion. Not real patients."),
            "how_measured": (f"per seed, patients and pool lesions are dealt into {args.folds} folds (a patient only "
                             "gets pool lesions of its fold); the adjustment is fitted on 4 folds and scores the 5th; "
                             "metrics over all out-of-fold scores. Sensitivity/specificity/share flagged at THE "
                             "threshold; calibration weighted to the pool's melanoma share."),
            "resemblance_meaning": (
                "probability that a simulated patient's benign lesion is the pool lesion most like the patient's "
                "random 'signature' benign lesion in model-independent colour descriptors (else a random one); "
                "melanomas are always random. 0 = plain random fill, where the ugly-duckling sign cannot exist. "
                "An ASSUMPTION standing in for how alike one person's naevi are, which these data cannot measure."),
            "exported_resemblance": levels[0],
            "pool": pool_desc, "isic_metadata": os.path.basename(args.isic_metadata), "seeds": seeds,
            "simulation_example": sim_stats,
            "summary_by_resemblance": by_level,
            "per_seed_by_resemblance": per_level,
            "caveats": [
                "Simulated patients are not real patients: a simulated patient's lesions come from different "
                "people; what the ugly-duckling feature adds depends on the ASSUMED resemblance.",
                "Age, sex and site come from the real ISIC 2020 lesions the pool images were assigned to (same "
                "class): what the metadata adds is the real ISIC 2020 metadata signal, not the pool's.",
                "Share flagged is at the real ISIC 2020 mix (about 1.8% melanoma lesions).",
            ],
        }
        training_data = {
            "kind": "simulated patients",
            "description": (f"simulated patients (seeds {seeds}, concatenated): the real ISIC 2020 patient and "
                            f"lesion structure of {os.path.basename(args.isic_metadata)} filled with held-out "
                            f"pool lesions, assumed within-patient resemblance {levels[0]:g}; not real patients"),
            "resemblance": levels[0], "pool": pool_desc,
            "n_rows": int(len(y_train)), "n_melanoma_rows": int(y_train.sum()),
        }
    for level, summ in by_level.items():
        img = summ["image_only"]
        line = [f"{level}: image only ROC-AUC {img['roc_auc']['mean']:.4f}, "
                f"sens {img['sensitivity']['mean']:.3f} spec {img['specificity']['mean']:.3f} "
                f"flagged {img['share_flagged']['mean']:.1%}"]
        for k in [*FEATURE_SETS, *REJECTED_SETS]:
            s = summ[k]
            line.append(f"  {k}: ROC-AUC {s['roc_auc']['mean']:.4f} ({s['roc_auc_gain_over_image_only']['mean']:+.4f}), "
                        f"sens {s['sensitivity']['mean']:.3f} spec {s['specificity']['mean']:.3f} "
                        f"flagged {s['share_flagged']['mean']:.1%}")
        print("\n".join(line))

    # The exported adjustment: fitted on every row (all folds; all seeds of the first level).
    weights = class_weights(y_train, prevalence)
    final = fit_adjustment(X_train, y_train, FEATURE_SETS[EXPORT_SET], weights=weights)
    model = final.export()
    head = by_level[level0]
    if "real patients" in by_level:
        head["image_only"]["logit_shift_that_would_calibrate_it"] = {
            "mean": report["real_patients"]["results"]["image_only"]["logit_shift_that_would_calibrate_it"]}
    g = lambda k, m: head[k][m]["mean"]  # noqa: E731
    model.update({
        "scale": ("melanoma probability on the image model's scale: no global shift (at a patient's average "
                  "context the score is the image probability), so it is calibrated exactly as far as the image "
                  f"model is (fitted with classes weighted to the pool's {prevalence:.1%} melanoma, the image "
                  "model's calibration mix; logit shift that would recalibrate the image model on these lesions: "
                  f"{head['image_only'].get('logit_shift_that_would_calibrate_it', {}).get('mean', float('nan')):+.3f})"),
        "threshold_note": "none of its own: scores are compared with the model version's threshold",
        "threshold_used_in_evaluation": threshold,
        "constraints": {n: ">= 0" for n in cf.NONNEGATIVE},
        "metrics": {
            "data": training_data["kind"], "assumption": level0,
            "roc_auc_image_only": g("image_only", "roc_auc"),
            "roc_auc_context": g(EXPORT_SET, "roc_auc"),
            "roc_auc_image_plus_ugly_duckling": g("image_plus_ugly_duckling", "roc_auc"),
            "roc_auc_image_plus_metadata": g("image_plus_metadata", "roc_auc"),
            "sensitivity_image_only": g("image_only", "sensitivity"),
            "specificity_image_only": g("image_only", "specificity"),
            "sensitivity_context": g(EXPORT_SET, "sensitivity"),
            "specificity_context": g(EXPORT_SET, "specificity"),
            "share_flagged_image_only": g("image_only", "share_flagged"),
            "share_flagged_context": g(EXPORT_SET, "share_flagged"),
            "by_assumption": {lvl: {k: {m: s[k][m]["mean"] for m in ("roc_auc", "sensitivity", "specificity",
                                                                      "share_flagged")}
                                    for k in ["image_only", *FEATURE_SETS]}
                              for lvl, s in by_level.items()},
        },
        "training_data": training_data,
        "model": f"class-weighted L2 logistic regression (C={LR_C}) with the image logit as offset, no "
                 "intercept (centred, standardised features), ugly-duckling coefficient >= 0 (L-BFGS-B)",
        "created_at": report["created_at"],
        "description": ("Patient-context adjustment of the image logit: lesion-level ugly-duckling distance, age "
                        "when the lesion was first photographed, sex, site. Apply with "
                        "training.context_features.apply_context_model (numpy). Not validated for clinical use."),
    })
    cf.validate_context_model(model)
    check = cf.apply_context_model(json.loads(json.dumps(model)), X_train[:2000])
    if not np.allclose(check, final.predict(X_train[:2000]), atol=1e-9):
        raise AssertionError("exported context model does not reproduce the fitted one")
    report["exported_model"] = {k: model[k] for k in ("feature_names", "coefficients", "intercept", "constraints",
                                                       "scale", "metrics", "training_data")}
    report["seconds"] = round(time.time() - t_start, 1)
    _write_json(os.path.join(args.out, "context_model.json"), model)
    _write_json(os.path.join(args.out, "context_report.json"), report)
    coefs = ", ".join(f"{n} {c:+.3f}" for n, c in zip(model["feature_names"], model["coefficients"])
                      if n in ("ud_distance", "age", "sex_male"))
    print(f"wrote {os.path.join(args.out, 'context_model.json')} and context_report.json ({level0}; {coefs}; "
          f"intercept {model['intercept']:+.3f}; {report['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
