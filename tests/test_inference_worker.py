"""End to end with the real Redis and a real Celery worker process (no eager mode).

One worker (prefork, concurrency 1, with beat for the sweeper) serves the whole module on its own
queue; the last test SIGKILLs it and starts another.
"""
import time
from datetime import timedelta

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from inference import services
from inference.models import Analysis
from tests.factories import LesionFactory
from tests.worker_utils import (
    Worker,
    database_url,
    in_ci,
    jpeg_bytes,
    make_image,
    purge_queue,
    queue_length,
    register_version,
    require_redis,
    tiny_ckpt,  # noqa: F401  (session fixture)
    unique_queue,
    use_queue,
    wait_for,
    worker_runtimes,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 4


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, django_db_setup, django_db_blocker):
    require_redis()
    from django.db import connection

    with django_db_blocker.unblock():
        name = str(connection.settings_dict["NAME"])
        if connection.vendor == "sqlite" and ("memory" in name or not name):
            msg = "an in-memory SQLite test database cannot be shared with a worker process: set DATABASE_URL"
            pytest.fail(msg) if in_ci() else pytest.skip(msg)
        db = database_url(connection.settings_dict)
    base = tmp_path_factory.mktemp("worker")
    queue = unique_queue()
    restore = use_queue(queue)  # this process's messages go to the worker's queue
    yield {"db": db, "base": base, "queue": queue, "media": base / "media", "models": base / "models"}
    restore()
    purge_queue(queue)


@pytest.fixture(scope="module")
def worker(worker_env):
    w = Worker(queue=worker_env["queue"], database=worker_env["db"], media_root=worker_env["media"],
               model_root=worker_env["models"], workdir=worker_env["base"],
               env={"ANALYSIS_STALE_SECONDS": str(STALE_SECONDS), "ANALYSIS_SWEEP_INTERVAL": "1",
                    "ANALYSIS_BATCH_SIZE": "4"})
    w.start()
    yield w
    w.stop()


@pytest.fixture(autouse=True)
def _shared_dirs(settings, worker_env):
    """The worker reads the files this process writes: same media and model folders."""
    settings.MEDIA_ROOT = worker_env["media"]
    settings.MODEL_ROOT = worker_env["models"]
    settings.ANALYSIS_STALE_SECONDS = STALE_SECONDS


@pytest.fixture
def lesion(patient):
    return LesionFactory(patient=patient)


@pytest.fixture
def api(clinician):
    client = APIClient()
    client.force_authenticate(clinician)
    return client


def upload(api, lesion, datas):
    """Upload images the way clients do: the records core's multipart endpoint."""
    from patients.models import LesionImage

    before = set(LesionImage.objects.filter(lesion=lesion).values_list("pk", flat=True))
    files = [SimpleUploadedFile(f"lesion{i}.jpg", d, content_type="image/jpeg") for i, d in enumerate(datas)]
    resp = api.post(reverse("api:lesion-images", args=[lesion.pk]),
                    {"files": files, "image_type": "dermoscopic", "acquired_on": "2025-04-01"}, format="multipart")
    assert resp.status_code == 201, (resp.status_code, getattr(resp, "data", resp.content[:500]))
    return list(LesionImage.objects.filter(lesion=lesion).exclude(pk__in=before).order_by("pk"))


def done(images, version=None):
    qs = Analysis.objects.filter(image__in=images)
    if version is not None:
        qs = qs.filter(model_version=version)
    return qs.filter(status__in=["done", "failed"]).count() == len(images)


def test_upload_is_analysed_by_the_worker_like_a_direct_predictor_call(worker, api, lesion, tiny_ckpt, client,
                                                                       clinician):
    from inference.predictor import Predictor

    version = register_version(tiny_ckpt)
    t0 = time.monotonic()
    images = upload(api, lesion, [jpeg_bytes(seed=s) for s in (11, 12, 13)])
    assert len(images) == 3
    wait_for(lambda: done(images), timeout=120, message="3 analyses done", worker=worker)
    elapsed = time.monotonic() - t0
    rows = {a.image_id: a for a in Analysis.objects.filter(image__in=images)}
    assert all(a.status == "done" for a in rows.values()), [a.error for a in rows.values()]
    precision = {a.timings["precision"] for a in rows.values()}
    # The worker scored with the runtime it measured and recorded; the same runtime called directly
    # gives the same numbers.
    runtimes = worker_runtimes(version)
    assert precision == {runtimes[0]}
    bf16 = "bf16-autocast" in runtimes
    pred = Predictor.from_checkpoint(tiny_ckpt, input_size=64, runtime=runtimes)
    direct = pred.predict_files([img.file.path for img in images]).probabilities
    worker_p = np.array([rows[img.pk].probability for img in images])
    np.testing.assert_allclose(worker_p, direct, atol=0.01 if bf16 else 1e-4)
    for img in images:
        a = rows[img.pk]
        assert a.get_embedding().shape == (2048,) and a.worker and a.attempts == 1
        assert {"load_ms", "preprocess_ms", "inference_ms"} <= set(a.timings)

    # The API and the page fragment show the same result, with the model version and its metrics.
    resp = api.get("/api/v1/analyses/", {"image": images[0].pk})
    assert resp.status_code == 200
    (item,) = resp.json()["results"]
    assert item["probability"] == pytest.approx(rows[images[0].pk].probability)
    assert item["model_version"]["name"] == version.name and "embedding" not in item
    wait_for(lambda: Analysis.objects.get(pk=item["id"]).final_score is not None, timeout=30,
             message="re-scoring", worker=worker)
    client.force_login(clinician)
    html = client.get(reverse("inference:image_result", args=[images[0].pk])).content.decode()
    assert f"{rows[images[0].pk].probability * 100:.1f}%" in html and version.name in html
    assert "Not validated for clinical use" in html and "data-poll-url" not in html
    print(f"3 uploads analysed by the worker in {elapsed:.1f}s (including its first model load)")

    # After the scores, the worker makes each analysis's Grad-CAM heatmap (its own task).
    wait_for(lambda: Analysis.objects.filter(image__in=images).exclude(heatmap="").count() == 3, timeout=60,
             message="3 heatmaps", worker=worker)
    a = Analysis.objects.get(pk=item["id"])
    assert a.heatmap_info["method"] == "grad-cam" and a.heatmap_info["model_version"] == version.name
    png = api.get(f"/api/v1/analyses/{a.pk}/heatmap/", HTTP_ACCEPT="image/*")
    assert png.status_code == 200 and png["Content-Type"] == "image/png"


