"""Pure-numpy tests of the patient-context features (training/context_features.py)."""
import math

import numpy as np
import pytest

from training import context_features as cf

F = {name: k for k, name in enumerate(cf.FEATURE_NAMES)}


def feats(X, name):
    return X[:, F[name]]


def test_one_image_has_documented_values():
    X = cf.patient_features([0.3], ["L1"], embeddings=np.ones((1, 8)), sites=["Trunk:Posterior trunk"],
                            ages=[52], sexes=["female"])
    assert X.shape == (1, len(cf.FEATURE_NAMES))
    assert np.isfinite(X).all()
    row = cf.features_to_dict(X[0])
    assert row["n_other_lesions"] == 0 and row["ud_rank"] == 1 and row["prob_rank_lesions"] == 0.5
    assert row["ud_distance"] == 0.0
    assert row["log_n_lesions"] == pytest.approx(math.log(2))
    assert row["logit_prob"] == pytest.approx(math.log(0.3 / 0.7))
    assert row["age"] == 52 and row["age_missing"] == 0
    assert row["sex_female"] == 1 and row["sex_male"] == 0
    assert row["site_torso"] == 1 and sum(row[s] for s in cf.SITE_FEATURES) == 1


def test_empty_patient():
    assert cf.patient_features([], []).shape == (0, len(cf.FEATURE_NAMES))


def test_no_feature_counts_images_and_models_may_not_use_counts_or_ranks():
    assert not any("image" in f for f in cf.FEATURE_NAMES)
    assert "log_n_lesions" not in cf.MODEL_FEATURES and "prob_rank_lesions" not in cf.MODEL_FEATURES
    assert set(cf.REJECTED_CANDIDATES) <= set(cf.DISPLAY_FEATURES)


def test_one_lesion_several_images_distance_zero_and_lesion_age_is_its_first_photo():
    rng = np.random.default_rng(0)
    X = cf.patient_features([0.1, 0.2, 0.9], ["A", "A", "A"], embeddings=rng.normal(size=(3, 16)),
                            ages=[61, 50, 70], order=[1, 0, 2])
    assert np.all(feats(X, "ud_distance") == 0.0)
    assert np.all(feats(X, "n_other_lesions") == 0)
    assert np.all(feats(X, "age") == 50)  # the earliest image (order 0) was taken at 50


def test_identical_embeddings_distance_zero_and_ties():
    e = np.tile(np.arange(1, 9, dtype=np.float64), (4, 1))
    X = cf.patient_features([0.5, 0.5, 0.5, 0.5], ["A", "B", "C", "D"], embeddings=e)
    np.testing.assert_allclose(feats(X, "ud_distance"), 0, atol=1e-12)
    assert np.all(feats(X, "prob_rank_lesions") == 0.5)
    assert np.all(feats(X, "n_other_lesions") == 3)


def test_zero_and_missing_embeddings():
    e = np.zeros((3, 8))
    X = cf.patient_features([0.1, 0.5, 0.9], ["A", "B", "C"], embeddings=e)
    assert np.isfinite(X).all() and np.all(feats(X, "ud_distance") == 0)
    X = cf.patient_features([0.1, 0.5, 0.9], ["A", "B", "C"], embeddings=None)
    assert np.all(feats(X, "ud_distance") == 0)
    # One zero vector among usable ones: it gets 0 and is left out of the others' sum.
    e = np.array([[1.0, 0, 0], [1.0, 0.1, 0], [0, 0, 0], [0, 1.0, 0]])
    d, k = cf.ugly_duckling_distance(e, ["A", "B", "C", "D"])
    assert d[2] == 0.0 and k[2] == 0 and k[0] == 2
    d_without, _ = cf.ugly_duckling_distance(e[[0, 1, 3]], ["A", "B", "D"])
    np.testing.assert_allclose(d[[0, 1, 3]], d_without)
    # NaN embedding counts as missing
    e = np.array([[np.nan, 1.0], [1.0, 0.0], [0.0, 1.0]])
    d, _ = cf.ugly_duckling_distance(e, ["A", "B", "C"])
    assert d[0] == 0 and np.isfinite(d).all()


def test_extreme_and_nan_probabilities_are_finite():
    X = cf.patient_features([0.0, 1.0, float("nan")], ["A", "B", "C"])
    assert np.isfinite(X).all()
    assert feats(X, "logit_prob")[2] == 0.0  # NaN -> 0.5


def test_sites_and_probability_rank_among_other_lesions():
    sites = ["Trunk:Posterior trunk", "Trunk:Anterior trunk", "Head and neck:Head:Face",
             "Trunk:Lateral trunk", "", "Lower extremity:Foot:Sole of foot:Heel"]
    p = [0.1, 0.4, 0.9, 0.2, 0.3, 0.6]
    X = cf.patient_features(p, list("ABCDEF"), sites=sites)
    np.testing.assert_allclose(feats(X, "prob_rank_lesions"), np.array([0, 3, 5, 1, 2, 4]) / 5)
    assert X[4, F["site_unknown"]] == 1 and X[5, F["site_palms_soles"]] == 1 and X[2, F["site_head_neck"]] == 1


