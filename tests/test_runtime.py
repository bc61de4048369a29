"""Inference runtime chosen by measurement (training.runtime, inference.predictor): a candidate
whose probabilities deviate beyond the tolerance is rejected, nothing qualifying means eager fp32,
the choice is recorded with the model version and re-used on the same machine, and the admin and
the model card show it. No test asserts a timing."""
import numpy as np
import pytest
import torch

from tests.factories import LesionFactory
from tests.test_context_rescore import UD_MODEL
from tests.worker_utils import make_image, register_version, tiny_ckpt  # noqa: F401 (session fixture)
from training import runtime as rt
from training.network import MelanomaNet
from training.preprocessing import to_batch


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    model = MelanomaNet("se_resnet50").eval()
    with torch.no_grad():
        model.head.weight.mul_(100.0)  # spread the scores: a logit shift really moves probabilities
    return model


def _shifted(shift):
    """A candidate runtime that is the eager network with its logits moved by ``shift``."""
    def build(model, size):
        base = rt.build_eager_fp32(model, size)

        def run(x):
            lo, em = base(x)
            return lo + shift, em
        return run
    return build


def _broken(model, size):
    raise RuntimeError("cannot build on this machine")


def _unavailable(model, size):
    raise rt.Unavailable("the package is not installed")


def _measure(net, builders, tolerance=0.01):
    return rt.measure_member(net, size=32, normalise=lambda a: to_batch(a), tta=True, tolerance=tolerance,
                             names=list(builders), builders=builders, reps=1)


def test_candidate_beyond_the_tolerance_is_rejected_and_one_within_is_accepted(net):
    builders = {"eager-fp32": rt.build_eager_fp32, "skewed": _shifted(3.0), "nudged": _shifted(1e-4)}
    report, forwards = _measure(net, builders)
    rows = {r["candidate"]: r for r in report["candidates"]}
    assert rows["skewed"]["accepted"] is False and rows["skewed"]["max_abs_dp"] > 0.01
    assert "exceeds the tolerance 0.01" in rows["skewed"]["reason"]
    assert rows["nudged"]["accepted"] is True and rows["nudged"]["max_abs_dp"] <= 0.01
    assert report["chosen"] in ("eager-fp32", "nudged") and report["chosen"] != "skewed"
    assert list(forwards) == [report["chosen"]]
    for r in rows.values():  # every candidate's figures are in the record
        assert {"candidate", "accepted", "reason", "chosen", "ms_per_image", "max_abs_dp", "emb_rel_err"} <= set(r)


def test_nothing_qualifying_falls_back_to_eager_fp32(net):
    builders = {"eager-fp32": rt.build_eager_fp32, "skewed": _shifted(-2.0), "broken": _broken,
                "missing": _unavailable}
    report, forwards = _measure(net, builders)
    rows = {r["candidate"]: r for r in report["candidates"]}
    assert report["chosen"] == "eager-fp32" and rows["eager-fp32"]["chosen"]
    assert not rows["skewed"]["accepted"] and "tolerance" in rows["skewed"]["reason"]
    assert not rows["broken"]["accepted"] and "could not be built: RuntimeError" in rows["broken"]["reason"]
    assert rows["missing"] == {"candidate": "missing", "accepted": False, "reason": "the package is not installed",
                               "chosen": False}
    arrays = rt.probe_arrays(32, n=3, seed=8)
    lo, _ = rt.tta_forward(forwards["eager-fp32"], to_batch(arrays), True)
    with torch.no_grad():
        expected = net.float().forward_tta(to_batch(arrays), tta=True)[0].numpy()
    np.testing.assert_allclose(lo, expected, atol=1e-5)


def test_every_real_candidate_here_stays_within_tolerance_or_says_why(net):
    """The candidates available on this machine (optional runtimes only when installed) run the
    same network: each is accepted within the tolerance or rejected/skipped with a reason."""
    report, _ = rt.measure_member(net, size=32, normalise=lambda a: to_batch(a), tta=False, reps=1,
                                  names=["eager-fp32", "channels-last", "jit-freeze", "onnxruntime", "int8-dynamic"])
    for r in report["candidates"]:
        assert r["reason"]
        if r["accepted"]:
            assert r["max_abs_dp"] <= report["tolerance"] and r["emb_rel_err"] <= report["embedding_tolerance"]
    compile_row = rt.measure_member(net, size=32, normalise=lambda a: to_batch(a), tta=False, reps=1,
                                    names=["eager-fp32", "torch-compile"])[0]["candidates"][1]
    if not rt._env_flag("ANALYSIS_RUNTIME_COMPILE"):
        assert compile_row["accepted"] is False and "ANALYSIS_RUNTIME_COMPILE=1" in compile_row["reason"]


