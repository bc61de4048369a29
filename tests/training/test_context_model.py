"""Context model training/export (training/context_model.py) and simulated patients (training/simulate.py)."""
import collections
import csv
import json

import numpy as np
import pytest

from training import context_features as cf
from training import context_model as cm
from training.simulate import patient_profiles, read_isic_metadata, simulate_patients


def write_isic_like(path, n_patients=60, seed=0):
    """A small CSV in the ISIC 2020 ground-truth v2 layout with a real-looking patient structure."""
    rng = np.random.default_rng(seed)
    sites = ["torso", "lower extremity", "upper extremity", "head/neck", "", "palms/soles"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "patient_id", "lesion_id", "sex", "age_approx",
                    "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target"])
        k = 0
        for p in range(n_patients):
            n = int(rng.integers(2, 30))
            n_mel = int(rng.random() < 0.3) + int(rng.random() < 0.1)
            targets = [1] * min(n_mel, n) + [0] * (n - min(n_mel, n))
            sex = rng.choice(["male", "female", ""])
            age = int(rng.integers(4, 18)) * 5
            for t in targets:
                w.writerow([f"ISIC_{k:07d}", f"IP_{p:05d}", f"IL_{k:07d}", sex, age,
                            rng.choice(sites), "melanoma" if t else "nevus",
                            "malignant" if t else "benign", t])
                k += 1
    return path


def write_oof(tmp_path, oof, one_network=True):
    """OOF CSV + embeddings. one_network: rows carry one embedding_model (a `training embed`
    pool); otherwise only a fold column (a `train` export: one network per fold)."""
    path = tmp_path / "oof.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "target", "oof", "group", "fold"] + (["embedding_model"] if one_network else []))
        for i in range(len(oof)):
            w.writerow([oof.image_id[i], oof.target[i], oof.prob[i], f"l:{oof.lesion_id[i]}", i % 5]
                       + (["abc123"] if one_network else []))
    np.save(tmp_path / "emb.npy", oof.embeddings)
    return str(path), str(tmp_path / "emb.npy")


def test_adjustment_json_round_trip_and_constraint():
    rng = np.random.default_rng(0)
    n = 3000
    X = np.zeros((n, len(cf.FEATURE_NAMES)))
    X[:, cm.LOGIT] = rng.normal(-1.5, 1.2, size=n)
    X[:, cm.columns(["ud_distance"])[0]] = rng.uniform(0, 0.6, size=n)
    X[:, cm.columns(["age"])[0]] = rng.integers(20, 85, size=n)
    # truth: melanoma LESS likely when unlike the others (the constraint must hold the weight at 0)
    z = X[:, cm.LOGIT] - 3 * X[:, cm.columns(["ud_distance"])[0]] + 0.03 * (X[:, cm.columns(["age"])[0]] - 50)
    y = (rng.random(n) < cf.sigmoid(z)).astype(int)
    m = cm.fit_adjustment(X, y, ["ud_distance", "age"])
    assert m.coef[0] == 0.0 and m.coef[1] > 0 and m.intercept == 0.0
    free = cm.fit_adjustment(X, y, ["ud_distance", "age"], nonnegative=())
    assert free.coef[0] < 0
    exported = json.loads(json.dumps(m.export()))
    cf.validate_context_model(exported)
    np.testing.assert_allclose(cf.apply_context_model(exported, X), m.predict(X), rtol=1e-10)


def test_class_weights_restore_the_calibration_mix():
    """Rows drawn at 2% prevalence from an image model calibrated at 20%: with the class weights,
    a free intercept finds (almost) no shift; without them it shifts by the prior odds ratio."""
    rng = np.random.default_rng(1)
    n = 40000
    y = (rng.random(n) < 0.02).astype(int)
    # calibrated-at-20% scores: logit = log prior odds (20%) + log likelihood ratio
    llr = np.where(y == 1, rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n))
    llr = llr - 0.0  # likelihood ratio of N(1,1) vs N(-1,1) is exp(2x)
    X = np.zeros((n, len(cf.FEATURE_NAMES)))
    X[:, cm.LOGIT] = np.log(0.2 / 0.8) + 2 * llr
    w = cm.class_weights(y, 0.2)
    assert np.average(y, weights=w) == pytest.approx(0.2)
    shift = cm.fit_adjustment(X, y, [], weights=w, fit_intercept=True).intercept
    assert abs(shift) < 0.15
    unweighted = cm.fit_adjustment(X, y, [], fit_intercept=True).intercept
    assert unweighted < -2


