"""Patient-context model: train, evaluate and export (``python -m training context ...``).

    python -m training context --oof OOF.csv --embeddings EMB.npy [--isic-metadata CSV] --out DIR

* ``--oof``: out-of-fold predictions, one row per image (``training.export`` writes
  ``oof_predictions.csv``). Columns (first match wins): an id (``image_id``/``image_name``/
  ``isic_id``), the score (``logit``, else a probability: ``oof``/``oof_prob``/``prob``/
  ``probability``/``pred``/``prediction``), the label (``target``/``melanoma``/``label``), and
  optionally ``patient_id``, ``lesion_id`` (else derived from ``group`` = ``l:<lesion>``),
  ``age_approx``/``age``, ``sex``, ``anatom_site_general_challenge``/``anatom_site``/``site``,
  ``embedding_row`` (row of the embeddings file; default: same row order).
* ``--embeddings``: ``.npy`` float array (n_images, d) aligned with the OOF rows.
* With patient ids in the OOF (a Kaggle ``train.csv`` layout run, e.g. ISIC 2020 images): the
  context model is learned and evaluated on those real patients (patient-grouped
  StratifiedGroupKFold), missing age/sex/site are joined from ``--isic-metadata`` by image id.
* Without patient ids (``../shared/data/dermoscopy``): **simulated patients** (see
  ``training.simulate``) drawn from the real ISIC 2020 structure in ``--isic-metadata``, for each
  of ``--seeds``; CV over the simulation's folds (patient-grouped and image-disjoint). The pool
  must be in ONE embedding space (``python -m training embed`` builds it from the shipped
  checkpoint's own validation fold; a multi-fold export is refused). ``--resemblance R1,R2,..``
  (with ``--descriptors``) evaluates each assumed within-patient resemblance level and exports
  the model of the first; the report adds an odd-one-out check on the pool's real images.
* Always when ``--isic-metadata`` is readable: (a) the metadata-only model on the REAL ISIC 2020
  metadata with patient-grouped CV (StratifiedGroupKFold by patient_id).
* Writes ``DIR/context_model.json`` (the logistic regression the worker applies with numpy:
  ``training.context_features.apply_context_model``) and ``DIR/context_report.json``.
  ``--metadata-only``: only (a), no OOF needed. ``--synthetic N``: make synthetic OOF data (for
  development and tests) instead of reading ``--oof``.
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import context_features as cf
from .hashing import file_sha256
from .simulate import read_isic_metadata, simulate_patients, standardize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ISIC_METADATA = os.path.normpath(os.path.join(
    REPO_ROOT, "..", "shared", "data", "isic2020", "ISIC_2020_Training_GroundTruth_v2.csv"
))
LR_C = 1.0

ID_COLUMNS = ("image_id", "image_name", "isic_id")
PROB_COLUMNS = ("oof", "oof_prob", "oof_probability", "prob", "probability", "pred", "prediction")
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
    # A logit column (training.export writes one) is more precise than a rounded probability.
    c_logit = "logit" if "logit" in cols else None
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

def features_for_groups(patient_keys, prob, lesion, embeddings, site, age, sex, order=None) -> np.ndarray:
    """Feature matrix for many patients: rows grouped by ``patient_keys`` (any order)."""
    n = len(prob)
    X = np.zeros((n, len(cf.FEATURE_NAMES)))
    groups: dict = {}
    for i, k in enumerate(patient_keys):
        groups.setdefault(k, []).append(i)
    order = np.arange(n) if order is None else np.asarray(order)
    for idx in groups.values():
        idx = np.asarray(idx)
        X[idx] = cf.patient_features(
            prob[idx], [lesion[i] for i in idx],
            embeddings=None if embeddings is None else embeddings[idx],
            sites=[site[i] for i in idx], ages=age[idx], sexes=[sex[i] for i in idx], order=order[idx],
        )
    return X


def columns(names) -> list[int]:
    return [cf.FEATURE_NAMES.index(n) for n in names]


# --- model -------------------------------------------------------------------------------------

def fit_lr(X: np.ndarray, y: np.ndarray, C: float = LR_C):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    model.fit(X, y)
    return model


def export_lr(model, feature_names: list[str]) -> dict:
    scaler, lr = model[0], model[-1]
    return {
        "format": cf.MODEL_FORMAT,
        "kind": "logistic_regression",
        "feature_version": cf.FEATURE_VERSION,
        "feature_names": list(feature_names),
        "means": [float(v) for v in scaler.mean_],
        "scales": [float(v) for v in scaler.scale_],
        "coefficients": [float(v) for v in lr.coef_.ravel()],
        "intercept": float(lr.intercept_[0]),
    }


def auc(y, p) -> float | None:
    y = np.asarray(y)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


def choose_threshold(y, p, min_sensitivity: float = 0.9) -> float:
    """Largest threshold whose sensitivity (p >= t) is at least ``min_sensitivity``."""
    y = np.asarray(y)
    pos = np.sort(np.asarray(p)[y == 1])[::-1]
    k = int(np.ceil(min_sensitivity * len(pos))) - 1
    return float(pos[max(0, min(k, len(pos) - 1))])


def sens_spec(y, p, t) -> tuple[float, float]:
    y, p = np.asarray(y), np.asarray(p)
    return float((p[y == 1] >= t).mean()), float((p[y == 0] < t).mean())


def _summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def cross_validate(X, y, fold, feature_sets: dict[str, list[str]], C=LR_C, image_prob=None) -> dict:
    """Per feature set: per-fold AUC, mean +- sd, pooled OOF AUC and the OOF scores."""
    out = {}
    folds = sorted(set(fold.tolist()))
    if image_prob is not None:
        out["image_only"] = {
            "features": ["image probability (out-of-fold, as given)"],
            "fold_auc": [auc(y[fold == k], image_prob[fold == k]) for k in folds],
            "pooled_auc": auc(y, image_prob),
            "oof": np.asarray(image_prob, dtype=np.float64),
        }
    for name, feats in feature_sets.items():
        cols = columns(feats)
        oof = np.zeros(len(y))
        for k in folds:
            tr, te = fold != k, fold == k
            oof[te] = fit_lr(X[tr][:, cols], y[tr], C).predict_proba(X[te][:, cols])[:, 1]
        out[name] = {
            "features": feats,
            "fold_auc": [auc(y[fold == k], oof[fold == k]) for k in folds],
            "pooled_auc": auc(y, oof),
            "oof": oof,
        }
    for r in out.values():
        r["fold_auc_mean_sd"] = _summary(r["fold_auc"])
    return out


def _public(cv: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "oof"} for k, v in cv.items()}


# --- (a) metadata on the real ISIC 2020 metadata -------------------------------------------------

def evaluate_metadata(isic_path: str, n_folds: int = 5, seed: int = 42) -> dict:
    rows = read_isic_metadata(isic_path)
    y = np.array([r.target for r in rows])
    pid = [r.patient_id for r in rows]
    X = features_for_groups(
        pid, np.full(len(rows), 0.5), [r.lesion_id for r in rows], None,
        [r.site for r in rows], np.array([r.age for r in rows]), [r.sex for r in rows],
    )
    fold = np.full(len(rows), -1)
    for k, (_, te) in enumerate(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(X, y, pid)):
        fold[te] = k
    no_counts = cf.DEMOGRAPHIC_FEATURES + cf.SITE_FEATURES
    cv = cross_validate(X, y, fold, {"metadata": cf.METADATA_FEATURES, "without_patient_statistics": no_counts})
    res = _public(cv)["metadata"]
    base = _public(cv)["without_patient_statistics"]
    full = fit_lr(X[:, columns(cf.METADATA_FEATURES)], y)
    coefs = dict(zip(cf.METADATA_FEATURES, (round(float(c), 4) for c in full[-1].coef_.ravel())))
    return {
        "what": "(a) metadata-only context model on the REAL ISIC 2020 training metadata (no images)",
        "data": os.path.basename(isic_path),
        "n_images": len(rows), "n_patients": len(set(pid)), "n_melanoma": int(y.sum()),
        "features": cf.METADATA_FEATURES,
        "model": f"StandardScaler + LogisticRegression(C={LR_C})",
        "cv": f"{n_folds}-fold StratifiedGroupKFold grouped by patient_id (shuffle, random_state={seed})",
        "fold_auc": res["fold_auc"],
        "roc_auc_mean_sd_over_folds": res["fold_auc_mean_sd"],
        "roc_auc_pooled_oof": res["pooled_auc"],
        "standardized_coefficients_all_data": coefs,
        "comparison_without_patient_statistics": {
            "features": no_counts,
            "roc_auc_mean_sd_over_folds": base["fold_auc_mean_sd"],
            "roc_auc_pooled_oof": base["pooled_auc"],
        },
    }


# --- (b) image part ------------------------------------------------------------------------------

FEATURE_SETS = {
    # ablations: image logit + one group of context features
    "image_plus_ugly_duckling": ["logit_prob", "ud_distance", "ud_rank_patient"],
    "image_plus_patient_counts": ["logit_prob", *cf.COUNT_FEATURES],
    # image probability + the within-patient image features only (ranks, z-scores, ugly duckling)
    "image_plus_image_context": cf.IMAGE_CONTEXT_FEATURES,
    # + the patient's image/lesion/region counts
    "image_plus_context": cf.IMAGE_AND_CONTEXT_FEATURES,
    # + age, sex, site: the exported model
    "image_plus_context_plus_metadata": cf.FEATURE_NAMES,
}
EXPORT_SET = "image_plus_context_plus_metadata"


def _simulated_features(oof: OOFData, sim) -> np.ndarray:
    pi = sim.pool_index
    return features_for_groups(
        sim.patient.tolist(), oof.prob[pi], sim.lesion.tolist(), oof.embeddings[pi],
        sim.site, sim.age, sim.sex, order=sim.order,
    )


def evaluate_simulated(oof: OOFData, isic_path: str, seeds, n_folds=5, n_patients=None, log=print,
                       resemblance: float = 0.0, descriptors=None):
    check_one_embedding_space(oof, per_patient=False)
    rows = read_isic_metadata(isic_path)
    per_seed, X_all, y_all, first = [], [], [], None
    for s in seeds:
        t0 = time.time()
        sim = simulate_patients(rows, oof.target, oof.lesion_id, n_patients=n_patients, n_folds=n_folds, seed=s,
                                resemblance=resemblance, descriptors=descriptors)
        X = _simulated_features(oof, sim)
        y = sim.target
        cv = cross_validate(X, y, sim.fold, FEATURE_SETS, image_prob=oof.prob[sim.pool_index])
        pub = _public(cv)
        delta = {k: pub[k]["pooled_auc"] - pub["image_only"]["pooled_auc"] for k in FEATURE_SETS}
        per_seed.append({"seed": s, "simulation": sim.stats, "auc": pub, "pooled_auc_gain_over_image_only": delta})
        log(f"  simulated patients (resemblance {resemblance:g}) seed {s}: image-only AUC {pub['image_only']['pooled_auc']:.4f}, "
            + ", ".join(f"{k} {pub[k]['pooled_auc']:.4f}" for k in FEATURE_SETS) + f" ({time.time() - t0:.1f}s)")
        X_all.append(X)
        y_all.append(y)
        if first is None:
            first = (y, cv[EXPORT_SET]["oof"])
    summary = {}
    for k in ["image_only", *FEATURE_SETS]:
        summary[k] = {
            "pooled_auc_over_seeds": _summary([r["auc"][k]["pooled_auc"] for r in per_seed]),
            "fold_auc_over_seeds_and_folds": _summary([a for r in per_seed for a in r["auc"][k]["fold_auc"]]),
        }
    for k in FEATURE_SETS:
        summary[k]["pooled_gain_over_image_only"] = _summary([r["pooled_auc_gain_over_image_only"][k] for r in per_seed])
    return per_seed, summary, np.concatenate(X_all), np.concatenate(y_all), first


def odd_one_out_check(oof: OOFData, descriptors, model: dict, n_trials: int = 500, n_similar: int = 5,
                     seed: int = 0) -> dict:
    """What the exported model does with a clearly different lesion, on real pool images.

    Per trial: a melanoma image X; patient A = X + the ``n_similar`` benign images most like a
    random benign signature image (in colour descriptors); patient B = X + the ``n_similar``
    benign images most like X itself. Same probabilities would rank X the same in both; only
    its dissimilarity from the other lesions differs. Reports how often X's ugly-duckling distance
    and final score are higher in A (as the odd one out) than in B, and the median score ratio.
    """
    rng = np.random.default_rng(seed)
    d = standardize(descriptors)
    benign, melanoma = np.flatnonzero(oof.target == 0), np.flatnonzero(oof.target == 1)
    if len(benign) <= n_similar or not len(melanoma):
        return {}
    ud_col = cf.FEATURE_NAMES.index("ud_distance")
    ud_higher, score_higher, ratios = [], [], []
    for _ in range(n_trials):
        x = int(rng.choice(melanoma))
        signature = int(rng.choice(benign))
        out = []
        for anchor in (signature, x):
            others = benign[np.argsort(np.linalg.norm(d[benign] - d[anchor], axis=1), kind="stable")[:n_similar]]
            idx = np.r_[others, x]
            X = cf.patient_features(oof.prob[idx], list(range(len(idx))), embeddings=oof.embeddings[idx],
                                    sites=["torso"] * len(idx), ages=[50] * len(idx), sexes=[""] * len(idx))
            out.append((X[-1, ud_col], float(cf.apply_context_model(model, X)[-1])))
        (ud_a, s_a), (ud_b, s_b) = out
        ud_higher.append(ud_a > ud_b)
        score_higher.append(s_a > s_b)
        ratios.append(s_a / s_b)
    return {
        "what": (f"{n_trials} trials on the pool's real images: a melanoma image as the odd one out among "
                 f"{n_similar} benign images that resemble each other (colour nearest neighbours of a "
                 f"random benign image) vs the same image among {n_similar} benign images that resemble it"),
        "ud_distance_higher_as_odd_one_out": float(np.mean(ud_higher)),
        "final_score_higher_as_odd_one_out": float(np.mean(score_higher)),
        "median_final_score_ratio": float(np.median(ratios)),
    }


def evaluate_real_patients(oof: OOFData, n_folds=5, seed=42):
    check_one_embedding_space(oof, per_patient=True)
    pid = oof.patient_id
    lesion = [l or f"img:{i}" for i, l in zip(oof.image_id, oof.lesion_id)]
    X = features_for_groups(pid, oof.prob, lesion, oof.embeddings, oof.site, oof.age, oof.sex)
    y = oof.target
    fold = np.full(len(y), -1)
    for k, (_, te) in enumerate(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(X, y, pid)):
        fold[te] = k
    cv = cross_validate(X, y, fold, FEATURE_SETS, image_prob=oof.prob)
    pub = _public(cv)
    res = {"cv": f"{n_folds}-fold StratifiedGroupKFold grouped by patient_id (random_state={seed})",
           "auc": pub,
           "pooled_auc_gain_over_image_only": {k: pub[k]["pooled_auc"] - pub["image_only"]["pooled_auc"]
                                               for k in FEATURE_SETS}}
    return res, X, y, (y, cv[EXPORT_SET]["oof"])


# --- main ----------------------------------------------------------------------------------------



def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training context", description=__doc__.split("\n\n")[0])
    ap.add_argument("--oof", help="out-of-fold predictions CSV (one row per image)")
    ap.add_argument("--embeddings", help=".npy embeddings aligned with --oof")
    ap.add_argument("--isic-metadata", default=DEFAULT_ISIC_METADATA,
                    help="ISIC 2020 ground-truth CSV (real patient structure); default: %(default)s")
    ap.add_argument("--out", required=True, help="output folder for context_model.json + context_report.json")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="simulation seeds (simulated patients only)")
    ap.add_argument("--sim-patients", type=int, default=None,
                    help="simulated patients per seed (default: every real ISIC 2020 patient once)")
    ap.add_argument("--min-sensitivity", type=float, default=0.9,
                    help="context threshold: largest with this sensitivity on the pooled OOF context scores")
    ap.add_argument("--metadata-only", action="store_true", help="only (a): metadata model on real ISIC 2020 metadata")
    ap.add_argument("--skip-metadata", action="store_true", help="skip (a)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="use N synthetic OOF images instead of --oof/--embeddings (development)")
    ap.add_argument("--model-name", default="", help="image model version the OOF came from (recorded)")
    ap.add_argument("--descriptors", default=None,
                    help="colour descriptors .npy aligned with --oof (`training embed` writes "
                         "context_pool_colour.npy); needed for --resemblance above 0")
    ap.add_argument("--resemblance", default="0",
                    help="simulated patients only: comma-separated within-patient resemblance levels "
                         "in [0, 1] (an assumption: see training/simulate.py); every level is evaluated, "
                         "the FIRST one trains the exported model")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    have_meta = bool(args.isic_metadata) and os.path.isfile(args.isic_metadata)
    report: dict = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "feature_version": cf.FEATURE_VERSION,
        "feature_names": cf.FEATURE_NAMES,
        "command": "python -m training context " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if not args.skip_metadata:
        if not have_meta:
            print(f"no ISIC 2020 metadata at {args.isic_metadata}: skipping (a)", file=sys.stderr)
        else:
            a = evaluate_metadata(args.isic_metadata, n_folds=args.folds)
            report["metadata_real_isic2020"] = a
            m = a["roc_auc_mean_sd_over_folds"]
            b = a["comparison_without_patient_statistics"]
            print(f"(a) metadata-only on real ISIC 2020 ({a['n_patients']} patients, {a['n_images']} images): "
                  f"ROC-AUC {m['mean']:.4f} +- {m['sd']:.4f} over {m['n']} patient-grouped folds, "
                  f"pooled OOF {a['roc_auc_pooled_oof']:.4f} (age/sex/site alone: "
                  f"{b['roc_auc_mean_sd_over_folds']['mean']:.4f} +- {b['roc_auc_mean_sd_over_folds']['sd']:.4f}, "
                  f"pooled {b['roc_auc_pooled_oof']:.4f})")
    if args.metadata_only:
        _write_json(os.path.join(args.out, "context_report.json"), report)
        return 0

    if args.synthetic:
        oof = synthetic_oof(args.synthetic)
        sources = {"oof": oof.source}
    else:
        if not (args.oof and args.embeddings):
            raise SystemExit("--oof and --embeddings are required (or --synthetic N / --metadata-only)")
        oof = read_oof(args.oof, args.embeddings, args.isic_metadata if have_meta else None)
        sources = {"oof": os.path.basename(args.oof), "oof_sha256": file_sha256(args.oof),
                   "embeddings": os.path.basename(args.embeddings), "embeddings_sha256": file_sha256(args.embeddings)}
    pool_desc = {**sources, "n_images": len(oof), "n_melanoma": int(oof.target.sum()),
                 "embedding_dim": int(oof.embeddings.shape[1]),
                 "image_only_auc_of_the_oof": auc(oof.target, oof.prob)}
    if args.model_name:
        pool_desc["image_model"] = args.model_name

    descriptors_for_check = None
    if oof.has_patients:
        res, X_train, y_train, (y_thr, p_thr) = evaluate_real_patients(oof, n_folds=args.folds)
        report["real_patients"] = {"what": "image part on REAL patients (patient ids from the OOF file)",
                                   "feature_sets": FEATURE_SETS, "exported_feature_set": EXPORT_SET,
                                   "data": pool_desc, **res}
        training_data = {"kind": "real patients", **pool_desc, "n_patients": len(set(oof.patient_id))}
        for k in ["image_only", *FEATURE_SETS]:
            print(f"(b) real patients: {k}: pooled OOF ROC-AUC {res['auc'][k]['pooled_auc']:.4f}")
        headline = {k: res["auc"][k]["pooled_auc"] for k in ["image_only", *FEATURE_SETS]}
    else:
        if not have_meta:
            raise SystemExit(f"the OOF has no patient ids and there is no ISIC 2020 metadata at {args.isic_metadata} "
                             "to simulate patients from")
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
                raise SystemExit(f"{args.descriptors}: expected one row per --oof row ({len(oof)}), "
                                 f"got shape {descriptors.shape}")
        elif any(v > 0 for v in levels):
            raise SystemExit("--resemblance above 0 needs --descriptors (context_pool_colour.npy from "
                             "`python -m training embed`)")
        try:
            check_one_embedding_space(oof, per_patient=False)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        print(f"(b) simulated patients: ISIC 2020 structure x {len(oof)} pool images, seeds {seeds}, "
              f"resemblance {levels}")
        comparison = {}
        for level in levels[1:]:
            _, summ, _, _, _ = evaluate_simulated(oof, args.isic_metadata, seeds, n_folds=args.folds,
                                                 n_patients=args.sim_patients, resemblance=level,
                                                 descriptors=descriptors)
            comparison[str(level)] = {k: summ[k]["pooled_auc_over_seeds"] for k in ["image_only", *FEATURE_SETS]}
        per_seed, summary, X_train, y_train, (y_thr, p_thr) = evaluate_simulated(
            oof, args.isic_metadata, seeds, n_folds=args.folds, n_patients=args.sim_patients,
            resemblance=levels[0], descriptors=descriptors)
        descriptors_for_check = descriptors
        comparison[str(levels[0])] = {k: summary[k]["pooled_auc_over_seeds"] for k in ["image_only", *FEATURE_SETS]}
        report["simulated_patients"] = {
            "what": ("image part on SIMULATED PATIENTS: real ISIC 2020 patient profiles (rows, melanoma rows, "
                     "age/sex/site per row) filled with the pool images' out-of-fold probabilities and "
                     "embeddings (same class, grouped by lesion_id, no lesion twice in one patient). "
                     "Not real patients."),
            "how_measured": (f"per seed: patients and pool lesions dealt into {args.folds} folds (stratified), a "
                             "patient only gets images of its fold, so the CV is patient-grouped and "
                             "image-disjoint; logistic regression on standardized features trained on 4 folds, "
                             "scored on the 5th; ROC-AUC per fold and over all pooled out-of-fold scores. "
                             "image_only = the pool's OOF image probability on the same simulated images."),
            "resemblance": levels[0],
            "resemblance_meaning": (
                "probability that a simulated patient's benign lesion is the pool lesion most like the patient's "
                "random 'signature' benign lesion in model-independent colour descriptors (else a random one); "
                "melanomas are always random. 0 = plain random fill. An ASSUMPTION standing in for the "
                "resemblance of one person's naevi, which these data cannot measure (see training/simulate.py)."),
            "resemblance_comparison_pooled_auc": comparison,
            "caveats": [
                "Simulated patients are not real patients: a simulated patient's lesions come from different "
                "real people. With resemblance 0 they do not resemble each other more than any two lesions do, "
                "so the 'ugly duckling' sign cannot exist; with resemblance > 0 the resemblance of one person's "
                "benign lesions is ASSUMED (in colour), and the ugly-duckling gain measured depends on that "
                "assumption. Only real multi-lesion patients can measure it.",
                "Age, sex and site come from the real ISIC 2020 rows the images were assigned to (same class), "
                "so image_plus_context_plus_metadata includes the real metadata signal measured in (a).",
                "Pool images are reused across simulated patients of the same fold (never within a patient, "
                "never across folds).",
            ],
            "feature_sets": {"image_only": ["image probability as given (no model)"], **FEATURE_SETS},
            "exported_feature_set": EXPORT_SET,
            "image_pool": pool_desc,
            "isic_metadata": os.path.basename(args.isic_metadata),
            "seeds": seeds,
            "summary": summary,
            "per_seed": per_seed,
        }
        training_data = {
            "kind": "simulated patients",
            "description": (f"simulated patients (seeds {seeds}, all concatenated): the real ISIC 2020 patient "
                            f"structure of {os.path.basename(args.isic_metadata)} filled with {len(oof)} pool "
                            "images' out-of-fold predictions and embeddings, assumed within-patient "
                            f"resemblance {levels[0]:g}; not real patients"),
            "resemblance": levels[0],
            "pool": pool_desc,
            "n_rows": int(len(y_train)), "n_melanoma_rows": int(y_train.sum()),
        }
        for level, res in comparison.items():
            print(f"(b) simulated patients, resemblance {level}: image only "
                  f"{res['image_only']['mean']:.4f}, image + context {res['image_plus_context']['mean']:.4f}, "
                  f"+ metadata {res[EXPORT_SET]['mean']:.4f}")
        for k in ["image_only", *FEATURE_SETS]:
            s = summary[k]["pooled_auc_over_seeds"]
            print(f"(b) simulated patients (resemblance {levels[0]:g}): {k}: pooled OOF ROC-AUC {s['mean']:.4f} +- {s['sd']:.4f} over seeds")
        headline = {k: summary[k]["pooled_auc_over_seeds"]["mean"] for k in ["image_only", *FEATURE_SETS]}

    # The exported model: LR on every row (all folds; all seeds for simulated patients).
    feats = FEATURE_SETS[EXPORT_SET]
    final = fit_lr(X_train[:, columns(feats)], y_train)
    model = export_lr(final, feats)
    thr = choose_threshold(y_thr, p_thr, args.min_sensitivity)
    sens, spec = sens_spec(y_thr, p_thr, thr)
    model.update({
        "threshold": thr,
        "threshold_method": (f"largest threshold with sensitivity >= {args.min_sensitivity} on the pooled "
                             "out-of-fold context scores (first seed for simulated patients)"),
        "metrics": {
            "data": training_data["kind"],
            "roc_auc_image_only": headline["image_only"],
            "roc_auc_context": headline[EXPORT_SET],
            "roc_auc_image_plus_context_without_metadata": headline["image_plus_context"],
            "sensitivity_at_threshold": sens, "specificity_at_threshold": spec,
            **({"roc_auc_metadata_only_real_isic2020": report["metadata_real_isic2020"]["roc_auc_pooled_oof"]}
               if "metadata_real_isic2020" in report else {}),
        },
        "training_data": training_data,
        "model": f"StandardScaler + LogisticRegression(C={LR_C}, lbfgs)",
        "output": ("context-adjusted melanoma score, calibrated to the training population's prevalence "
                   f"({y_train.mean():.2%} melanoma), not to the image model's"),
        "created_at": report["created_at"],
        "description": ("Patient-context model: logistic regression on the image probability (logit) and the "
                        "within-patient context features of training/context_features.py. Apply with "
                        "training.context_features.apply_context_model (numpy). Not validated for clinical use."),
    })
    cf.validate_context_model(model)
    # Round trip: the JSON model equals scikit-learn's predict_proba on the training rows.
    check = cf.apply_context_model(json.loads(json.dumps(model)), X_train[:2000])
    ref = final.predict_proba(X_train[:2000][:, columns(feats)])[:, 1]
    if not np.allclose(check, ref, atol=1e-9):
        raise AssertionError("exported context model does not reproduce predict_proba")
    if descriptors_for_check is not None:
        check_ud = odd_one_out_check(oof, descriptors_for_check, model)
        if check_ud:
            report["odd_one_out_check"] = check_ud
            print(f"odd-one-out check: ud distance higher in {check_ud['ud_distance_higher_as_odd_one_out']:.0%}, "
                  f"final score higher in {check_ud['final_score_higher_as_odd_one_out']:.0%} of trials "
                  f"(median score ratio {check_ud['median_final_score_ratio']:.2f})")
    report["exported_model"] = {k: model[k] for k in ("feature_names", "coefficients", "intercept", "threshold",
                                                       "threshold_method", "metrics", "training_data")}
    report["seconds"] = round(time.time() - t_start, 1)
    _write_json(os.path.join(args.out, "context_model.json"), model)
    _write_json(os.path.join(args.out, "context_report.json"), report)
    print(f"wrote {os.path.join(args.out, 'context_model.json')} and context_report.json "
          f"(threshold {thr:.4f}: sensitivity {sens:.3f}, specificity {spec:.3f}; {report['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
