"""Stratified, grouped folds: no group (patient, else lesion, else image) is in two folds."""
from __future__ import annotations

import csv
import os

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .datasets import Record

FOLD_COLUMNS = ["image_id", "group", "target", "fold"]


def assign_folds(records: list[Record], n_folds: int, seed: int = 42) -> np.ndarray:
    # stratified by source and target together, so every fold has each source's melanoma rate
    strata = [f"{r.source}|{r.target}" for r in records]
    _, y = np.unique(np.array(strata), return_inverse=True)
    groups = np.array([r.group for r in records])
    n_groups = len(set(groups.tolist()))
    if n_folds < 2 or n_groups < n_folds:
        raise ValueError(f"need 2 <= folds <= groups; got folds={n_folds}, groups={n_groups}")
    fold = np.full(len(records), -1, dtype=np.int64)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(sgkf.split(np.zeros(len(y)), y, groups)):
        fold[val_idx] = k
    check_folds(records, fold)
    return fold


def check_folds(records: list[Record], fold: np.ndarray) -> None:
    seen: dict[str, int] = {}
    for r, f in zip(records, fold):
        if f < 0:
            raise ValueError(f"image {r.image_id} has no fold")
        if seen.setdefault(r.group, int(f)) != int(f):
            raise ValueError(f"group {r.group} is in folds {seen[r.group]} and {int(f)}")


def save_folds(path: str, records: list[Record], fold: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FOLD_COLUMNS)
        for r, k in zip(records, fold):
            w.writerow([r.image_id, r.group, r.target, int(k)])
    os.replace(tmp, path)


def load_folds(path: str, records: list[Record]) -> np.ndarray:
    with open(path, newline="") as f:
        mapping = {row["image_id"]: int(row["fold"]) for row in csv.DictReader(f)}
    missing = [r.image_id for r in records if r.image_id not in mapping]
    if missing:
        raise ValueError(f"{path}: no fold for {len(missing)} image(s), e.g. {missing[:3]}")
    fold = np.array([mapping[r.image_id] for r in records], dtype=np.int64)
    check_folds(records, fold)
    return fold
