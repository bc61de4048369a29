"""Simulated patients: ISIC 2020's real patient structure filled with images that have no patients.

``../shared/data/dermoscopy`` has images (and their out-of-fold predictions + embeddings) but no
patient ids; ``../shared/data/isic2020`` has the real patient structure (33,126 images of 2,056
patients, 584 melanomas) but no images. A *simulated patient* takes the rows of one real ISIC 2020
patient (their number, which of them are melanomas, and each row's age, sex and anatomic site)
and gives every row an image of the same class from the image pool:

* the melanoma rows get melanoma images, the other rows non-melanoma images;
* images are taken lesion by lesion (``lesion_id`` of the pool; an image without one is its own
  lesion): a pool lesion's images go together into one simulated patient, as one simulated lesion,
  and no pool lesion is used twice in the same patient (reuse across patients is unavoidable: the
  real structure needs ~33k images, the pool has ~3.8k); a lesion's rows all take the site of its
  first row, so a lesion has one site;
* fold-partitioned: the pool lesions (stratified by class) and the simulated patients (stratified
  by having a melanoma) are dealt into ``n_folds`` folds and a patient of fold k only gets images
  of fold k. So with ``fold`` as the CV split, no patient AND no image is in two folds.

Within-patient resemblance (``resemblance`` r in [0, 1], an ASSUMPTION, not a measurement): the
"ugly duckling" sign works because one person's naevi tend to look alike (skin type, pigmentation,
the person's "signature naevus"), while a melanoma does not follow the pattern. Images of unrelated
people have no such resemblance, so with r = 0 (plain random fill) the sign cannot exist in the
simulation. With r > 0 every simulated patient gets a random benign *signature* lesion, and each
of its benign lesions is, with probability r, the not-yet-used pool lesion whose colour
``descriptors`` (model-independent: ``colour_descriptor``) are closest to the signature's;
otherwise a random one. Melanoma rows are always filled at random. Whether the image model's
embedding picks up that resemblance is then what the evaluation measures.

The patient-context model (``python -m training context``) simulates at the LESION level: the
ISIC 2020 rows are first collapsed to one row per real lesion (``lesion_rows``: v2 ground truth
has lesion ids; 32,701 lesions, 581 melanomas), and the pool to one image per pool lesion, so
every simulated lesion is one pool lesion with one image (the unit of context is the lesion).

Everything reported from this module is "simulated patients", never real patient data.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field

import numpy as np

ISIC2020_SITE_COLUMNS = ("anatom_site_general_challenge", "anatom_site_general", "anatom_site", "site")
ISIC2020_AGE_COLUMNS = ("age_approx", "age")


@dataclass
class MetaRow:
    image_id: str
    patient_id: str
    lesion_id: str
    target: int
    age: float  # NaN when unknown
    sex: str
    site: str


def _first(row: dict, names) -> str:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return ""


def _float_or_nan(v) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def read_isic_metadata(path: str) -> list[MetaRow]:
    """Read an ISIC 2020 ground-truth CSV (v1 or v2) or a Kaggle ``train.csv``."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        need = {"patient_id", "target"}
        if not need <= cols or not ({"image_name", "image_id", "isic_id"} & cols):
            raise ValueError(f"{path}: needs columns image_name, patient_id, target; has {sorted(cols)}")
        for line, r in enumerate(reader, start=2):
            try:
                target = int(float(r["target"]))
            except ValueError:
                raise ValueError(f"{path}: line {line}: target {r['target']!r} is not 0/1") from None
            image_id = _first(r, ("image_name", "image_id", "isic_id"))
            rows.append(MetaRow(
                image_id=image_id,
                patient_id=r["patient_id"],
                lesion_id=r.get("lesion_id") or image_id,
                target=target,
                age=_float_or_nan(_first(r, ISIC2020_AGE_COLUMNS)),
                sex=r.get("sex", "") or "",
                site=_first(r, ISIC2020_SITE_COLUMNS) or "",
            ))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def lesion_rows(rows: list[MetaRow]) -> list[MetaRow]:
    """One row per real lesion (``lesion_id``; without lesion ids every image is its own lesion),
    in file order of its first image: melanoma if any of its images is, age of its first image,
    the site of its first image. The unit of patient context is the lesion, so simulated patients
    are built from these."""
    out: dict = {}
    for r in rows:
        key = (r.patient_id, r.lesion_id or r.image_id)
        first = out.get(key)
        if first is None:
            out[key] = MetaRow(r.lesion_id or r.image_id, r.patient_id, r.lesion_id or r.image_id, r.target,
                               r.age, r.sex, r.site)
        elif r.target and not first.target:
            first.target = r.target
    return list(out.values())