def test_simulation_preserves_profiles(tmp_path):
    rows = read_isic_metadata(write_isic_like(tmp_path / "meta.csv", n_patients=80))
    real = collections.Counter(
        (len(idx), sum(rows[i].target for i in idx)) for idx in patient_profiles(rows).values())
    oof = cm.synthetic_oof(900, dim=8, seed=1)
    sim = simulate_patients(rows, oof.target, oof.lesion_id, n_folds=5, seed=3)
    assert collections.Counter(sim.profiles()) == real  # every real patient once: exact distribution
    assert sim.stats["n_images"] == len(rows) and sim.stats["n_melanoma_images"] == sum(r.target for r in rows)
    # labels come from the pool image and match the real row's class
    np.testing.assert_array_equal(sim.target, oof.target[sim.pool_index])
    # one pool lesion per simulated lesion; no pool lesion twice in a patient; lesions stay in a patient
    pool_lesion = np.array(oof.lesion_id)[sim.pool_index]
    for a, b in sim.patient_slices():
        per_lesion = collections.defaultdict(set)
        for sl, pl in zip(sim.lesion[a:b], pool_lesion[a:b]):
            per_lesion[pl].add(sl)
        assert all(len(v) == 1 for v in per_lesion.values())
        assert len(set(sim.pool_index[a:b].tolist())) == b - a  # no image twice in a patient
        assert len(set(sim.fold[a:b].tolist())) == 1
    lesion_patients = collections.defaultdict(set)
    for sl, p in zip(sim.lesion, sim.patient):
        lesion_patients[sl].add(p)
    assert all(len(v) == 1 for v in lesion_patients.values())
    # fold-partitioned: no pool image is used in two folds
    img_folds = collections.defaultdict(set)
    for i, k in zip(sim.pool_index, sim.fold):
        img_folds[i].add(k)
    assert all(len(v) == 1 for v in img_folds.values())
    # sampling with replacement keeps the distribution approximately
    sim2 = simulate_patients(rows, oof.target, oof.lesion_id, n_patients=2000, seed=4)
    got = collections.Counter(sim2.profiles())
    for prof, c in real.items():
        assert abs(got[prof] / 2000 - c / 80) < 0.05
    assert set(got) <= set(real)


def test_training_on_small_synthetic_data(tmp_path):
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=150)
    oof_csv, emb = write_oof(tmp_path, cm.synthetic_oof(1000, dim=16, seed=2))
    out = tmp_path / "out"
    assert cm.main(["--pool", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--threshold", "0.3",
                    "--out", str(out), "--seeds", "0,1", "--folds", "3"]) == 0
    model = json.loads((out / "context_model.json").read_text())
    report = json.loads((out / "context_report.json").read_text())
    cf.validate_context_model(model)
    assert model["feature_names"] == cf.MODEL_FEATURES and model["intercept"] == 0.0
    assert model["coefficients"][0] >= 0  # ud_distance
    assert model["training_data"]["kind"] == "simulated patients"
    assert "threshold" not in model and report["threshold"]["value"] == 0.3
    sim = report["simulated_patients"]
    assert "SIMULATED" in sim["what"] and sim["seeds"] == [0, 1]
    summary = sim["summary_by_resemblance"]["resemblance 0"]
    for k in ("image_only", *cm.FEATURE_SETS, *cm.REJECTED_SETS):
        assert 0.5 < summary[k]["roc_auc"]["mean"] <= 1
        assert 0 <= summary[k]["share_flagged"]["mean"] <= 1
    # the synthetic data has an ugly-duckling signal: the lesion-level feature must help
    assert summary["image_plus_ugly_duckling"]["roc_auc_gain_over_image_only"]["mean"] > 0
    m = model["metrics"]
    for key in ("share_flagged_image_only", "share_flagged_context", "sensitivity_context", "specificity_context"):
        assert 0 <= m[key] <= 1
    a = report["metadata_real_isic2020"]
    assert 0 <= a["metadata"]["roc_auc_pooled_oof"] <= 1
    assert set(report["rejected_candidates"]) == {"log_n_lesions", "prob_rank_lesions"}
    # the worker's numpy application reproduces the model on fresh features
    X = cf.patient_features([0.2, 0.7], ["A", "B"], embeddings=np.eye(2, 16))
    assert np.all((cf.apply_context_model(model, X) > 0) & (cf.apply_context_model(model, X) < 1))


