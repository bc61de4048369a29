import csv
import os

import numpy as np
import pytest

from training.datasets import LayoutError, read_layout, summary
from training.folds import assign_folds, check_folds, load_folds, save_folds

from .fixtures import make_dermoscopy, make_isic_cli, make_kaggle


def _rewrite(path, fn):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = fn(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_dermoscopy_layout(tmp_path):
    root = make_dermoscopy(str(tmp_path / "d"))
    recs = read_layout(root)
    assert len(recs) == 24 and sum(r.target for r in recs) == 8
    assert recs[0].group == "l:HAM_0000" and recs[1].group == "l:HAM_0000"
    assert recs[10].group == "i:IMG_0010"
    assert recs[0].age == 30 and recs[0].sex == "female" and recs[0].site == "back"
    assert os.path.isfile(recs[0].path)
    assert summary(recs)["n_lesions"] == 4


def test_kaggle_layout(tmp_path):
    recs = read_layout(make_kaggle(str(tmp_path / "k")))
    assert len(recs) == 12 and recs[0].group == "p:IP_0" and recs[0].site == "torso"
    assert sum(r.target for r in recs) == 3


def test_isic_cli_layout(tmp_path):
    recs = read_layout(make_isic_cli(str(tmp_path / "i")))
    assert [r.target for r in recs[:4]] == [1, 0, 0, 1]
    assert recs[0].group == "p:IP_0" and recs[7].group == "l:IL_7"


@pytest.mark.parametrize("make,csvname,col", [
    (make_dermoscopy, "labels.csv", "melanoma"),
    (make_kaggle, "train.csv", "target"),
    (make_isic_cli, "metadata.csv", "isic_id"),
])
def test_missing_column_is_refused(tmp_path, make, csvname, col):
    root = make(str(tmp_path / "x"))
    path = os.path.join(root, csvname)

    def drop(rows):
        j = rows[0].index(col)
        return [r[:j] + r[j + 1:] for r in rows]

    _rewrite(path, drop)
    with pytest.raises(LayoutError, match=rf"{csvname}.*line 1.*{col}"):
        read_layout(root)


@pytest.mark.parametrize("make,csvname,image", [
    (make_dermoscopy, "labels.csv", "images/IMG_0003.jpg"),
    (make_kaggle, "train.csv", "jpeg/train/ISIC_0000003.jpg"),
    (make_isic_cli, "metadata.csv", "ISIC_9000003.jpg"),
])
def test_missing_image_is_refused(tmp_path, make, csvname, image):
    root = make(str(tmp_path / "x"))
    os.remove(os.path.join(root, image))
    with pytest.raises(LayoutError, match=rf"{csvname}: line 5: .*not found"):
        read_layout(root)


def test_bad_label_and_short_row(tmp_path):
    root = make_dermoscopy(str(tmp_path / "d"))
    path = os.path.join(root, "labels.csv")
    _rewrite(path, lambda rows: rows[:3] + [rows[3][:3] + ["maybe"] + rows[3][4:]] + rows[4:])
    with pytest.raises(LayoutError, match=r"labels.csv: line 4: column 'melanoma'"):
        read_layout(root)
    _rewrite(path, lambda rows: rows[:3] + [rows[4][:2]] + rows[4:])
    with pytest.raises(LayoutError, match=r"labels.csv: line 4: wrong number of fields"):
        read_layout(root)


def test_unknown_folder(tmp_path):
    with pytest.raises(LayoutError, match="no labels.csv"):
        read_layout(str(tmp_path))


def test_no_group_crosses_folds(tmp_path):
    recs = read_layout(make_kaggle(str(tmp_path / "k"), n=40))
    recs += read_layout(make_dermoscopy(str(tmp_path / "d"), n=30))
    fold = assign_folds(recs, 3, seed=7)
    by_group = {}
    for r, f in zip(recs, fold):
        by_group.setdefault(r.group, set()).add(int(f))
    assert all(len(s) == 1 for s in by_group.values())
    assert set(fold.tolist()) == {0, 1, 2}
    for k in range(3):  # every fold holds melanoma
        assert sum(r.target for r, f in zip(recs, fold) if f == k) > 0
    path = str(tmp_path / "folds.csv")
    save_folds(path, recs, fold)
    assert np.array_equal(load_folds(path, recs), fold)
    bad = fold.copy()
    bad[0], bad[1] = 0, 1  # the first two images share lesion... in kaggle they share patient IP_0
    with pytest.raises(ValueError, match="is in folds"):
        check_folds(recs, bad)
