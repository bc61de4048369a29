"""A full run on tiny generated images: 2 folds, 1 epoch, 64 px, random init, then export,
load_checkpoint and the evaluate command."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from training.cli import main as cli_main
from training.export import OOF_COLUMNS
from training.network import load_checkpoint

from .fixtures import make_dermoscopy


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trainrun")
    data = make_dermoscopy(str(base / "data"), n=24)
    out, export = str(base / "run"), str(base / "export")
    rc = cli_main(["train", "--data", data, "--out", out, "--export", export, "--size", "64",
                   "--folds", "2", "--epochs", "1", "--batch-size", "8", "--bootstrap", "50",
                   "--eval-batch-size", "16"])
    assert rc == 0
    return data, out, export


def test_run_exports_a_loadable_model(run):
    data, out, export = run
    for name in ("model.pt", "card.json", "oof_predictions.csv", "oof_embeddings.npy", "folds.csv",
                 "roc.png"):
        assert os.path.isfile(os.path.join(export, name)), name
    model, card = load_checkpoint(os.path.join(export, "model.pt"))
    assert model.backbone_name == "se_resnet50" and card["input_size"] == 64
    assert "Not validated for clinical use." in card["disclaimer"]
    with open(os.path.join(export, "card.json")) as f:
        assert json.load(f) == json.loads(json.dumps(card))
    m = card["metrics"]
    for k in ("roc_auc", "pauc_80", "sensitivity", "specificity"):
        assert m[f"{k}_ci95"][0] <= m[k] <= m[f"{k}_ci95"][1]
    assert m["n"] == 24 and m["n_melanoma"] == 8 and len(m["per_fold"]) == 2
    assert 0 < card["threshold"] < 1 and card["code_version"]
    raw = torch.load(os.path.join(export, "model.pt"), weights_only=True)
    assert raw["state_dict"]["head.weight"].dtype == torch.float16


def test_oof_files(run):
    data, out, export = run
    with open(os.path.join(export, "oof_predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == OOF_COLUMNS and len(rows) == 24
    emb = np.load(os.path.join(export, "oof_embeddings.npy"))
    assert emb.shape == (24, 2048) and emb.dtype == np.float16 and np.isfinite(emb).all()
    assert [int(r["embedding_row"]) for r in rows] == list(range(24))
    # fold in the OOF file is the fold the image was held out in; groups never cross folds
    folds = {}
    for r in rows:
        folds.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in folds.values())
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert {x["fold"] for x in lines} == {0, 1} and all("val_auc" in x for x in lines)


def test_rerun_resumes_and_evaluate_prints_json(run, capsys):
    data, out, export = run
    capsys.readouterr()
    assert cli_main(["train", "--data", data, "--out", out, "--export", export, "--size", "64",
                     "--folds", "2", "--epochs", "1", "--batch-size", "8", "--bootstrap", "20",
                     "--no-export"]) == 0
    assert "already done" in capsys.readouterr().out
    assert cli_main(["evaluate", "--checkpoint", os.path.join(export, "model.pt"), "--data", data,
                     "--no-tta"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["n"] == 24 and res["n_melanoma"] == 8
    for k in ("roc_auc", "pauc_80", "sensitivity", "specificity"):
        assert k in res


def test_embed_builds_a_one_network_pool_from_the_shipped_folds_held_out_images(run, tmp_path, capsys):
    from training import context_model as cm
    from training.hashing import file_sha256

    data, out, export = run
    card = json.load(open(os.path.join(export, "card.json")))
    fold = card["metrics"]["shipped_fold_on_its_validation"]["fold"]
    oof_path = os.path.join(export, "oof_predictions.csv")
    # the export's OOF embeddings come from one network per fold: simulation must refuse them
    export_oof = cm.read_oof(oof_path, os.path.join(export, "oof_embeddings.npy"))
    with pytest.raises(ValueError, match="training embed"):
        cm.check_one_embedding_space(export_oof, per_patient=False)
    capsys.readouterr()
    assert cli_main(["embed", "--checkpoint", os.path.join(export, "model.pt"), "--oof", oof_path,
                     "--data", data, "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(oof_path) as f:
        held_out = [r for r in csv.DictReader(f) if int(r["fold"]) == fold]
    assert res["fold"] == fold and res["n"] == len(held_out) > 0
    # the same network on the same images: the exported OOF logits come back (fp16 weights, bf16)
    assert res["max_abs_logit_diff_vs_oof"] < 0.1
    pool = cm.read_oof(str(tmp_path / "context_pool.csv"), str(tmp_path / "context_pool_embeddings.npy"))
    assert pool.image_id == [r["image_id"] for r in held_out]
    assert set(pool.embedding_space) == {f"embedding_model:{file_sha256(os.path.join(export, 'model.pt'))}"}
    cm.check_one_embedding_space(pool, per_patient=False)
    colour = np.load(tmp_path / "context_pool_colour.npy")
    assert colour.shape == (len(held_out), 12) and np.isfinite(colour).all()
    # a fold without images is a clear error, not an empty pool
    assert cli_main(["embed", "--checkpoint", os.path.join(export, "model.pt"), "--oof", oof_path,
                     "--data", data, "--out", str(tmp_path / "x"), "--fold", "7"]) == 2
    assert "no image is in fold 7" in capsys.readouterr().err


def test_help(capsys):
    assert cli_main(["--help"]) == 0
    assert "evaluate" in capsys.readouterr().out
    for sub in ("train", "evaluate", "export", "embed"):
        with pytest.raises(SystemExit) as e:
            cli_main([sub, "--help"])
        assert e.value.code == 0
        assert "--" in capsys.readouterr().out
    assert cli_main(["nonsense"]) == 2
