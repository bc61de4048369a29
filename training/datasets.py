"""Layout readers: each turns a folder of labelled images into the common table.

Common table: a list of ``Record`` (image_id, path, target, group, patient_id, lesion_id, age,
sex, site). ``group`` is what folds are grouped by: ``p:<patient_id>`` where a patient id exists,
else ``l:<lesion_id>``, else ``i:<image_id>`` (the image alone).

Layouts:

* ``kaggle`` -- SIIM-ISIC 2020: ``train.csv`` (image_name, patient_id, sex, age_approx,
  anatom_site_general_challenge, diagnosis, target) + JPEGs in ``jpeg/train/``, ``train/``,
  ``images/`` or next to the CSV, named ``<image_name>.jpg``.
* ``isic-cli`` -- what ``isic image download DIR`` writes: ``metadata.csv`` keyed by ``isic_id`` with
  ``<isic_id>.jpg`` beside it (or in ``images/``). Target: a ``target``/``melanoma`` 0/1 column if
  present, else melanoma when any ``diagnosis*`` column mentions melanoma (case-insensitive;
  e.g. ``diagnosis == "melanoma"`` or ``diagnosis_3 == "Melanoma Invasive"``).
* ``dermoscopy`` -- ``labels.csv`` (image_id, melanoma, file; optional source, diagnosis,
  age_approx, sex, lesion_id, anatom_site) as in ``../shared/data/dermoscopy``.

Malformed input raises ``LayoutError`` naming the file and the (1-based, header = line 1) line.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, asdict

LAYOUTS = ("dermoscopy", "kaggle", "isic-cli")


class LayoutError(ValueError):
    pass


@dataclass
class Record:
    image_id: str
    path: str
    target: int
    group: str
    patient_id: str = ""
    lesion_id: str = ""
    age: float | None = None
    sex: str = ""
    site: str = ""
    source: str = ""  # where the image comes from (labels.csv ``source``, else the folder name)

    def as_dict(self) -> dict:
        return asdict(self)


def _group(image_id: str, patient_id: str, lesion_id: str) -> str:
    if patient_id:
        return f"p:{patient_id}"
    if lesion_id:
        return f"l:{lesion_id}"
    return f"i:{image_id}"


def _read_csv(path: str, required: list[str]) -> list[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise LayoutError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise LayoutError(f"{path}: line 1 (header): missing column(s) {missing}; found {header}")
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise LayoutError(f"{path}: line {line}: wrong number of fields "
                                  f"(header has {len(header)})")
            rows.append((line, {k: (v or "").strip() for k, v in row.items()}))
    if not rows:
        raise LayoutError(f"{path}: no data rows")
    return rows


def _target(value: str, path: str, line: int, column: str) -> int:
    try:
        t = float(value)
    except ValueError:
        raise LayoutError(f"{path}: line {line}: column {column!r} must be 0 or 1, got {value!r}") from None
    if t not in (0.0, 1.0):
        raise LayoutError(f"{path}: line {line}: column {column!r} must be 0 or 1, got {value!r}")
    return int(t)


def _age(value: str, path: str, line: int) -> float | None:
    if value in ("", "NA", "nan", "NaN", "unknown"):
        return None
    try:
        return float(value)
    except ValueError:
        raise LayoutError(f"{path}: line {line}: age {value!r} is not a number") from None


def _check_unique(records: list[Record], path: str) -> None:
    seen = set()
    for r in records:
        if r.image_id in seen:
            raise LayoutError(f"{path}: duplicate image id {r.image_id!r}")
        seen.add(r.image_id)


def _require_image(path: str, csv_path: str, line: int, image_id: str) -> None:
    if not os.path.isfile(path):
        raise LayoutError(f"{csv_path}: line {line}: image for {image_id!r} not found at {path}")


def read_dermoscopy(root: str, check_images: bool = True) -> list[Record]:
    csv_path = os.path.join(root, "labels.csv")
    out = []
    for line, row in _read_csv(csv_path, ["image_id", "melanoma", "file"]):
        if not row["image_id"]:
            raise LayoutError(f"{csv_path}: line {line}: empty image_id")
        if not row["file"]:
            raise LayoutError(f"{csv_path}: line {line}: empty file")
        path = os.path.join(root, row["file"])
        if check_images:
            _require_image(path, csv_path, line, row["image_id"])
        lesion = row.get("lesion_id", "")
        out.append(Record(
            image_id=row["image_id"], path=path,
            target=_target(row["melanoma"], csv_path, line, "melanoma"),
            group=_group(row["image_id"], row.get("patient_id", ""), lesion),
            patient_id=row.get("patient_id", ""), lesion_id=lesion,
            age=_age(row.get("age_approx", ""), csv_path, line),
            sex=row.get("sex", ""), site=row.get("anatom_site", ""),
            source=row.get("source", "") or os.path.basename(os.path.normpath(root))))
    _check_unique(out, csv_path)
    return out


def _find_image(root_dirs: list[str], name: str) -> str | None:
    for d in root_dirs:
        for ext in (".jpg", ".jpeg", ".JPG", ".png"):
            p = os.path.join(d, name + ext)
            if os.path.isfile(p):
                return p
    return None


def read_kaggle(root: str, check_images: bool = True) -> list[Record]:
    csv_path = os.path.join(root, "train.csv")
    dirs = [os.path.join(root, d) for d in ("jpeg/train", "train", "images", "")]
    dirs = [d for d in dirs if os.path.isdir(d)]
    out = []
    for line, row in _read_csv(csv_path, ["image_name", "patient_id", "target"]):
        name = row["image_name"]
        if not name:
            raise LayoutError(f"{csv_path}: line {line}: empty image_name")
        path = _find_image(dirs, name)
        if path is None:
            if check_images:
                raise LayoutError(f"{csv_path}: line {line}: image {name}.jpg not found in "
                                  f"{', '.join(dirs) or root}")
            path = os.path.join(dirs[0] if dirs else root, name + ".jpg")
        lesion = row.get("lesion_id", "")
        out.append(Record(
            image_id=name, path=path, target=_target(row["target"], csv_path, line, "target"),
            group=_group(name, row["patient_id"], lesion),
            patient_id=row["patient_id"], lesion_id=lesion,
            age=_age(row.get("age_approx", ""), csv_path, line), sex=row.get("sex", ""),
            site=row.get("anatom_site_general_challenge", row.get("anatom_site_general", ""))))
    _check_unique(out, csv_path)
    return out


def read_isic_cli(root: str, check_images: bool = True) -> list[Record]:
    csv_path = os.path.join(root, "metadata.csv")
    rows = _read_csv(csv_path, ["isic_id"])
    header = list(rows[0][1].keys())
    label_col = next((c for c in ("target", "melanoma") if c in header), None)
    diag_cols = [c for c in header if c.startswith("diagnosis")]
    if label_col is None and not diag_cols:
        raise LayoutError(f"{csv_path}: line 1 (header): no label column: need 'target', 'melanoma' "
                          f"or a 'diagnosis*' column; found {header}")
    dirs = [d for d in (root, os.path.join(root, "images")) if os.path.isdir(d)]
    out = []
    for line, row in rows:
        iid = row["isic_id"]
        if not iid:
            raise LayoutError(f"{csv_path}: line {line}: empty isic_id")
        if label_col:
            target = _target(row[label_col], csv_path, line, label_col)
        else:
            target = int(any("melanoma" in row[c].lower() for c in diag_cols))
        path = _find_image(dirs, iid)
        if path is None:
            if check_images:
                raise LayoutError(f"{csv_path}: line {line}: image {iid}.jpg not found in {', '.join(dirs)}")
            path = os.path.join(root, iid + ".jpg")
        pid, lesion = row.get("patient_id", ""), row.get("lesion_id", "")
        out.append(Record(
            image_id=iid, path=path, target=target, group=_group(iid, pid, lesion),
            patient_id=pid, lesion_id=lesion, age=_age(row.get("age_approx", ""), csv_path, line),
            sex=row.get("sex", ""),
            site=row.get("anatom_site_general", row.get("anatom_site_general_challenge", ""))))
    _check_unique(out, csv_path)
    return out


READERS = {"dermoscopy": read_dermoscopy, "kaggle": read_kaggle, "isic-cli": read_isic_cli}


def detect_layout(root: str) -> str:
    if os.path.isfile(os.path.join(root, "labels.csv")):
        return "dermoscopy"
    if os.path.isfile(os.path.join(root, "train.csv")):
        return "kaggle"
    if os.path.isfile(os.path.join(root, "metadata.csv")):
        return "isic-cli"
    raise LayoutError(f"{root}: no labels.csv (dermoscopy), train.csv (kaggle) or metadata.csv "
                      f"(isic-cli) found")


def read_layout(root: str, layout: str = "auto", check_images: bool = True) -> list[Record]:
    """Read one folder, or several separated by commas (their records concatenated; an image id in
    two folders is an error). Folds group by lesion across folders, so one lesion's images in two
    folders stay together."""
    if "," in root:
        out: list[Record] = []
        for part in [p.strip() for p in root.split(",") if p.strip()]:
            out.extend(read_layout(part, layout, check_images))
        _check_unique(out, root)
        return out
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: not a directory")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in READERS:
        raise LayoutError(f"unknown layout {layout!r}; expected auto or one of {LAYOUTS}")
    records = READERS[layout](root, check_images=check_images)
    default_source = os.path.basename(os.path.normpath(root))
    for r in records:
        r.source = r.source or default_source
    return records


def summary(records: list[Record]) -> dict:
    n = len(records)
    pos = sum(r.target for r in records)
    return {
        "n_images": n,
        "n_melanoma": pos,
        "n_groups": len({r.group for r in records}),
        "n_patients": len({r.patient_id for r in records if r.patient_id}),
        "n_lesions": len({r.lesion_id for r in records if r.lesion_id}),
    }
