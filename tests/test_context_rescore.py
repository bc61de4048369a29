"""Worker-side patient context: inference.context.rescore_patient."""
import datetime
import threading
import uuid

import numpy as np
import pytest
from django.db import connection, connections

from inference.context import rescore_patient
from inference.models import Analysis, ModelVersion
from patients.models import LesionImage
from tests.factories import LesionFactory, PatientFactory
from training import context_features as cf

DIM = 32  # real versions have 1280- or 2048-d embeddings; features do not depend on the size


def make_version(context_model=None, **kw):
    return ModelVersion.objects.create(
        name=kw.pop("name", f"v-{uuid.uuid4().hex[:8]}"), architecture="se_resnet50", input_size=224,
        sha256=uuid.uuid4().hex + uuid.uuid4().hex, weights_path="x.pt", threshold=0.3,
        context_model=context_model, **kw,
    )


def add_image(lesion, version, prob, emb, day=1, status=Analysis.Status.DONE):
    img = LesionImage.objects.create(
        lesion=lesion, file=f"images/{uuid.uuid4().hex}.jpg", thumbnail=f"thumbnails/{uuid.uuid4().hex}.jpg",
        sha256="0" * 64, upload_sha256=uuid.uuid4().hex, width=10, height=10, size_bytes=100,
        format="JPEG", original_format="JPEG", acquired_on=datetime.date(2024, 1, day),
    )
    a = Analysis(image=img, model_version=version, status=status, probability=prob)
    if emb is not None:
        a.set_embedding(emb)
    a.save()
    return a


# Weights the ugly-duckling distance strongly (a hand-made context model in the exported format).
UD_MODEL = {
    "format": cf.MODEL_FORMAT, "kind": cf.MODEL_KIND, "feature_version": cf.FEATURE_VERSION,
    "feature_names": ["ud_distance"], "means": [0.1], "scales": [0.1], "coefficients": [1.5],
    "intercept": -0.1, "training_data": {"kind": "test"},
}


def similar_patient(version, n=5, seed=0, odd=True):
    """n lesions with similar embeddings and similar probabilities (+ optionally one odd lesion)."""
    rng = np.random.default_rng(seed)
    patient = PatientFactory()
    base = rng.normal(size=DIM)
    analyses = []
    for k in range(n):
        lesion = LesionFactory(patient=patient, label=f"L{k}")
        analyses.append(add_image(lesion, version, 0.2 + 0.01 * k, base + rng.normal(scale=0.1, size=DIM), day=k + 1))
    odd_a = None
    if odd:
        lesion = LesionFactory(patient=patient, label="odd", anatomic_site="Lower extremity:Thigh")
        odd_a = add_image(lesion, version, 0.22, rng.normal(size=DIM) * 3, day=20)
    return patient, analyses, odd_a