def test_duplicate_delivery_leaves_one_result(worker, lesion, tiny_ckpt):
    from inference.tasks import analyze_image

    version = register_version(tiny_ckpt)
    img = make_image(lesion, seed=21)
    with transaction.atomic():
        services.queue_analyses(images=[img])
        services.queue_analyses(images=[img])  # the same images twice
    (a,) = Analysis.objects.filter(image=img)
    analyze_image.delay(a.pk)  # and the same message sent again
    wait_for(lambda: done([img]), timeout=90, message="analysis done", worker=worker)
    first = Analysis.objects.get(pk=a.pk)
    for _ in range(2):
        analyze_image.delay(a.pk)  # redelivery after it finished
    marker = make_image(lesion, seed=22)
    with transaction.atomic():
        services.queue_analyses(images=[marker])
    wait_for(lambda: done([marker]), timeout=60, message="marker done", worker=worker)
    time.sleep(0.5)
    rows = list(Analysis.objects.filter(image=img, model_version=version))
    assert len(rows) == 1
    assert rows[0].status == "done" and rows[0].attempts == 1
    assert rows[0].finished_at == first.finished_at and rows[0].probability == first.probability


def test_rollback_queues_nothing(worker, lesion, tiny_ckpt):
    from patients.signals import images_stored

    register_version(tiny_ckpt)
    idle_queue = unique_queue("melanoma-rollback")  # nobody consumes it: we can count its messages
    restore = use_queue(idle_queue)
    try:
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                img = make_image(lesion, seed=31)
                images_stored.send(sender=None, images=[img])
                raise RuntimeError("the upload fails after the images were stored")
        assert not Analysis.objects.exists()
        assert queue_length(idle_queue) == 0
        with transaction.atomic():  # control: a committed upload does send its message
            img = make_image(lesion, seed=32)
            images_stored.send(sender=None, images=[img])
        assert queue_length(idle_queue) == 1
    finally:
        restore()
        purge_queue(idle_queue)


def test_no_model_means_waiting_then_done_after_install(worker, api, lesion, tiny_ckpt, client, clinician):
    images = upload(api, lesion, [jpeg_bytes(seed=41)])
    assert not Analysis.objects.exists()
    client.force_login(clinician)
    url = reverse("inference:image_result", args=[images[0].pk])
    assert "Waiting: no model installed" in client.get(url).content.decode()
    version = services.install_model_version(checkpoint_path=tiny_ckpt, name="tiny-installed", activate=True)
    html = client.get(url).content.decode()
    assert "data-poll-url" in html or "%" in html  # queued (polling) or already done
    wait_for(lambda: done(images, version), timeout=90, message="analysis after install", worker=worker)
    assert Analysis.objects.get(image=images[0]).status == "done"
    assert "data-poll-url" not in client.get(url).content.decode()


def test_killing_the_worker_loses_no_analysis(worker, api, lesion, tiny_ckpt):
    """SIGKILL mid-way, then a new worker: acks_late + the sweeper bring every analysis to done."""
    version = register_version(tiny_ckpt)
    # A claim held by a worker that died earlier (running, stale, no message anywhere).
    orphan = make_image(lesion, seed=50)
    old = timezone.now() - timedelta(minutes=10)
    Analysis.objects.create(image=orphan, model_version=version, status="running", started_at=old,
                            enqueued_at=old, attempts=1, worker="dead@host", claim_token="dead")
    images = upload(api, lesion, [jpeg_bytes(seed=s) for s in range(51, 57)])
    wait_for(lambda: Analysis.objects.filter(image__in=images, status__in=["running", "done"]).exists(),
             timeout=90, interval=0.05, message="the worker to start on the uploads", worker=worker)
    worker.kill()
    states = dict(Analysis.objects.filter(image__in=images).values_list("image_id", "status"))
    print("states when killed:", sorted(states.values()))
    worker.start()
    everything = [orphan, *images]
    wait_for(lambda: done(everything), timeout=150, message="every analysis done after restart", worker=worker)
    rows = list(Analysis.objects.filter(image__in=everything))
    assert len(rows) == len(everything)
    assert all(a.status == "done" for a in rows), [(a.image_id, a.status, a.error) for a in rows]
    assert all(1 <= a.attempts <= 3 for a in rows)
    assert Analysis.objects.get(image=orphan).attempts == 2
