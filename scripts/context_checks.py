"""Issue-10 checks of a model version's patient context, as a user would see them (no Django DB):

1. the demo patients of ``seed_demo`` (generated images): image probability, context-adjusted
   score, ugly-duckling distance and the flag of every lesion, at the version's threshold;
2. "three naevi and one melanoma": ``--trials`` patients made of 3 pool images diagnosed nevus and
   1 melanoma (held-out pool: never trained on), how often the melanoma scores highest and how
   often each is flagged, image only vs with context.

    .venv/bin/python scripts/context_checks.py --model-dir models/demo \\
        --pool models/demo/pool/context_pool.csv --embeddings models/demo/pool/context_pool_embeddings.npy
    .venv/bin/python scripts/context_checks.py --model-dir models/X \\
        --pool models/X/holdout_predictions.csv --embeddings models/X/holdout_embeddings.npy
"""
import argparse
import csv
import datetime
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "melanoma_site.settings")


def demo_patients(model_dir, model, threshold):
    import django

    django.setup()
    from inference.predictor import Predictor
    from patients.demo import lesion_image
    from patients.management.commands.seed_demo import DEMO_PATIENTS
    from training import context_features as cf

    pred = Predictor.from_checkpoint(os.path.join(model_dir, "model.pt"), bf16=False)
    tmp = tempfile.mkdtemp()
    for mrn, _name, born, sex, lesions in DEMO_PATIENTS:
        files, lids, sites, ages, labels, order = [], [], [], [], [], []
        for label, site, images in lesions:
            for i, (seed, atypical) in enumerate(images):
                path = os.path.join(tmp, f"{seed}.jpg")
                with open(path, "wb") as f:
                    f.write(lesion_image(seed=seed, atypical=atypical))
                day = datetime.date(2025, 3 + 4 * i, 10)
                files.append(path)
                lids.append(label)
                sites.append(site)
                ages.append(day.year - born.year - ((day.month, day.day) < (born.month, born.day)))
                labels.append(f"{label}{' (atypical)' if atypical else ''} visit {i + 1}")
                order.append(i)
        out = pred.predict_files(files)
        X = cf.patient_features(out.probabilities, lids, embeddings=out.embeddings, sites=sites, ages=ages,
                                sexes=[sex] * len(files), order=order)
        s = cf.apply_context_model(model, X) if model else out.probabilities
        print(f"{mrn} (threshold {threshold:.3f})")
        for lab, p, f, x in zip(labels, out.probabilities, s, X):
            print(f"  {lab:38s} image {p:.3f}  with context {f:.3f}  ud {x[1]:.3f}  "
                  f"{'FLAGGED' if f >= threshold else 'not flagged'}")


def naevi_and_melanoma(model, threshold, pool, embeddings, labels, trials, seed=0):
    from training import context_features as cf
    from training.context_model import read_oof

    oof = read_oof(pool, embeddings)
    diagnosis = {}
    for path in labels:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                diagnosis[r.get("image_id") or r.get("image_name")] = (r.get("diagnosis") or "").lower()
    nev = [i for i, iid in enumerate(oof.image_id) if "nev" in diagnosis.get(iid, "")]
    mel = np.flatnonzero(oof.target == 1)
    if len(nev) < 3 or not len(mel):
        print(f"naevi/melanoma check skipped: {len(nev)} naevi, {len(mel)} melanomas in the pool")
        return
    rng = np.random.default_rng(seed)
    top = np.zeros(2)
    flag_mel = np.zeros(2)
    flag_nev = np.zeros(2)
    emb = np.asarray(oof.embeddings, dtype=np.float64)
    for _ in range(trials):
        idx = list(rng.choice(nev, 3, replace=False)) + [int(rng.choice(mel))]
        X = cf.patient_features(oof.prob[idx], ["n1", "n2", "n3", "m"], embeddings=emb[idx],
                                sites=["torso"] * 4, ages=[50] * 4, sexes=["female"] * 4)
        for k, s in enumerate((oof.prob[idx], cf.apply_context_model(model, X) if model else oof.prob[idx])):
            top[k] += s.argmax() == 3
            flag_mel[k] += s[3] >= threshold
            flag_nev[k] += (s[:3] >= threshold).mean()
    print(f"3 naevi + 1 melanoma ({trials} trials, {len(nev)} naevi and {len(mel)} melanomas in the pool):")
    for k, name in enumerate(("image only", "with context")):
        print(f"  {name:12s}: melanoma highest {top[k] / trials:.0%}, melanoma flagged {flag_mel[k] / trials:.0%}, "
              f"naevi flagged {flag_nev[k] / trials:.0%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="folder with model.pt, card.json, context_model.json")
    ap.add_argument("--pool", help="held-out pool CSV (for the naevi/melanoma check)")
    ap.add_argument("--embeddings")
    ap.add_argument("--labels", default="../shared/data/dermoscopy/labels.csv",
                    help="comma-separated label CSVs with image_id and diagnosis")
    ap.add_argument("--trials", type=int, default=500)
    args = ap.parse_args(argv)
    with open(os.path.join(args.model_dir, "card.json")) as f:
        threshold = float(json.load(f)["threshold"])
    path = os.path.join(args.model_dir, "context_model.json")
    model = json.load(open(path)) if os.path.isfile(path) else None
    if args.pool and args.embeddings:
        naevi_and_melanoma(model, threshold, args.pool, args.embeddings, args.labels.split(","), args.trials)
    demo_patients(args.model_dir, model, threshold)


if __name__ == "__main__":
    main()