@pytest.mark.django_db
def test_rescore_stores_features_and_final_scores():
    version = make_version(UD_MODEL)
    patient, analyses, odd = similar_patient(version)
    assert rescore_patient(patient_id=patient.pk, model_version_id=version.pk) == 6
    rows = list(Analysis.objects.filter(image__lesion__patient=patient))
    for a in rows:
        assert set(a.context_features) == set(cf.FEATURE_NAMES)
        assert all(np.isfinite(v) for v in a.context_features.values())
        assert a.final_score_source == "context" and 0 < a.final_score < 1
        assert a.context_updated_at is not None
        assert a.context_features["n_other_lesions"] == 5
        assert a.context_features["age"] == 53  # born 1970-05-17, image from January 2024
        assert a.context_features["sex_female"] == 1
    by_id = {a.pk: a for a in rows}
    odd = by_id[odd.pk]
    others = [by_id[a.pk] for a in analyses]
    # the clearly different lesion: highest ugly-duckling distance and rank, raised final score
    assert odd.context_features["ud_distance"] > max(a.context_features["ud_distance"] for a in others)
    assert odd.context_features["ud_rank"] == 1
    assert odd.final_score > max(a.final_score for a in others)
    assert odd.final_score > odd.probability
    assert odd.context_features["site_lower_extremity"] == 1
    # features equal the pure-numpy definition on the same data
    ordered = sorted(rows, key=lambda a: (a.image.acquired_on, a.image.uploaded_at, a.image_id))
    X = cf.patient_features([a.probability for a in ordered], [a.image.lesion_id for a in ordered],
                            embeddings=np.stack([a.get_embedding() for a in ordered]),
                            sites=[a.image.lesion.anatomic_site for a in ordered], ages=[53] * 6,
                            sexes=["female"] * 6)
    got = np.array([[a.context_features[f] for f in cf.FEATURE_NAMES] for a in ordered])
    np.testing.assert_allclose(got, X, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([a.final_score for a in ordered], cf.apply_context_model(UD_MODEL, X), rtol=1e-9)


@pytest.mark.django_db
def test_upload_of_a_different_lesion_raises_its_score():
    version = make_version(UD_MODEL)
    patient, analyses, _ = similar_patient(version, odd=False)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    before = max(Analysis.objects.get(pk=a.pk).final_score for a in analyses)
    lesion = LesionFactory(patient=patient, label="new odd")
    odd = add_image(lesion, version, 0.2, np.random.default_rng(9).normal(size=DIM) * 3, day=28)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    odd.refresh_from_db()
    assert odd.final_score > before
    assert odd.context_features["ud_rank"] == 1


@pytest.mark.django_db
def test_without_context_model_the_image_probability_is_used():
    version = make_version(None)
    patient, analyses, odd = similar_patient(version, n=2)
    other_version = make_version(UD_MODEL)
    add_image(LesionFactory(patient=patient), other_version, 0.9, np.ones(DIM))  # other version: untouched
    queued = add_image(LesionFactory(patient=patient), version, None, None, status=Analysis.Status.QUEUED)
    assert rescore_patient(patient_id=patient.pk, model_version_id=version.pk) == 3
    for a in Analysis.objects.filter(model_version=version, status=Analysis.Status.DONE):
        assert a.final_score_source == "image" and a.final_score == a.probability
        assert a.context_features["n_other_lesions"] == 2
        assert a.context_explanation["direction"] == "none"
    assert Analysis.objects.get(model_version=other_version).context_features is None
    queued.refresh_from_db()
    assert queued.context_features is None and queued.final_score is None


@pytest.mark.django_db
def test_single_image_patient_and_missing_embedding():
    version = make_version(UD_MODEL)
    patient = PatientFactory()
    a = add_image(LesionFactory(patient=patient), version, 0.4, None)
    assert rescore_patient(patient_id=patient.pk, model_version_id=version.pk) == 1
    a.refresh_from_db()
    assert a.context_features["prob_rank_lesions"] == 0.5 and a.context_features["ud_distance"] == 0.0
    assert a.context_features["n_other_lesions"] == 0 and np.isfinite(a.final_score)
    # a patient with nothing done
    assert rescore_patient(patient_id=PatientFactory().pk, model_version_id=version.pk) == 0


@pytest.mark.django_db
def test_invalid_context_model_falls_back_to_image():
    version = make_version({"kind": "logistic_regression", "feature_names": ["nope"]})
    patient, _, _ = similar_patient(version, n=2)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    assert set(Analysis.objects.values_list("final_score_source", flat=True)) == {"image"}


@pytest.mark.django_db
def test_idempotent():
    version = make_version(UD_MODEL)
    patient, _, _ = similar_patient(version)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    first = state(patient, version)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    assert state(patient, version) == first


def state(patient, version):
    return {
        a.pk: (a.final_score, a.final_score_source, tuple(sorted(a.context_features.items())))
        for a in Analysis.objects.filter(image__lesion__patient=patient, model_version=version,
                                         status=Analysis.Status.DONE)
    }


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need PostgreSQL (DATABASE_URL)")
@pytest.mark.django_db(transaction=True)
def test_concurrent_rescoring_while_new_analyses_appear_equals_one_pass(monkeypatch):
    """Workers finish analyses of one patient concurrently; each re-scores after its commit (as
    inference.tasks does). Extra threads re-score in a loop meanwhile. The end state must equal one
    fresh pass over all images. A delay between reading and writing widens the race window (without
    the patient row lock this test fails: a stale pass overwrites a fresh one)."""
    import time

    import inference.context as ctx_module

    real_compute = ctx_module.compute_patient_context
    jitter = np.random.default_rng(7)

    def slow_compute(*args, **kwargs):
        out = real_compute(*args, **kwargs)
        time.sleep(0.25 if jitter.random() < 0.3 else 0.0)  # some passes are slow
        return out

    monkeypatch.setattr(ctx_module, "compute_patient_context", slow_compute)
    version = make_version(UD_MODEL)
    patient, _, _ = similar_patient(version, n=3, odd=False)
    rng = np.random.default_rng(1)
    lesions = [LesionFactory(patient=patient, label=f"N{k}") for k in range(4)]
    n_workers, per_worker = 4, 3
    barrier = threading.Barrier(n_workers + 2)
    errors = []
    done = threading.Event()

    def worker(w):
        try:
            barrier.wait()
            for j in range(per_worker):
                a = add_image(lesions[w], version, float(rng.uniform(0.05, 0.9)), rng.normal(size=DIM),
                              day=1 + (w * per_worker + j) % 28)
                assert a.pk
                rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    def looper():
        try:
            barrier.wait()
            while not done.is_set():
                rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_workers)]
    loopers = [threading.Thread(target=looper) for _ in range(2)]
    for t in threads + loopers:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    for t in loopers:
        t.join(60)
    assert not errors, errors
    n = 3 + n_workers * per_worker
    concurrent_state = state(patient, version)
    assert len(concurrent_state) == n
    # every analysis saw all 7 lesions: no stale partial pass survived
    assert all(dict(v[2])["n_other_lesions"] == 3 + n_workers - 1 for v in concurrent_state.values())
    # one more (serial) pass changes nothing
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    assert state(patient, version) == concurrent_state


