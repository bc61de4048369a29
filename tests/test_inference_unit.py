"""Model versions, the predictor (bf16 tolerance), queueing, claims, the sweeper. In-process, no worker."""
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from inference import services
from inference.models import Analysis, ModelVersion
from tests.factories import LesionFactory
from tests.test_context_rescore import UD_MODEL as CONTEXT_MODEL
from tests.worker_utils import ROOT, make_image, register_version, tiny_ckpt  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_real_messages(settings):
    """Messages sent by these tests (rare: on_commit never fires inside a test transaction) go to a
    queue nobody consumes, so a developer's worker on the default queue never sees them."""
    from tests.worker_utils import purge_queue, unique_queue, use_queue

    q = unique_queue("melanoma-unit")
    restore = use_queue(q)
    yield
    restore()
    purge_queue(q)


@pytest.fixture
def lesion(patient):
    return LesionFactory(patient=patient)


# ---------------------------------------------------------------------- web process stays torch-free

def test_web_process_never_imports_torch():
    code = r"""
import sys, django, importlib, pkgutil
django.setup()
from django.urls import get_resolver
import melanoma_site.urls, melanoma_site.wsgi
import inference, patients
for pkg in (inference, patients):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name in ("inference.predictor",) or ".management" in m.name or ".migrations" in m.name:
            continue
        importlib.import_module(m.name)
def walk(patterns):
    for p in patterns:
        if hasattr(p, "url_patterns"):
            walk(p.url_patterns)
        else:
            p.callback
walk(get_resolver().url_patterns)
from django.template.loader import get_template
get_template("inference/_image_result.html")
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m == "pretrainedmodels")
assert not bad, bad[:5]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_tasks_are_late_acked_time_limited_and_retry_database_errors():
    from django.db import OperationalError

    from inference.tasks import analyze_image, rescore_patient, sweep_analyses

    for task in (analyze_image, rescore_patient):
        assert task.acks_late and task.reject_on_worker_lost
        assert 0 < task.soft_time_limit < task.time_limit
    for task in (analyze_image, rescore_patient, sweep_analyses):
        assert OperationalError in task.autoretry_for and task.retry_backoff and task.max_retries
    from django.conf import settings

    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1
    assert "inference.tasks.sweep_analyses" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}


# ---------------------------------------------------------------------- predictor

def test_predictor_applies_flip_tta_exactly_when_the_card_says_so(tiny_ckpt):
    import torch

    from inference.predictor import Predictor, probe_arrays
    from training.preprocessing import to_batch

    pred = Predictor.from_checkpoint(tiny_ckpt, bf16=False)
    arrays = probe_arrays(64, n=3, seed=3)
    with torch.no_grad():
        plain = torch.sigmoid(pred.model.forward_tta(to_batch(arrays), tta=False)[0]).numpy()
        tta = torch.sigmoid(pred.model.forward_tta(to_batch(arrays), tta=True)[0]).numpy()
    pred.card = {**pred.card, "tta": False}
    assert np.allclose(pred.predict_arrays(arrays).probabilities, plain, atol=1e-5)
    pred.card = {**pred.card, "tta": True}
    assert np.allclose(pred.predict_arrays(arrays).probabilities, tta, atol=1e-5)
    assert not np.allclose(plain, tta, atol=1e-4)


# ---------------------------------------------------------------------- install_model


def test_install_validates_copies_and_records(tiny_ckpt, settings, tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"metrics": {"roc_auc": 0.9, "roc_auc_ci": [0.85, 0.94]}, "threshold": 0.3,
                                "validated": True}))
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps({"kind": "logistic", "coef": [1.0]}))
    with pytest.raises(services.ModelInstallError, match="context model .*ctx.json: unsupported context model kind"):
        services.install_model_version(checkpoint_path=tiny_ckpt, name="tiny", context_model_path=ctx)
    assert not ModelVersion.objects.exists()
    ctx.write_text(json.dumps(CONTEXT_MODEL))
    v = services.install_model_version(checkpoint_path=tiny_ckpt, name="tiny", card_path=card,
                                       context_model_path=ctx)
    assert (v.architecture, v.input_size, v.threshold, v.validated) == ("se_resnet50", 64, 0.3, True)
    assert v.metrics["roc_auc"] == 0.9 and v.roc_auc_ci == (0.85, 0.94)
    assert v.context_model == CONTEXT_MODEL
    stored = Path(settings.MODEL_ROOT) / v.weights_path
    assert stored.name == f"{v.sha256}.pt" and stored.read_bytes() == tiny_ckpt.read_bytes()
    assert not v.is_active and v.validation_report["probe_size"] == 64

    with pytest.raises(services.ModelInstallError, match="already installed as model version 'tiny'"):
        services.install_model_version(checkpoint_path=tiny_ckpt)
    again = services.install_model_version(checkpoint_path=tiny_ckpt, skip_if_installed=True, activate=True)
    assert again.pk == v.pk and ModelVersion.objects.get(pk=v.pk).is_active
    assert ModelVersion.objects.get(pk=v.pk).context_model == CONTEXT_MODEL


def test_reinstall_with_a_retrained_context_model_replaces_it_and_rescores_after_commit(
        tiny_ckpt, tmp_path, monkeypatch, django_capture_on_commit_callbacks):
    from inference import tasks

    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(CONTEXT_MODEL))
    v = services.install_model_version(checkpoint_path=tiny_ckpt, context_model_path=ctx)
    lesion = LesionFactory()
    img = make_image(lesion)
    Analysis.objects.filter(image=img).delete()
    Analysis.objects.create(image=img, model_version=v, status=Analysis.Status.DONE, probability=0.4)
    sent = []
    monkeypatch.setattr(tasks.rescore_patient, "apply_async", lambda args, **kw: sent.append(tuple(args)))
    # the same context model again: nothing changes, nothing is queued
    with django_capture_on_commit_callbacks(execute=True):
        services.install_model_version(checkpoint_path=tiny_ckpt, skip_if_installed=True, context_model_path=ctx)
    assert sent == []
    retrained = {**CONTEXT_MODEL, "intercept": -1.0}
    ctx.write_text(json.dumps(retrained))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        again = services.install_model_version(checkpoint_path=tiny_ckpt, skip_if_installed=True,
                                               context_model_path=ctx)
        assert sent == []  # not before the commit
    assert callbacks and again.pk == v.pk and again.context_model_replaced
    assert ModelVersion.objects.get(pk=v.pk).context_model == retrained
    assert sent == [(lesion.patient_id, v.pk)]
    # a broken one is refused and the installed one kept
    ctx.write_text(json.dumps({**CONTEXT_MODEL, "coefficients": [1.0, 2.0]}))
    with pytest.raises(services.ModelInstallError, match="coefficients"):
        services.install_model_version(checkpoint_path=tiny_ckpt, skip_if_installed=True, context_model_path=ctx)
    assert ModelVersion.objects.get(pk=v.pk).context_model == retrained


def test_install_refuses_what_is_not_a_model(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(services.ModelInstallError, match="cannot be loaded"):
        services.install_model_version(checkpoint_path=bad)
    with pytest.raises(services.ModelInstallError, match="not found"):
        services.install_model_version(checkpoint_path=tmp_path / "missing.pt")
    assert not ModelVersion.objects.exists()


@pytest.fixture(scope="module")
def legacy_state_dicts(tmp_path_factory):
    """Random-weight state_dicts in the notebook (model.* + out.*) and Flask (base_model.* + l0.*) layouts
    of a pretrainedmodels se_resnext50_32x4d, as `model_fold_N.bin` files."""
    import pretrainedmodels
    import torch

    torch.manual_seed(0)
    backbone = pretrainedmodels.se_resnext50_32x4d(num_classes=1000, pretrained=None).state_dict()
    head_w, head_b = torch.randn(1, 2048) * 0.01, torch.zeros(1)
    d = tmp_path_factory.mktemp("legacy")
    notebook = {f"model.{k}": v for k, v in backbone.items()}  # with model.last_linear.* as the notebook has
    notebook.update({"out.weight": head_w, "out.bias": head_b})
    flask = {f"base_model.{k}": v for k, v in backbone.items() if not k.startswith("last_linear.")}
    flask.update({"l0.weight": head_w, "l0.bias": head_b})
    paths = {"notebook": d / "model_fold_0.bin", "flask": d / "model_fold_1.bin"}
    torch.save(notebook, paths["notebook"])
    torch.save(flask, paths["flask"])
    return paths


def test_install_model_command_accepts_legacy_checkpoints(legacy_state_dicts, capsys):
    for layout, path in legacy_state_dicts.items():
        call_command("install_model", str(path), "--name", f"legacy-{layout}", "--probe-size", "64")
        v = ModelVersion.objects.get(name=f"legacy-{layout}")
        assert v.architecture == "se_resnext50_32x4d"
        assert v.input_size == 224 and v.threshold == 0.5 and v.validated is False
        assert v.card["source"] == layout
    out = capsys.readouterr().out
    assert "NOT validated for clinical use" in out
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="already installed"):
        call_command("install_model", str(legacy_state_dicts["flask"]), "--probe-size", "64")


# ---------------------------------------------------------------------- queueing

def test_no_active_version_queues_nothing_and_activation_queues_missing(lesion, tiny_ckpt):
    images = [make_image(lesion, seed=i) for i in range(3)]
    assert services.queue_analyses(images=images) == []
    assert not Analysis.objects.exists()
    v = register_version(tiny_ckpt, active=False)
    Analysis.objects.create(image=images[0], model_version=v, status=Analysis.Status.DONE, probability=0.2)
    assert services.activate_model_version(model_version=v) == 2
    assert Analysis.objects.filter(model_version=v, status="queued").count() == 2
    assert Analysis.objects.filter(model_version=v).count() == 3  # one per (image, version)


def test_queue_analyses_is_idempotent_and_waits_for_commit(lesion, tiny_ckpt, django_capture_on_commit_callbacks):
    register_version(tiny_ckpt)
    img = make_image(lesion)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        first = services.queue_analyses(images=[img])
        second = services.queue_analyses(images=[img])
    assert len(first) == 1 and [a.pk for a in second] == [first[0].pk]
    assert Analysis.objects.count() == 1
    assert len(callbacks) == 2  # messages only on commit (the duplicate one is a no-op for the worker)


def test_images_stored_signal_queues_on_commit_and_rollback_queues_nothing(lesion, tiny_ckpt,
                                                                            django_capture_on_commit_callbacks):
    from patients.signals import images_stored

    register_version(tiny_ckpt)
    img = make_image(lesion, seed=1)
    with pytest.raises(RuntimeError):
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            with transaction.atomic():
                images_stored.send(sender=None, images=[img])
                raise RuntimeError("upload failed")
    assert callbacks == [] and not Analysis.objects.exists()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        with transaction.atomic():
            images_stored.send(sender=None, images=[img])
    assert len(callbacks) == 1 and Analysis.objects.filter(image=img, status="queued").count() == 1


def test_reanalyze_requeues_in_batches(lesion, tiny_ckpt, capsys):
    v = register_version(tiny_ckpt)
    images = [make_image(lesion, seed=i) for i in range(5)]
    Analysis.objects.create(image=images[0], model_version=v, status="done", probability=0.1, attempts=1)
    call_command("reanalyze", "--batch-size", "2")
    assert Analysis.objects.filter(model_version=v, status="queued", attempts=0).count() == 5
    assert "5 analyses queued" in capsys.readouterr().out


# ---------------------------------------------------------------------- claims, poison, sweeper

def test_claim_batches_and_is_exclusive(lesion, tiny_ckpt, settings):
    settings.ANALYSIS_BATCH_SIZE = 3
    v = register_version(tiny_ckpt)
    rows = [Analysis.objects.create(image=make_image(lesion, seed=i), model_version=v) for i in range(4)]
    token, claimed = services.claim_analyses(analysis_id=rows[2].pk, worker="w1")
    assert len(claimed) == 3 and rows[2].pk in [a.pk for a in claimed]
    assert all(a.status == "running" and a.attempts == 1 and a.claim_token == token for a in claimed)
    # The same message delivered again: held by a live worker, nothing to claim.
    assert services.claim_analyses(analysis_id=rows[2].pk, worker="w2") == ("", [])
    # Results are written only under the claim.
    a = claimed[0]
    assert not services.complete_analysis(analysis=a, token="other", probability=0.5, embedding=np.zeros(2048),
                                          timings={})
    assert services.complete_analysis(analysis=a, token=token, probability=0.5, embedding=np.ones(2048), timings={})
    a.refresh_from_db()
    assert a.status == "done" and a.get_embedding().shape == (2048,) and a.final_score == 0.5


def test_stale_claim_is_taken_over_and_poison_image_fails_after_max_attempts(lesion, tiny_ckpt, settings):
    settings.ANALYSIS_STALE_SECONDS = 60
    settings.ANALYSIS_MAX_ATTEMPTS = 2
    v = register_version(tiny_ckpt)
    a = Analysis.objects.create(image=make_image(lesion), model_version=v)
    old = timezone.now() - timedelta(minutes=5)
    Analysis.objects.filter(pk=a.pk).update(status="running", started_at=old, attempts=1, enqueued_at=old,
                                            claim_token="dead")
    assert services.sweep_stale().items() >= {"requeued": 1, "failed": 0}.items()
    token, claimed = services.claim_analyses(analysis_id=a.pk, worker="w2")
    assert [c.pk for c in claimed] == [a.pk] and claimed[0].attempts == 2
    # That worker died as well: the sweeper gives up with a readable reason.
    Analysis.objects.filter(pk=a.pk).update(started_at=old, enqueued_at=old)
    assert services.sweep_stale().items() >= {"requeued": 0, "failed": 1}.items()
    a.refresh_from_db()
    assert a.status == "failed" and "Gave up after 2 attempts" in a.error


def test_sweeper_resends_queued_left_behind(lesion, tiny_ckpt, settings):
    settings.ANALYSIS_STALE_SECONDS = 60
    v = register_version(tiny_ckpt)
    a = Analysis.objects.create(image=make_image(lesion), model_version=v)
    assert services.sweep_stale()["requeued"] == 1  # never enqueued (Redis was down)
    assert services.sweep_stale()["requeued"] == 0  # just re-sent: not stale
    a.refresh_from_db()
    assert a.enqueued_at is not None and a.status == "queued"


def test_task_in_process_scores_and_fails_unreadable_image(lesion, tiny_ckpt, settings):
    """The task body (run directly, not eager mode): a batch with one corrupt file."""
    from inference.tasks import analyze_image

    settings.ANALYSIS_BATCH_SIZE = 8
    settings.ANALYSIS_RUNTIME_BUDGET_S = 5
    v = register_version(tiny_ckpt)
    good = [make_image(lesion, seed=i) for i in range(2)]
    bad = make_image(lesion, data=b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    rows = [Analysis.objects.create(image=img, model_version=v) for img in [*good, bad]]
    result = analyze_image.run(rows[0].pk)
    assert result["claimed"] == 3 and result["done"] == 2
    by_image = {a.image_id: a for a in Analysis.objects.all()}
    assert by_image[bad.pk].status == "failed" and "could not be read" in by_image[bad.pk].error
    for img in good:
        a = by_image[img.pk]
        assert a.status == "done" and 0.0 <= a.probability <= 1.0 and a.attempts == 1
        assert a.get_embedding().shape == (2048,)
        assert {"load_ms", "preprocess_ms", "inference_ms", "precision"} <= set(a.timings)
        assert a.timings["batch_size"] == 2
    assert analyze_image.run(rows[0].pk) == {"analysis": rows[0].pk, "claimed": 0}  # second run: no-op