def test_general_site_mapping():
    assert cf.general_site("Trunk:Posterior trunk:Upper back") == "torso"
    assert cf.general_site("Upper extremity:Hand:Palm of hand:Thenar eminence") == "palms/soles"
    assert cf.general_site("Upper extremity:Hand:Dorsum of hand") == "upper extremity"
    assert cf.general_site("Lower extremity:Foot:Sole of foot") == "palms/soles"
    assert cf.general_site("Anogenital region:Genital region") == "oral/genital"
    assert cf.general_site("Head and neck:Head:Face:Mouth:Tongue") == "oral/genital"
    assert cf.general_site("Head and neck:Neck") == "head/neck"
    assert cf.general_site("torso") == "torso" and cf.general_site("") == "unknown"
    assert cf.general_site(None) == "unknown" and cf.general_site("Trunkated") == "unknown"


def brute_force_ud(emb, lesions, order):
    """Leave-one-lesion-out cosine distance, written the slow obvious way."""
    n = len(lesions)
    latest = {}
    for i in range(n):
        if lesions[i] not in latest or order[i] >= order[latest[lesions[i]]]:
            latest[lesions[i]] = i
    out = []
    for i in range(n):
        others = [emb[j] / np.linalg.norm(emb[j]) for l, j in latest.items() if l != lesions[i]]
        if not others:
            out.append(0.0)
            continue
        m = np.sum(others, axis=0)
        out.append(1 - emb[i] @ m / (np.linalg.norm(emb[i]) * np.linalg.norm(m)))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 12
    lesions = [f"L{k}" for k in rng.integers(0, 5, size=n)]
    order = rng.permutation(n)
    emb = rng.normal(size=(n, 10)) + 0.5
    got, _ = cf.ugly_duckling_distance(emb, lesions, order)
    np.testing.assert_allclose(got, brute_force_ud(emb, lesions, order), atol=1e-10)
    # Only the latest image of each OTHER lesion matters: changing an older image of lesion A
    # changes nothing for images of other lesions.
    latest_a = max((i for i in range(n) if lesions[i] == lesions[0]), key=lambda i: order[i])
    older = [i for i in range(n) if lesions[i] == lesions[0] and i != latest_a]
    if older:
        emb2 = emb.copy()
        emb2[older[0]] = rng.normal(size=10)
        got2, _ = cf.ugly_duckling_distance(emb2, lesions, order)
        others = [i for i in range(n) if lesions[i] != lesions[0]]
        np.testing.assert_allclose(got2[others], got[others])


def test_clearly_different_lesion_has_highest_distance():
    rng = np.random.default_rng(3)
    base = rng.normal(size=32)
    emb = np.vstack([base + rng.normal(scale=0.1, size=32) for _ in range(5)] + [rng.normal(size=32) * 3])
    X = cf.patient_features([0.2] * 6, list("ABCDEF"), embeddings=emb)
    d = feats(X, "ud_distance")
    assert d.argmax() == 5 and d[5] > 5 * np.median(d[:5])
    assert feats(X, "ud_rank")[5] == 1 and sorted(feats(X, "ud_rank")) == [1, 2, 3, 4, 5, 6]


def test_percentile_rank_and_zscore():
    np.testing.assert_allclose(cf.percentile_rank([3, 1, 2]), [1, 0, 0.5])
    np.testing.assert_allclose(cf.percentile_rank([1, 1, 2]), [0.25, 0.25, 1])
    np.testing.assert_allclose(cf.percentile_rank([7]), [0.5])
    assert cf.zscore([4.0]).tolist() == [0.0]


def test_apply_context_model_and_validation():
    model = {"kind": cf.MODEL_KIND, "feature_version": cf.FEATURE_VERSION, "feature_names": ["ud_distance", "age"],
             "means": [0.1, 50.0], "scales": [0.0, 10.0], "coefficients": [3.0, 0.5], "intercept": -1.0}
    X = cf.patient_features([0.5, 0.9], ["A", "B"], embeddings=np.eye(2), ages=[60, 40])
    p = cf.apply_context_model(model, X)
    z = X[:, F["logit_prob"]] + 3 * (X[:, F["ud_distance"]] - 0.1) + 0.5 * (X[:, F["age"]] - 50) / 10 - 1
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)))  # zero scale -> 1
    contrib, adj = cf.context_contributions(model, X)
    np.testing.assert_allclose(adj, z - X[:, F["logit_prob"]])
    assert contrib.shape == (2, 2)
    with pytest.raises(ValueError):
        cf.apply_context_model({**model, "feature_names": ["nope", "ud_distance"]}, X)
    with pytest.raises(ValueError):
        cf.validate_context_model({**model, "coefficients": [1.0]})
    with pytest.raises(ValueError, match="feature version"):
        cf.validate_context_model({**model, "feature_version": cf.FEATURE_VERSION + 1})
    with pytest.raises(ValueError, match="kind"):
        cf.validate_context_model({**model, "kind": "logistic_regression"})  # version 1 models: retrain
    assert cf.sigmoid(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]