@pytest.mark.django_db
def test_choice_is_recorded_with_the_version_and_reused_on_the_same_machine(tiny_ckpt, settings, monkeypatch):
    from inference.predictor import clear_cache, predictor_for_version

    monkeypatch.setenv("ANALYSIS_RUNTIME_CANDIDATES", "eager-fp32,channels-last,jit-freeze")
    settings.ANALYSIS_RUNTIME_BUDGET_S = 10
    version = register_version(tiny_ckpt)
    clear_cache()
    try:
        pred, loaded = predictor_for_version(version)
        assert loaded and pred.runtime_decision["reused"] is False
        version.refresh_from_db()
        latest = version.runtime["latest"]
        (member,) = latest["members"]
        assert latest["machine"]["sha256"] == version.sha256 and latest["machine"]["cpu"] == rt.cpu_model()
        assert [c["candidate"] for c in member["candidates"]] == ["eager-fp32", "channels-last", "jit-freeze"]
        assert member["chosen"] == pred.precision and sum(c["chosen"] for c in member["candidates"]) == 1
        assert latest["tolerance"] == settings.ANALYSIS_RUNTIME_TOLERANCE

        # A restart (new process: empty cache) on the same machine re-uses the recorded choice.
        clear_cache()
        pred2, loaded2 = predictor_for_version(version)
        assert loaded2 and pred2.runtime_decision["reused"] is True and pred2.precision == pred.precision
        arrays = rt.probe_arrays(64, n=2, seed=4)
        np.testing.assert_allclose(pred2.predict_arrays(arrays).probabilities,
                                   pred.predict_arrays(arrays).probabilities, atol=1e-5)

        # Another CPU measures again; the first machine's decision is kept beside the new one.
        monkeypatch.setattr(rt, "cpu_model", lambda: "Another CPU 9000")
        clear_cache()
        pred3, _ = predictor_for_version(version)
        assert pred3.runtime_decision["reused"] is False
        version.refresh_from_db()
        assert version.runtime["latest"]["machine"]["cpu"] == "Another CPU 9000"
        assert [d["machine"]["cpu"] for d in version.runtime["other_machines"]] == [latest["machine"]["cpu"]]
    finally:
        clear_cache()


@pytest.mark.django_db
def test_task_in_process_gives_the_final_context_score_without_a_second_task(tiny_ckpt, settings, patient):
    """A single upload's patient is re-scored inside the analysing task: the final (context) score
    is there when the task returns, with no rescore task needed."""
    from inference.models import Analysis
    from inference.predictor import clear_cache
    from inference.tasks import analyze_image

    settings.ANALYSIS_RUNTIME_BUDGET_S = 5
    settings.ANALYSIS_HEATMAPS = False
    version = register_version(tiny_ckpt, context_model=UD_MODEL)
    lesions = [LesionFactory(patient=patient) for _ in range(2)]
    rows = [Analysis.objects.create(image=make_image(les, seed=i), model_version=version)
            for i, les in enumerate(lesions)]
    clear_cache()
    try:
        assert analyze_image.run(rows[0].pk)["done"] == 2
    finally:
        clear_cache()
    for a in Analysis.objects.filter(pk__in=[r.pk for r in rows]):
        assert a.status == "done" and a.final_score is not None and a.final_score_source == "context"


@pytest.fixture
def measured_version(db, tiny_ckpt):
    from inference import services

    version = register_version(tiny_ckpt)
    decision = {
        "machine": rt.machine_key(version.sha256, threads=2), "tolerance": 0.01, "chosen": "jit-freeze",
        "probe_s": 4.2, "measured_at": "2026-12-02T11:00:00Z", "cpu_flags": ["avx512_bf16"],
        "members": [{"member": "se_resnet50", "input_size": 64, "chosen": "jit-freeze", "speedup_vs_fp32": 2.5,
                     "timed_batch": "1 image x 4 flips", "embedding_tolerance": 0.02, "candidates": [
                         {"candidate": "eager-fp32", "ms_per_image": 50.0, "max_abs_dp": 0.0, "emb_rel_err": 0.0,
                          "accepted": True, "chosen": False, "reason": "within tolerance, but slower"},
                         {"candidate": "jit-freeze", "ms_per_image": 20.0, "max_abs_dp": 1e-06, "emb_rel_err": 0.0,
                          "accepted": True, "chosen": True, "reason": "fastest within tolerance"},
                         {"candidate": "bf16-autocast", "ms_per_image": 15.0, "max_abs_dp": 0.04,
                          "emb_rel_err": 0.05, "accepted": False, "chosen": False,
                          "reason": "max |dp| 0.04 exceeds the tolerance 0.01"}]}],
    }
    services.record_runtime(model_version=version, decision=decision)
    return version


def test_admin_shows_the_runtime_read_only(client, staff, measured_version):
    from django.urls import reverse

    client.force_login(staff)
    html = client.get(reverse("admin:inference_modelversion_change", args=[measured_version.pk])).content.decode()
    assert "Inference runtime (measured by the worker)" in html
    assert 'id="runtime-chosen">jit-freeze<' in html and "max |dp| 0.04 exceeds the tolerance 0.01" in html
    assert 'name="runtime"' not in html  # not editable


def test_model_card_shows_the_runtime_and_each_candidate(client, clinician, measured_version):
    from django.urls import reverse

    client.force_login(clinician)
    html = client.get(reverse("inference:model_version_detail", args=[measured_version.pk])).content.decode()
    assert "Inference runtime" in html and 'id="runtime-chosen">jit-freeze<' in html
    for name in ("eager-fp32", "jit-freeze", "bf16-autocast"):
        assert f'<th scope="row">{name}</th>' in html
    assert rt.cpu_model() in html and "2.5× eager fp32" in html


def test_model_card_says_when_no_worker_has_measured(client, clinician, tiny_ckpt):
    from django.urls import reverse

    version = register_version(tiny_ckpt)
    client.force_login(clinician)
    html = client.get(reverse("inference:model_version_detail", args=[version.pk])).content.decode()
    assert "No worker has measured a runtime for this version yet" in html
