"""Invariance and monotonicity of the lesion-level context (training/context_features.py), on
random patients and a context model with every allowed feature."""
import numpy as np
import pytest

from training import context_features as cf

DIM = 24


def model(ud_coef=2.0, seed=0):
    rng = np.random.default_rng(seed)
    names = list(cf.MODEL_FEATURES)
    coef = rng.normal(size=len(names))
    coef[names.index("ud_distance")] = ud_coef
    return {"format": cf.MODEL_FORMAT, "kind": cf.MODEL_KIND, "feature_version": cf.FEATURE_VERSION,
            "feature_names": names, "means": [0.2] + [0.0] * (len(names) - 1), "scales": [0.1] + [1.0] * (len(names) - 1),
            "coefficients": coef.tolist(), "intercept": -0.2}


def random_patient(rng, n_lesions=6):
    base = rng.normal(size=DIM)
    lesions = [f"L{k}" for k in range(n_lesions)]
    probs = rng.uniform(0.02, 0.8, size=n_lesions)
    emb = base + rng.normal(scale=0.6, size=(n_lesions, DIM))
    sites = rng.choice(["Trunk:Posterior trunk", "Upper extremity:Shoulder", "Lower extremity:Thigh"], n_lesions)
    ages = [55.0] * n_lesions
    return lesions, probs, emb, list(sites), ages


def scores(m, lesions, probs, emb, sites, ages, order=None):
    X = cf.patient_features(probs, lesions, embeddings=emb, sites=sites, ages=ages,
                            sexes=["female"] * len(lesions), order=order)
    return cf.apply_context_model(m, X), X


@pytest.mark.parametrize("seed", range(5))
def test_follow_up_photos_of_an_unchanged_lesion_change_no_score(seed):
    rng = np.random.default_rng(seed)
    lesions, probs, emb, sites, ages = random_patient(rng)
    m = model(seed=seed)
    before, _ = scores(m, lesions, probs, emb, sites, ages)
    # 24 follow-up photos of lesion L2, unchanged (same probability and embedding), later in time,
    # a year older each (age is the age at the lesion's FIRST photo)
    k = 24
    lesions2 = lesions + ["L2"] * k
    probs2 = np.r_[probs, [probs[2]] * k]
    emb2 = np.vstack([emb, np.tile(emb[2], (k, 1))])
    after, X = scores(m, lesions2, probs2, emb2, sites + [sites[2]] * k, ages + [56.0 + j for j in range(k)])
    np.testing.assert_allclose(after[:len(lesions)], before, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(after[len(lesions):], before[2], rtol=1e-12, atol=1e-12)
    # nothing counts images
    assert not any("image" in f for f in cf.FEATURE_NAMES)


@pytest.mark.parametrize("seed", range(5))
def test_duplicating_benign_lesions_does_not_change_an_unrelated_lesion(seed):
    rng = np.random.default_rng(seed)
    lesions, probs, emb, sites, ages = random_patient(rng)
    m = model(seed=seed)
    before, _ = scores(m, lesions, probs, emb, sites, ages)
    # duplicate every lesion except L0 (the unrelated one) three times, under new lesion ids
    extra = [(f"{lid}-copy{c}", probs[i], emb[i], sites[i]) for c in range(3) for i, lid in enumerate(lesions) if i]
    lesions2 = lesions + [e[0] for e in extra]
    after, _ = scores(m, lesions2, np.r_[probs, [e[1] for e in extra]], np.vstack([emb, [e[2] for e in extra]]),
                      sites + [e[3] for e in extra], ages + [55.0] * len(extra))
    assert after[0] == pytest.approx(before[0], abs=1e-12)
    threshold = 0.3
    assert (after[0] >= threshold) == (before[0] >= threshold)


@pytest.mark.parametrize("seed", range(5))
def test_making_a_lesion_more_unlike_the_others_never_lowers_its_score(seed):
    """Lesion L0 takes 40 different looks (all else fixed): whenever one look is farther from the
    other lesions than another (higher ugly-duckling distance), its score is not lower."""
    rng = np.random.default_rng(seed)
    lesions, probs, emb, sites, ages = random_patient(rng)
    m = model(seed=seed)
    centre = emb[1:].mean(0)
    results = []
    for t in np.linspace(0, 4, 40):
        e = emb.copy()
        e[0] = centre + t * rng.normal(size=DIM)
        s, X = scores(m, lesions, probs, e, sites, ages)
        results.append((X[0, cf.FEATURE_NAMES.index("ud_distance")], s[0]))
    results.sort()
    d, s = np.array(results).T
    assert d[-1] > d[0] + 0.1  # the looks really differ
    assert np.all(np.diff(s) >= -1e-12)


def test_a_model_with_a_negative_ugly_duckling_weight_or_a_count_is_refused():
    with pytest.raises(ValueError, match="ud_distance"):
        cf.validate_context_model(model(ud_coef=-0.5))
    bad = model()
    bad["feature_names"][1] = "log_n_lesions"
    with pytest.raises(ValueError, match="not allowed"):
        cf.validate_context_model(bad)


def test_no_context_is_the_image_probability():
    """A model with zero weights and intercept returns the image probability exactly (one scale)."""
    m = model()
    m["coefficients"] = [0.0] * len(m["coefficients"])
    m["intercept"] = 0.0
    rng = np.random.default_rng(3)
    lesions, probs, emb, sites, ages = random_patient(rng)
    s, _ = scores(m, lesions, probs, emb, sites, ages)
    np.testing.assert_allclose(s, probs, rtol=1e-9)