def test_an_ensemble_holdout_pool_is_read_with_its_calibrated_probability(tmp_path):
    """`python -m training ensemble` writes holdout_predictions.csv (+ float16 1280-d embeddings, card
    beside them): prob_crossfit is the score, card.json's threshold is THE threshold."""
    oof = cm.synthetic_oof(900, dim=1280, seed=4)
    d = tmp_path / "ens"
    d.mkdir()
    with open(d / "holdout_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["embedding_row", "image_id", "source", "group", "lesion_id", "target", "logit_a", "logit_b",
                    "prob_crossfit", "age_approx", "sex", "anatom_site"])
        for i in reversed(range(len(oof))):  # rows in another order than the embeddings
            w.writerow([i, oof.image_id[i], "ham10000", f"l:{oof.lesion_id[i]}", oof.lesion_id[i], oof.target[i],
                        "9.0", "-9.0", f"{oof.prob[i]:.6f}", "", "", ""])
    np.save(d / "holdout_embeddings.npy", oof.embeddings.astype(np.float16))
    (d / "card.json").write_text(json.dumps({"threshold": 0.27}))
    read = cm.read_oof(str(d / "holdout_predictions.csv"), str(d / "holdout_embeddings.npy"))
    assert read.embeddings.shape == (900, 1280) and not read.has_patients
    np.testing.assert_allclose(read.prob[::-1], oof.prob, atol=1e-6)
    np.testing.assert_allclose(read.embeddings[::-1], oof.embeddings.astype(np.float16), atol=1e-3)
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=60)
    out = tmp_path / "out"
    assert cm.main(["--pool", str(d / "holdout_predictions.csv"), "--embeddings", str(d / "holdout_embeddings.npy"),
                    "--isic-metadata", str(meta), "--skip-metadata", "--out", str(out), "--seeds", "0",
                    "--folds", "3"]) == 0
    report = json.loads((out / "context_report.json").read_text())
    assert report["threshold"] == {**report["threshold"], "value": 0.27, "from": "card.json"}
    assert report["simulated_patients"]["pool"]["embedding_dim"] == 1280


