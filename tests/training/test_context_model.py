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


def test_json_round_trip_equals_predict_proba(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(cf.FEATURE_NAMES))) * rng.uniform(0.1, 30, size=len(cf.FEATURE_NAMES))
    y = (X[:, 4] / 30 + rng.normal(size=400) > 0.5).astype(int)
    feats = cf.FEATURE_NAMES[2:12]
    model = cm.fit_lr(X[:, cm.columns(feats)], y)
    exported = json.loads(json.dumps(cm.export_lr(model, feats)))
    np.testing.assert_allclose(cf.apply_context_model(exported, X),
                               model.predict_proba(X[:, cm.columns(feats)])[:, 1], rtol=1e-10, atol=1e-12)


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
    assert cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta),
                    "--out", str(out), "--seeds", "0,1", "--folds", "3"]) == 0
    model = json.loads((out / "context_model.json").read_text())
    report = json.loads((out / "context_report.json").read_text())
    cf.validate_context_model(model)
    assert model["feature_names"] == cf.FEATURE_NAMES
    assert model["training_data"]["kind"] == "simulated patients"
    assert 0 < model["threshold"] < 1
    sim = report["simulated_patients"]
    assert "SIMULATED" in sim["what"] and sim["seeds"] == [0, 1] and len(sim["per_seed"]) == 2
    for k in ("image_only", "image_plus_context", "image_plus_context_plus_metadata"):
        s = sim["summary"][k]["pooled_auc_over_seeds"]
        assert 0.5 < s["mean"] <= 1
    # the synthetic data has an ugly-duckling signal: context must help
    assert sim["summary"]["image_plus_context"]["pooled_gain_over_image_only"]["mean"] > 0
    a = report["metadata_real_isic2020"]
    assert len(a["fold_auc"]) == 3 and 0 <= a["roc_auc_pooled_oof"] <= 1
    # the worker's numpy application reproduces the model on fresh features
    X = cf.patient_features([0.2, 0.7], ["A", "B"], embeddings=np.eye(2, 16))
    assert np.all((cf.apply_context_model(model, X) > 0) & (cf.apply_context_model(model, X) < 1))


def test_simulation_refuses_a_pool_embedded_by_several_networks(tmp_path):
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=40)
    oof_csv, emb = write_oof(tmp_path, cm.synthetic_oof(300, dim=8, seed=2), one_network=False)
    with pytest.raises(SystemExit, match="5 networks.*training embed"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--out", str(tmp_path / "out")])
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


def test_context_command_compares_resemblance_levels_and_checks_the_odd_one_out(tmp_path):
    meta = write_isic_like(tmp_path / "meta.csv", n_patients=120)
    oof = cm.synthetic_oof(1000, dim=16, seed=2)
    oof_csv, emb = write_oof(tmp_path, oof)
    desc_path = tmp_path / "colour.npy"
    # descriptors that follow the embeddings (as colour follows appearance)
    np.save(desc_path, np.asarray(oof.embeddings, dtype=np.float64)[:, :6])
    out = tmp_path / "out"
    assert cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                    "--descriptors", str(desc_path), "--resemblance", "0.75,0", "--out", str(out),
                    "--seeds", "0", "--folds", "3"]) == 0
    model = json.loads((out / "context_model.json").read_text())
    report = json.loads((out / "context_report.json").read_text())
    assert model["training_data"]["resemblance"] == 0.75
    assert "resemblance 0.75" in model["training_data"]["description"]
    sim = report["simulated_patients"]
    assert sim["resemblance"] == 0.75 and set(sim["resemblance_comparison_pooled_auc"]) == {"0.75", "0.0"}
    check = report["odd_one_out_check"]
    assert 0 <= check["final_score_higher_as_odd_one_out"] <= 1
    # synthetic melanoma embeddings are shifted away from the benign cluster: the odd one out is seen
    assert check["ud_distance_higher_as_odd_one_out"] > 0.5
    with pytest.raises(SystemExit, match="descriptors"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--resemblance", "0.5", "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="resemblance"):
        cm.main(["--oof", oof_csv, "--embeddings", emb, "--isic-metadata", str(meta), "--skip-metadata",
                 "--descriptors", str(desc_path), "--resemblance", "2", "--out", str(tmp_path / "o3")])


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
             "--isic-metadata", "", "--out", str(out), "--folds", "3"])
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
