import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve as sk_roc_curve

from training import metrics as M


def _data(seed, n=400, ties=True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    p = rng.random(n) * 0.7 + y * 0.4 * rng.random(n)
    return y, (np.round(p, 2) if ties else p)


def _isic2024_pauc(y, p, min_tpr=0.8):
    # the challenge's published scoring code, via scikit-learn
    m = 1 - min_tpr
    s = roc_auc_score(1 - np.asarray(y), -np.asarray(p), max_fpr=m)
    return 0.5 * m ** 2 + (m - 0.5 * m ** 2) / (1.0 - 0.5) * (s - 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_pauc_match_sklearn(seed):
    y, p = _data(seed, ties=seed % 2 == 0)
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.partial_auc_above_tpr(y, p, 0.8) == pytest.approx(_isic2024_pauc(y, p), abs=1e-12)
    assert M.partial_auc_above_tpr(y, p, 0.7) == pytest.approx(_isic2024_pauc(y, p, 0.7), abs=1e-12)
    fpr, tpr, _ = M.roc_curve(y, p)
    sfpr, stpr, _ = sk_roc_curve(y, p, drop_intermediate=False)
    assert np.allclose(fpr, sfpr) and np.allclose(tpr, stpr)


def test_pauc_bounds():
    y = np.array([0, 0, 1, 1])
    assert M.partial_auc_above_tpr(y, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.2)
    assert M.partial_auc_above_tpr(y, [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 20000)
    assert M.partial_auc_above_tpr(yy, rng.random(20000)) == pytest.approx(0.02, abs=0.004)


@pytest.mark.parametrize("thr", [0.2, 0.45, 0.7])
def test_sensitivity_specificity_match_confusion_matrix(thr):
    y, p = _data(3)
    tn, fp, fn, tp = confusion_matrix(y, (p >= thr).astype(int)).ravel()
    sens, spec = M.sensitivity_specificity(y, p, thr)
    assert sens == pytest.approx(tp / (tp + fn))
    assert spec == pytest.approx(tn / (tn + fp))


def test_choose_threshold():
    y, p = _data(4)
    t = M.choose_threshold(y, p, "sens>=0.9")
    sens, _ = M.sensitivity_specificity(y, p, t)
    assert sens >= 0.9
    higher = p[p > t]
    if len(higher):  # the next higher threshold would fall below 0.9
        assert M.sensitivity_specificity(y, p, higher.min())[0] < 0.9
    fpr, tpr, thr = sk_roc_curve(y, p)
    assert M.choose_threshold(y, p, "youden") == pytest.approx(thr[np.argmax(tpr - fpr)])


def test_bootstrap_ci():
    y, p = _data(5)
    est, lo, hi = M.bootstrap_ci(M.roc_auc, y, p, n=200, seed=0)
    assert est == pytest.approx(roc_auc_score(y, p))
    assert lo < est < hi and hi - lo < 0.3
    assert (est, lo, hi) == M.bootstrap_ci(M.roc_auc, y, p, n=200, seed=0)
    groups = np.arange(len(y)) // 2
    g = M.bootstrap_ci(M.roc_auc, y, p, n=200, seed=0, groups=groups)
    assert g[1] < est < g[2]