def test_simulation_refuses_a_pool_embedded_by_several_networks(tmp_path):
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=40)
    oof_csv, emb = write_oof(tmp_path, cm.synthetic_oof(300, dim=8, seed=2), one_network=False)
    with pytest.raises(SystemExit, match="5 networks.*training embed"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--threshold", "0.3", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "context_model.json").exists()


def _within_patient_spread(sim, desc, cls=0):
    """Mean distance of a patient's class-`cls` images from their centroid (standardized descriptors)."""
    d = (desc - desc.mean(0)) / desc.std(0)
    out = []
    for a, b in sim.patient_slices():
        idx = sim.pool_index[a:b][sim.target[a:b] == cls]
        if len(idx) >= 3:
            out.append(np.linalg.norm(d[idx] - d[idx].mean(0), axis=1).mean())
    return float(np.mean(out))


def test_resemblance_makes_a_patients_benign_lesions_alike_and_keeps_profiles(tmp_path):
    rows = read_isic_metadata(write_isic_like(tmp_path / "meta.csv", n_patients=80))
    oof = cm.synthetic_oof(1500, dim=8, seed=1)
    desc = np.random.default_rng(0).normal(size=(len(oof), 4))
    plain = simulate_patients(rows, oof.target, oof.lesion_id, n_folds=3, seed=3)
    alike = simulate_patients(rows, oof.target, oof.lesion_id, n_folds=3, seed=3, resemblance=1.0,
                              descriptors=desc)
    assert collections.Counter(alike.profiles()) == collections.Counter(plain.profiles())
    np.testing.assert_array_equal(alike.target, oof.target[alike.pool_index])
    assert alike.stats["resemblance"] == 1.0 and plain.stats["resemblance"] == 0.0
    # benign lesions of one patient are much closer together; melanoma rows are not drawn by resemblance
    assert _within_patient_spread(alike, desc) < 0.8 * _within_patient_spread(plain, desc)
    for a, b in alike.patient_slices():
        assert len(set(alike.fold[a:b].tolist())) == 1
    with pytest.raises(ValueError, match="descriptors"):
        simulate_patients(rows, oof.target, oof.lesion_id, resemblance=0.5)
    with pytest.raises(ValueError, match="resemblance"):
        simulate_patients(rows, oof.target, oof.lesion_id, resemblance=1.5, descriptors=desc)


def test_context_command_compares_resemblance_levels(tmp_path):
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=120)
    oof = cm.synthetic_oof(1000, dim=16, seed=2)
    oof_csv, emb = write_oof(tmp_path, oof)
    desc_path = tmp_path / "colour.npy"
    # descriptors that follow the embeddings (as colour follows appearance)
    np.save(desc_path, np.asarray(oof.embeddings, dtype=np.float64)[:, :6])
    out = tmp_path / "out"
    assert cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                    "--descriptors", str(desc_path), "--resemblance", "0.75,0", "--out", str(out),
                    "--seeds", "0", "--folds", "3", "--threshold", "0.3"]) == 0
    model = json.loads((out / "context_model.json").read_text())
    report = json.loads((out / "context_report.json").read_text())
    assert model["training_data"]["resemblance"] == 0.75
    assert "resemblance 0.75" in model["training_data"]["description"]
    sim = report["simulated_patients"]
    assert sim["exported_resemblance"] == 0.75
    assert set(sim["summary_by_resemblance"]) == {"resemblance 0.75", "resemblance 0"}
    assert set(model["metrics"]["by_assumption"]) == {"resemblance 0.75", "resemblance 0"}
    with pytest.raises(SystemExit, match="descriptors"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--resemblance", "0.5", "--threshold", "0.3", "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="resemblance"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--descriptors", str(desc_path), "--resemblance", "2", "--threshold", "0.3",
                 "--out", str(tmp_path / "o3")])
    with pytest.raises(SystemExit, match="threshold"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--out", str(tmp_path / "o4")])


def test_real_patient_ids_are_used(tmp_path):
    oof = cm.synthetic_oof(800, dim=8, seed=5, with_patients=True)
    path = tmp_path / "oof.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "patient_id", "lesion_id", "target", "prob", "sex", "age_approx",
                    "anatom_site_general_challenge"])
        for i in range(len(oof)):
            w.writerow([oof.image_id[i], oof.patient_id[i], oof.lesion_id[i], oof.target[i], oof.prob[i],
                        oof.sex[i], oof.age[i], oof.site[i]])
    np.save(tmp_path / "emb.npy", oof.embeddings)
    out = tmp_path / "out"
    cm.main(["--oof", str(path), "--embeddings", str(tmp_path / "emb.npy"), "--skip-metadata",
             "--isic-metadata", "", "--out", str(out), "--folds", "3", "--threshold", "0.3"])
    report = json.loads((out / "context_report.json").read_text())
    assert "real_patients" in report and "simulated_patients" not in report
    assert json.loads((out / "context_model.json").read_text())["training_data"]["kind"] == "real patients"


def test_bad_oof_is_refused(tmp_path):
    (tmp_path / "oof.csv").write_text("image_id,target\nA,1\n")
    np.save(tmp_path / "emb.npy", np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="probability"):
        cm.read_oof(str(tmp_path / "oof.csv"), str(tmp_path / "emb.npy"))
    (tmp_path / "oof.csv").write_text("image_id,target,oof\nA,1,0.5\nB,0,0.1\n")
    with pytest.raises(ValueError, match="rows"):
        cm.read_oof(str(tmp_path / "oof.csv"), str(tmp_path / "emb.npy"))
