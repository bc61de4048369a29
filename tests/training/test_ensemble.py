"""Ensemble model versions end to end on tiny generated data: an ImageNet-initialised
EfficientNet-Lite0 member and an SE-ResNet50 member distilled from it, trained on the same
lesion-grouped folds; the combiner, calibration and threshold fitted on the held-out fold; the
bundle scored by ``evaluate`` through the worker's path, per source."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from training.cli import main as cli_main
from training.ensemble import ENSEMBLE_FORMAT, load_bundle, save_ensemble
from training.network import MelanomaNet

from .fixtures import make_dermoscopy


def _two_sources(root):
    """Two folders with different `source` values (the report must split them)."""
    a = make_dermoscopy(os.path.join(root, "a"), n=24, seed=0)
    b = make_dermoscopy(os.path.join(root, "b"), n=24, seed=5)
    path = os.path.join(b, "labels.csv")
    with open(path) as f:
        rows = list(csv.reader(f))
    for r in rows[1:]:
        r[0] = "B" + r[0]
        r[1] = "other"
        r[6] = ("B" + r[6]) if r[6] else ""
    for i, r in enumerate(rows[1:]):
        os.rename(os.path.join(b, "images", f"{r[0][1:]}.jpg"), os.path.join(b, "images", f"{r[0]}.jpg"))
        r[8] = f"images/{r[0]}.jpg"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return f"{a},{b}"


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    base = tmp_path_factory.mktemp("ens")
    data = _two_sources(str(base / "data"))
    common = ["--data", data, "--folds", "2", "--only-folds", "0", "--epochs", "1", "--batch-size", "8",
              "--eval-batch-size", "16", "--select", "last", "--no-export", "--cache-dir", str(base / "cache")]
    lite = str(base / "lite")
    assert cli_main(["train", "--out", lite, "--backbone", "efficientnet_lite0", "--pretrained", "imagenet",
                     "--size", "64", *common]) == 0
    # teacher logits for every record from the Lite member (what the SE-ResNet50 distils from)
    teacher = str(base / "teacher.csv")
    assert cli_main(["evaluate", "--checkpoint", os.path.join(lite, "fold0", "best.pt"), "--data", data,
                     "--predictions", teacher, "--bootstrap", "10"]) == 0
    se = str(base / "se")
    os.makedirs(se)
    import shutil

    shutil.copyfile(os.path.join(lite, "folds.csv"), os.path.join(se, "folds.csv"))
    assert cli_main(["train", "--out", se, "--backbone", "se_resnet50", "--size", "48",
                     "--teacher-logits", teacher, "--distill-alpha", "0.7", *common]) == 0
    out = str(base / "export")
    assert cli_main(["ensemble", "--member", lite, "--member", se, "--out", out, "--name", "tiny-ens",
                     "--cv", "2", "--bootstrap", "30"]) == 0
    return data, out, lite, se


def test_ensemble_bundle_holds_both_members_and_a_held_out_card(ensemble):
    data, out, lite, se = ensemble
    raw = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert raw["format"] == ENSEMBLE_FORMAT
    assert [m["backbone"] for m in raw["members"]] == ["efficientnet_lite0", "se_resnet50"]
    assert [m["input_size"] for m in raw["members"]] == [64, 48]
    assert all(v.dtype == torch.float16 for m in raw["members"] for v in m["state_dict"].values()
               if v.is_floating_point())
    card = json.load(open(os.path.join(out, "card.json")))
    assert card["architecture"] == "ensemble: efficientnet_lite0 + se_resnet50"
    assert card["embedding"] == {"member": "efficientnet_lite0", "dim": 1280,
                                 "description": card["embedding"]["description"]}
    m = card["metrics"]
    assert set(m["per_source"]) == {"gen", "other"}
    n_hold = sum(v["n"] for v in m["per_source"].values())
    assert m["n"] == n_hold and 0 < n_hold < 48
    for v in [m, *m["per_source"].values()]:
        assert {"roc_auc", "roc_auc_ci95", "pauc_80", "sensitivity", "specificity", "calibration"} <= set(v)
        assert {"slope", "intercept", "ece"} <= set(v["calibration"])
    assert m["specificity_ci95"][0] <= m["specificity"] <= m["specificity_ci95"][1]
    assert 0 < card["threshold"] < 1 and card["threshold_method"].startswith("sens>=0.9")
    members = {x["name"]: x for x in card["members"]}
    assert members["efficientnet_lite0"]["pretrained_weights"] == "imagenet"
    assert members["efficientnet_lite0"]["normalisation"] == "tf-lite"
    assert members["se_resnet50"]["training"]["teacher_logits"] == "teacher.csv"
    assert len(card["combiner"]["what_each_member_adds"]) == 2
    assert "CC-BY-NC" in card["provenance"]["licence"] and card["validated"] is False
    # the held-out predictions are exactly the images no member trained on
    folds = {r["image_id"]: r["fold"] for r in csv.DictReader(open(os.path.join(out, "folds.csv")))}
    rows = list(csv.DictReader(open(os.path.join(out, "holdout_predictions.csv"))))
    assert len(rows) == n_hold and all(folds[r["image_id"]] == "0" for r in rows)


def test_bundle_probability_is_the_combiner_over_member_forward_passes(ensemble):
    data, out, lite, se = ensemble
    bundle = load_bundle(os.path.join(out, "model.pt"))
    assert bundle.is_ensemble and bundle.input_sizes == [48, 64] and bundle.embedding_dim == 1280
    images = sorted(os.path.join(data.split(",")[0], "images", f) for f in
                    os.listdir(os.path.join(data.split(",")[0], "images")))[:5]
    res = bundle.predict_files(images)
    # recompute by hand: each member on its own input size/normalisation with flip TTA
    from training.preprocessing import load_rgb, to_batch

    logits = []
    for m in bundle.members:
        x = to_batch([load_rgb(p, m.input_size) for p in images], m.normalisation)
        with torch.no_grad():
            logits.append(m.model.forward_tta(x, tta=m.tta)[0].numpy())
    z = bundle.bias + np.stack(logits, 1).astype(np.float64) @ bundle.weights
    np.testing.assert_allclose(res.logits, z, atol=1e-4)
    np.testing.assert_allclose(res.probabilities, 1 / (1 + np.exp(-z)), atol=1e-5)
    assert res.embeddings.shape == (5, 1280) and res.member_logits.shape == (5, 2)


def test_evaluate_scores_the_bundle_per_source_and_ends_with_one_json_line(ensemble, capsys):
    data, out, lite, se = ensemble
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", os.path.join(out, "model.pt"), "--data", data,
                     "--bootstrap", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["n"] == 48 and res["architecture"] == "ensemble: efficientnet_lite0 + se_resnet50"
    assert set(res["per_source"]) == {"gen", "other"} and isinstance(res["roc_auc"], float)
    assert {"slope", "intercept", "ece"} <= set(res["calibration"])
    assert set(res["members"]) == {"efficientnet_lite0", "se_resnet50"}
    assert any(line.startswith("pooled") for line in lines) and any(line.startswith("other") for line in lines)


def test_members_must_share_folds(ensemble, tmp_path):
    data, out, lite, se = ensemble
    import shutil

    bad = tmp_path / "se"
    shutil.copytree(se, bad)
    rows = list(csv.reader(open(bad / "folds.csv")))
    rows[1][3], rows[2][3] = rows[2][3], rows[1][3]
    rows[1][3] = "1" if rows[1][3] == "0" else "0"
    csv.writer(open(bad / "folds.csv", "w", newline="")).writerows(rows)
    with pytest.raises(ValueError, match="folds"):
        cli_main(["ensemble", "--member", lite, "--member", str(bad), "--out", str(tmp_path / "o")])


def test_load_bundle_refuses_a_combiner_that_does_not_fit_its_members(tmp_path):
    from training.ensemble import Member

    net = MelanomaNet("efficientnet_lite0")
    path = tmp_path / "e.pt"
    save_ensemble(path, [Member("a", net, {"input_size": 32})], weights=[1.0], bias=0.0,
                  embedding_member=0, card={})
    raw = torch.load(path, weights_only=True)
    raw["combiner"]["weights"] = [1.0, 2.0]
    torch.save(raw, path)
    with pytest.raises(ValueError, match="combiner needs 1 finite weights"):
        load_bundle(path)
    with pytest.raises(ValueError):
        save_ensemble(path, [Member("a", net, {"input_size": 32})], weights=[1.0, 1.0], bias=0.0,
                      embedding_member=0, card={})


def test_a_single_checkpoint_is_a_one_member_bundle_with_the_identity_combiner(tmp_path):
    from training.network import save_checkpoint

    net = MelanomaNet("se_resnet50").eval()
    path = tmp_path / "one.pt"
    save_checkpoint(path, net, {"input_size": 32, "tta": False}, fp16=False)
    b = load_bundle(path)
    assert not b.is_ensemble and list(b.weights) == [1.0] and b.bias == 0.0
    arr = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    res = b.predict_arrays({32: arr})
    from training.preprocessing import to_batch

    with torch.no_grad():
        lo = net(to_batch(arr)).numpy()
    np.testing.assert_allclose(res.probabilities, 1 / (1 + np.exp(-lo.astype(np.float64))), atol=1e-5)
