"""Tiny labelled image folders generated at test time (no real data, no Django)."""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image


def _img(rng, y, size=(72, 60)):
    base = rng.random((size[1], size[0], 3)) * 110
    if y:
        base[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] += 120
    return Image.fromarray(base.clip(0, 255).astype("uint8"))


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_dermoscopy(root, n=24, seed=0):
    """labels.csv + images/<id>.jpg; the first 8 images come in lesion pairs."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        y = int(i % 3 == 0)
        iid = f"IMG_{i:04d}"
        _img(rng, y).save(os.path.join(root, "images", f"{iid}.jpg"), quality=90)
        lesion = f"HAM_{i // 2:04d}" if i < 8 else ""
        rows.append([iid, "gen", "melanoma" if y else "nevus", y, 30 + i, ["female", "male"][i % 2],
                     lesion, "back", f"images/{iid}.jpg"])
    _write_csv(os.path.join(root, "labels.csv"),
               ["image_id", "source", "diagnosis", "melanoma", "age_approx", "sex", "lesion_id",
                "anatom_site", "file"], rows)
    return root


def make_kaggle(root, n=12, seed=1):
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "jpeg", "train")
    os.makedirs(d, exist_ok=True)
    rows = []
    for i in range(n):
        y = int(i % 4 == 0)
        name = f"ISIC_{i:07d}"
        _img(rng, y).save(os.path.join(d, f"{name}.jpg"))
        rows.append([name, f"IP_{i // 3}", ["male", "female"][i % 2], 45, "torso",
                     "melanoma" if y else "nevus", "malignant" if y else "benign", y])
    _write_csv(os.path.join(root, "train.csv"),
               ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                "diagnosis", "benign_malignant", "target"], rows)
    return root


def make_isic_cli(root, n=10, seed=2):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        y = int(i % 3 == 0)
        iid = f"ISIC_{9000000 + i}"
        _img(rng, y).save(os.path.join(root, f"{iid}.jpg"))
        diag3 = "Melanoma Invasive" if y else "Nevus"
        rows.append([iid, "Anonymous", "CC-BY", "Malignant" if y else "Benign", diag3,
                     f"IP_{i // 2}" if i < 6 else "", f"IL_{i}", 50, "female", "upper extremity"])
    _write_csv(os.path.join(root, "metadata.csv"),
               ["isic_id", "attribution", "copyright_license", "diagnosis_1", "diagnosis_3",
                "patient_id", "lesion_id", "age_approx", "sex", "anatom_site_general"], rows)
    return root