def bundled_context_model():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "models" / "demo" / "context_model.json"
    assert path.is_file(), "the demo context model is committed with the repository"
    return json.loads(path.read_text())


@pytest.mark.django_db
def test_bundled_demo_context_model_raises_a_clearly_different_lesion():
    """The shipped context model (real 2048-d embedding space of the demo network): the same image,
    with the same probability, scores higher as the odd one out among five alike lesions than
    among five lesions that resemble it."""
    model = bundled_context_model()
    version = make_version(model)
    rng = np.random.default_rng(4)
    dim = model["training_data"]["pool"]["embedding_dim"]
    typical = rng.gamma(1.0, size=dim)      # non-negative, like pooled ReLU features
    odd_look = rng.gamma(1.0, size=dim)

    def near(v):
        return np.clip(v + rng.normal(scale=0.3, size=dim), 0, None)

    finals = {}
    for name, look in (("odd one out", typical), ("among its kind", odd_look)):
        patient = PatientFactory()
        for k in range(5):
            add_image(LesionFactory(patient=patient, label=f"N{k}"), version, 0.3 + 0.01 * k, near(look), day=k + 1)
        target = add_image(LesionFactory(patient=patient, label="X"), version, 0.32, odd_look, day=20)
        rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
        target.refresh_from_db()
        finals[name] = target
    odd, kin = finals["odd one out"], finals["among its kind"]
    # identical probability features; only the dissimilarity differs
    for f in ("logit_prob", "n_other_lesions", "age", "site_torso"):
        assert odd.context_features[f] == pytest.approx(kin.context_features[f])
    assert odd.context_features["ud_distance"] > kin.context_features["ud_distance"]
    assert odd.context_features["ud_rank"] == 1
    assert odd.final_score > kin.final_score


@pytest.mark.django_db
def test_bundled_demo_context_model_applies():
    model = bundled_context_model()
    cf.validate_context_model(model)
    assert model["training_data"]["kind"] in ("simulated patients", "real patients")
    assert "ud_distance" in model["feature_names"] and not any("n_images" in f for f in model["feature_names"])
    version = make_version(model)
    patient, _, _ = similar_patient(version, n=3)
    assert rescore_patient(patient_id=patient.pk, model_version_id=version.pk) == 4
    for a in Analysis.objects.filter(model_version=version):
        assert a.final_score_source == "context" and 0 < a.final_score < 1


@pytest.mark.django_db
def test_editing_a_lesion_site_queues_a_rescore_of_the_patient_after_commit(
    clinician, patient, monkeypatch, django_capture_on_commit_callbacks
):
    from inference import tasks
    from patients import services

    version = make_version(is_active=True)
    lesion = LesionFactory(patient=patient)
    sent = []
    monkeypatch.setattr(tasks.rescore_patient, "apply_async", lambda args, **kw: sent.append(tuple(args)))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.update_lesion(user=clinician, lesion=lesion, data={"anatomic_site": "Lower extremity:Thigh"})
    assert sent == []  # nothing before commit
    for callback in callbacks:
        callback()
    assert sent == [(patient.pk, version.pk)]
