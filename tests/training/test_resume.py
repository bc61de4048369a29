"""An interrupted fold resumes from its last completed epoch; a finished fold is skipped."""
import json
import os

import pytest
import torch

import training.loop as loop
from training.datasets import read_layout

from .fixtures import make_dermoscopy


def test_interrupted_fold_resumes(tmp_path, monkeypatch, capsys):
    records = read_layout(make_dermoscopy(str(tmp_path / "data"), n=16))
    cfg = loop.TrainConfig(input_size=32, folds=2, only_folds=[0], epochs=2, batch_size=4,
                           max_steps_per_epoch=2, tta=False, patience=5, data="x")
    run = str(tmp_path / "run")
    real_predict = loop.predict
    calls = {"n": 0}

    def crash_on_second_validation(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_predict(*a, **k)

    monkeypatch.setattr(loop, "predict", crash_on_second_validation)
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(cfg, records, run)
    assert os.path.exists(os.path.join(run, "fold0", "last.pt"))
    assert not os.path.exists(os.path.join(run, "fold0", "done.json"))
    monkeypatch.setattr(loop, "predict", real_predict)
    res = loop.run_training(cfg, records, run)
    assert "resumed from" in capsys.readouterr().out
    assert res[0]["epochs_run"] == 2
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epochs = [json.loads(x)["epoch"] for x in f]
    assert epochs == [0, 1]  # epoch 0 was not trained twice
    assert not os.path.exists(os.path.join(run, "fold0", "last.pt"))
    # same run dir, different config: refused
    with pytest.raises(ValueError, match="different config"):
        loop.run_training(loop.TrainConfig(**{**cfg.__dict__, "epochs": 3}), records, run)


def test_schedule_spans_all_steps():
    total, warm = 100, 10
    lrs = [loop.warmup_cosine(s, warm, total, 0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lrs[55] == pytest.approx(0.505, abs=0.01)  # halfway through the cosine, not collapsed
    assert loop.warmup_cosine(total, warm, total, 0.01) == pytest.approx(0.01)
