"""Metrics in plain numpy (tests check them against scikit-learn).

* ``roc_auc(y, p)`` -- area under the ROC curve, ties counted as 1/2 (Mann-Whitney).
* ``partial_auc_above_tpr(y, p, min_tpr=0.8)`` -- the ISIC 2024 challenge pAUC: the area under the
  ROC curve *above* TPR = ``min_tpr``, i.e. integral over FPR in [0, 1] of max(TPR(FPR) - min_tpr, 0)
  with the ROC curve linearly interpolated between its points. It is NOT rescaled: values lie in
  [0, 1 - min_tpr], so 0.2 is perfect for min_tpr = 0.8 and a random classifier scores
  (1 - min_tpr)^2 / 2 = 0.02. The challenge computed the same number as
  ``0.5*m**2 + (m - 0.5*m**2) / 0.5 * (roc_auc_score(1 - y, -p, max_fpr=m) - 0.5)`` with
  m = 1 - min_tpr (undoing scikit-learn's McClish standardisation on the label-flipped problem).
* ``sensitivity_specificity(y, p, threshold)`` -- positive means ``p >= threshold``.
* ``choose_threshold(y, p, method)`` -- "sens>=0.9" (largest threshold whose sensitivity is at least
  0.9, i.e. the most specific such operating point) or "youden" (max sens + spec - 1).
* ``bootstrap_ci(metric_fn, y, p, n=1000, seed=0, groups=None)`` -- percentile 95% interval;
  with ``groups`` whole groups (patients/lesions) are resampled.
"""
from __future__ import annotations

import numpy as np


def _check(y, p):
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.shape} vs {p.shape}")
    return y, p


def roc_curve(y, p):
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf."""
    y, p = _check(y, p)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1]
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    P, N = tps[-1], fps[-1]
    if P == 0 or N == 0:
        raise ValueError("ROC needs both classes present")
    fpr = np.r_[0.0, fps / N]
    tpr = np.r_[0.0, tps / P]
    thr = np.r_[np.inf, ps[distinct]]
    return fpr, tpr, thr


def roc_auc(y, p) -> float:
    fpr, tpr, _ = roc_curve(y, p)
    return float(np.trapezoid(tpr, fpr))


def partial_auc_above_tpr(y, p, min_tpr: float = 0.8) -> float:
    fpr, tpr, _ = roc_curve(y, p)
    f0, f1, t0, t1 = fpr[:-1], fpr[1:], tpr[:-1] - min_tpr, tpr[1:] - min_tpr
    width = f1 - f0
    area = np.zeros_like(width)
    both = (t0 >= 0) & (t1 >= 0)
    area[both] = width[both] * (t0[both] + t1[both]) / 2
    cross = (t0 < 0) & (t1 > 0)  # tpr rises through min_tpr inside the segment
    frac = t1[cross] / (t1[cross] - t0[cross])
    area[cross] = width[cross] * frac * t1[cross] / 2
    return float(area.sum())


def sensitivity_specificity(y, p, threshold: float) -> tuple[float, float]:
    y, p = _check(y, p)
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def choose_threshold(y, p, method: str = "sens>=0.9") -> float:
    fpr, tpr, thr = roc_curve(y, p)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point
    if method.startswith("sens>="):
        target = float(method.split(">=")[1])
        ok = np.nonzero(tpr >= target - 1e-12)[0]
        return float(thr[ok[0]])  # thresholds decrease: first ok point is the highest threshold
    if method == "youden":
        return float(thr[np.argmax(tpr - fpr)])
    raise ValueError(f"unknown threshold method {method!r}; use 'sens>=X' or 'youden'")


def bootstrap_ci(metric_fn, y, p, n: int = 1000, seed: int = 0, groups=None, alpha: float = 0.05):
    """Return (estimate, low, high): the metric on all data and the percentile bootstrap interval.
    Resamples with one class missing are skipped (and redrawn)."""
    y, p = _check(y, p)
    est = float(metric_fn(y, p))
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        uniq, inv = np.unique(groups, return_inverse=True)
        members = [[] for _ in range(len(uniq))]
        for i, g in enumerate(inv):
            members[g].append(i)
        members = [np.asarray(m) for m in members]
    vals = []
    tries = 0
    while len(vals) < n and tries < n * 10:
        tries += 1
        if groups is None:
            idx = rng.integers(0, len(y), len(y))
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        yy = y[idx]
        if yy.min() == yy.max():
            continue
        vals.append(float(metric_fn(yy, p[idx])))
    vals = np.asarray(vals)
    return est, float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def calibration(y, p, n_bins: int = 10) -> dict:
    """Calibration of probabilities ``p``: the slope and intercept of a logistic regression of ``y``
    on logit(p) (perfect: slope 1, intercept 0), the expected calibration error over ``n_bins``
    equal-width bins (ECE: the bin-size-weighted mean |mean p - observed rate|), and the mean
    predicted probability against the observed rate."""
    y, p = _check(y, p)
    eps = 1e-6
    pc = np.clip(p, eps, 1 - eps)
    z = np.log(pc / (1 - pc))
    out = {"mean_predicted": float(p.mean()), "observed_rate": float(y.mean()), "n_bins": n_bins}
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    out["ece"] = float(ece)
    if 0 < y.sum() < len(y):
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), y)
        out["slope"] = float(lr.coef_[0, 0])
        out["intercept"] = float(lr.intercept_[0])
    else:
        out["slope"] = out["intercept"] = None
    return out


def summary_with_ci(y, p, threshold: float, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """ROC-AUC, pAUC above 80% sensitivity, sensitivity and specificity at ``threshold`` (positive
    when ``p >= threshold``), each with a percentile bootstrap 95% interval over whole ``groups``,
    and calibration. Ranking metrics are None where one class is missing."""
    y, p = _check(y, p)
    out = {"n": int(len(y)), "n_melanoma": int(y.sum())}
    both = 0 < y.sum() < len(y)
    for name, fn, s in (("roc_auc", roc_auc, 1), ("pauc_80", partial_auc_above_tpr, 2)):
        if both:
            est, lo, hi = bootstrap_ci(fn, y, p, n=n_boot, seed=seed + s, groups=groups)
            out[name], out[f"{name}_ci95"] = est, [lo, hi]
        else:
            out[name], out[f"{name}_ci95"] = None, None

    def sens(yy, pp):
        return sensitivity_specificity(yy, pp, threshold)[0]

    def spec(yy, pp):
        return sensitivity_specificity(yy, pp, threshold)[1]

    for name, fn, s, ok in (("sensitivity", sens, 3, y.sum() > 0), ("specificity", spec, 4, (y == 0).any())):
        if ok and both:
            est, lo, hi = bootstrap_ci(fn, y, p, n=n_boot, seed=seed + s, groups=groups)
            out[name], out[f"{name}_ci95"] = est, [lo, hi]
        else:
            out[name] = sensitivity_specificity(y, p, threshold)[0 if name == "sensitivity" else 1]
            out[f"{name}_ci95"] = None
    out["threshold"] = float(threshold)
    out["calibration"] = calibration(y, p)
    return out