def patient_profiles(rows: list[MetaRow]) -> dict[str, list[int]]:
    """patient_id -> indices of that patient's rows (in file order)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(r.patient_id, []).append(i)
    return out


@dataclass
class SimulatedPatients:
    """One row per simulated image; ``pool_index`` points into the image pool (OOF arrays)."""
    patient: np.ndarray      # int, simulated patient number
    lesion: np.ndarray       # int, simulated lesion number (unique over all simulated patients)
    pool_index: np.ndarray   # int
    target: np.ndarray       # int 0/1 (= the pool image's label = the real row's label)
    age: np.ndarray          # float, NaN unknown
    sex: list
    site: list               # ISIC 2020 general site of the real row
    order: np.ndarray        # acquisition order within the patient
    fold: np.ndarray         # int, CV fold of the patient (and of its images)
    source_patient: list     # the real ISIC 2020 patient whose profile was used
    stats: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.patient)

    def patient_slices(self):
        """(start, stop) per simulated patient; rows are stored patient by patient."""
        bounds = np.flatnonzero(np.diff(self.patient)) + 1
        starts = np.r_[0, bounds]
        stops = np.r_[bounds, len(self.patient)]
        return list(zip(starts.tolist(), stops.tolist()))

    def profiles(self) -> list[tuple[int, int]]:
        """(n_images, n_melanoma) of every simulated patient."""
        return [(b - a, int(self.target[a:b].sum())) for a, b in self.patient_slices()]


def colour_descriptor(rgb) -> np.ndarray:
    """Model-independent appearance of an RGB uint8 image (H, W, 3): per channel the mean and sd,
    the mean of the darkest quarter of pixels (by luminance: the lesion) and of the brightest
    quarter (the surrounding skin), on a 0-1 scale. 12 numbers."""
    x = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114])
    order = np.argsort(lum, kind="stable")
    q = max(1, len(order) // 4)
    return np.concatenate([x.mean(0), x.std(0), x[order[:q]].mean(0), x[order[-q:]].mean(0)])


def standardize(values) -> np.ndarray:
    """Columns to mean 0, sd 1 (constant columns: centred only)."""
    d = np.asarray(values, dtype=np.float64)
    sd = d.std(0)
    return (d - d.mean(0)) / np.where(sd > 1e-12, sd, 1.0)


def _deal(n: int, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    folds = np.arange(n) % n_folds
    return folds[rng.permutation(n)]


def pool_lesions(pool_target, pool_lesion) -> tuple[list[list[int]], np.ndarray]:
    """Group pool images by lesion: (list of image-index lists, class per lesion).
    Empty lesion ids make an image its own lesion; a lesion's class is its images' max label."""
    groups: dict = {}
    for i, lid in enumerate(pool_lesion):
        key = ("l", lid) if lid not in (None, "") else ("i", i)
        groups.setdefault(key, []).append(i)
    lesions = list(groups.values())
    t = np.asarray(pool_target, dtype=np.int64)
    cls = np.array([int(t[idx].max()) for idx in lesions], dtype=np.int64)
    return lesions, cls


def simulate_patients(
    rows: list[MetaRow],
    pool_target,
    pool_lesion,
    *,
    n_patients: int | None = None,
    n_folds: int = 5,
    seed: int = 0,
    resemblance: float = 0.0,
    descriptors=None,
) -> SimulatedPatients:
    """Simulate patients (see the module docstring).

    n_patients None: every real patient once (the exact real distribution of profiles);
    otherwise that many real patients drawn with replacement. resemblance > 0 needs
    ``descriptors`` (one row per pool image, e.g. ``colour_descriptor``).
    """
    if not 0.0 <= resemblance <= 1.0:
        raise ValueError(f"resemblance must be in [0, 1], got {resemblance}")
    rng = np.random.default_rng(seed)
    profiles = patient_profiles(rows)
    real_ids = list(profiles)
    if n_patients is None:
        chosen = [real_ids[i] for i in rng.permutation(len(real_ids))]
    else:
        chosen = [real_ids[i] for i in rng.integers(0, len(real_ids), size=n_patients)]
    lesions, lesion_cls = pool_lesions(pool_target, pool_lesion)
    pool_t = np.asarray(pool_target, dtype=np.int64)
    lesion_desc = None
    if resemblance > 0:
        if descriptors is None:
            raise ValueError("resemblance > 0 needs descriptors of the pool images")
        d = np.asarray(descriptors, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != len(pool_t):
            raise ValueError(f"descriptors must have one row per pool image ({len(pool_t)}), got {d.shape}")
        d = standardize(d)
        lesion_desc = np.stack([d[idx].mean(0) for idx in lesions])  # a lesion = its images' mean
    # Deal pool lesions into folds, stratified by class.
    lesion_fold = np.empty(len(lesions), dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(lesion_cls == c)
        if len(idx) < n_folds:
            raise ValueError(f"image pool has {len(idx)} lesions of class {c}; need >= {n_folds} folds")
        lesion_fold[idx] = _deal(len(idx), n_folds, rng)
    by_fold_cls = {(k, c): np.flatnonzero((lesion_fold == k) & (lesion_cls == c))
                   for k in range(n_folds) for c in (0, 1)}
    # Deal patients into folds, stratified by having a melanoma.
    has_mel = np.array([any(rows[i].target for i in profiles[pid]) for pid in chosen])
    patient_fold = np.empty(len(chosen), dtype=np.int64)
    for c in (False, True):
        idx = np.flatnonzero(has_mel == c)
        patient_fold[idx] = _deal(len(idx), n_folds, rng)

    patient, lesion, pool_index, target, age, sex, site, order, fold, source = ([] for _ in range(10))
    reuse_within_patient = 0
    next_lesion = 0
    for pnum, pid in enumerate(chosen):
        k = int(patient_fold[pnum])
        prow = [rows[i] for i in profiles[pid]]
        rows_out: list[tuple[int, int, MetaRow]] = []  # (pool image, lesion number, real row)
        for c in (1, 0):
            need = [r for r in prow if r.target == c]
            need = [need[i] for i in rng.permutation(len(need))]
            if not need:
                continue
            candidates = by_fold_cls[(k, c)]
            perm = candidates[rng.permutation(len(candidates))]
            pos = 0
            filled = 0
            # Resembling draws (benign rows only): candidates nearest to the patient's signature.
            alike, used = None, set()
            if c == 0 and lesion_desc is not None:
                signature = lesion_desc[int(candidates[rng.integers(len(candidates))])]
                dist = np.linalg.norm(lesion_desc[candidates] - signature, axis=1)
                alike = candidates[np.argsort(dist, kind="stable")].tolist()
            while filled < len(need):
                if alike is not None and rng.random() < resemblance:
                    while alike and alike[0] in used:
                        alike.pop(0)
                    if alike:
                        lesion_index = alike.pop(0)
                    else:  # every lesion of this fold/class used: reuse (counted)
                        alike = None
                        continue
                else:
                    if pos == len(perm):  # pool of this fold/class exhausted: reuse (counted)
                        perm = candidates[rng.permutation(len(candidates))]
                        pos = 0
                        used = set()
                        reuse_within_patient += 1
                    lesion_index = int(perm[pos])
                    pos += 1
                    if lesion_index in used:
                        continue
                used.add(lesion_index)
                images = lesions[lesion_index]
                take = images[: len(need) - filled]
                first = need[filled]
                for j, img in enumerate(take):
                    r = need[filled + j]
                    # one lesion, one site: the lesion's rows take its first row's site
                    rows_out.append((img, next_lesion, MetaRow(r.image_id, r.patient_id, r.lesion_id,
                                                               r.target, r.age, r.sex, first.site)))
                filled += len(take)
                next_lesion += 1
        # acquisition order: shuffled, but a lesion's images keep their pool order
        lesion_keys = sorted({ln for _, ln, _ in rows_out})
        lesion_rank = {ln: rk for rk, ln in enumerate(rng.permutation(lesion_keys).tolist())}
        rows_out.sort(key=lambda t: (lesion_rank[t[1]], t[0]))
        for o, (img, ln, r) in enumerate(rows_out):
            patient.append(pnum)
            lesion.append(ln)
            pool_index.append(img)
            target.append(int(pool_t[img]))
            age.append(r.age)
            sex.append(r.sex)
            site.append(r.site)
            order.append(o)
            fold.append(k)
            source.append(pid)
    sim = SimulatedPatients(
        patient=np.asarray(patient, dtype=np.int64),
        lesion=np.asarray(lesion, dtype=np.int64),
        pool_index=np.asarray(pool_index, dtype=np.int64),
        target=np.asarray(target, dtype=np.int64),
        age=np.asarray(age, dtype=np.float64),
        sex=sex,
        site=site,
        order=np.asarray(order, dtype=np.int64),
        fold=np.asarray(fold, dtype=np.int64),
        source_patient=source,
    )
    used = np.bincount(sim.pool_index, minlength=len(pool_t))
    sim.stats = {
        "n_patients": len(chosen),
        "n_images": len(sim),
        "n_lesions": int(len(set(sim.lesion.tolist()))),
        "n_melanoma_images": int(sim.target.sum()),
        "n_patients_with_melanoma": int(has_mel.sum()),
        "n_folds": n_folds,
        "seed": seed,
        "pool_images_used": int((used > 0).sum()),
        "pool_images": int(len(pool_t)),
        "mean_uses_per_pool_image": float(used[used > 0].mean()) if (used > 0).any() else 0.0,
        "pool_exhausted_within_a_patient": reuse_within_patient,
        "resemblance": resemblance,
    }
    return sim
