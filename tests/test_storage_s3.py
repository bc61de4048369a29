"""More than one machine: media on an S3-compatible object store, web and workers as separate processes.

A moto S3 server process plays the object store. The web app runs as its own gunicorn process
(STORAGE=s3 from the environment, as in deploy/compose.yaml); two real Celery worker processes
split the work over two queues (model analyses on one, re-scores, heatmaps and the sweeper on the
other) and a separate beat process schedules the sweeper. Every process gets its own empty
MEDIA_ROOT, and none of those folders may receive a file: PostgreSQL, Redis and the bucket are the
only things they share (plus the models folder, which each worker machine has).
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.urls import reverse

from inference.models import Analysis
from patients.models import LesionImage
from tests.factories import LesionFactory
from tests.worker_utils import (
    CELERY,
    ROOT,
    Worker,
    database_url,
    in_ci,
    jpeg_bytes,
    purge_queue,
    register_version,
    require_redis,
    tiny_ckpt,  # noqa: F401  (session fixture)
    unique_queue,
    use_queue,
    wait_for,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BIN = Path(sys.executable).parent
# This suite's share of local ports (parallel runs on one machine use other ranges).
PORTS = range(int(os.environ.get("TEST_PORT_BASE", "8300")), int(os.environ.get("TEST_PORT_BASE", "8300")) + 100)


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def start_process(cmd, *, env, log: Path, ready, timeout=240) -> subprocess.Popen:
    fh = open(log, "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if ready():
            return proc
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{cmd[0]} not ready after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)
    except ProcessLookupError:
        pass


def answers(url: str) -> bool:
    import requests

    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process with one private bucket; yields the S3_* environment for the app."""
    import boto3

    base = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                         env={**os.environ}, log=base / "moto.log", ready=lambda: answers(endpoint))
    env = {"STORAGE": "s3", "S3_BUCKET": f"media-{uuid.uuid4().hex[:8]}", "S3_ENDPOINT_URL": endpoint,
           "S3_ACCESS_KEY_ID": "test-key", "S3_SECRET_ACCESS_KEY": "test-secret", "S3_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key",
                          aws_secret_access_key="test-secret", region_name="us-east-1")
    client.create_bucket(Bucket=env["S3_BUCKET"])
    try:
        yield {"env": env, "client": client, "bucket": env["S3_BUCKET"]}
    finally:
        stop_process(proc)


def keys(s3) -> set[str]:
    out = s3["client"].list_objects_v2(Bucket=s3["bucket"])
    return {o["Key"] for o in out.get("Contents", [])}


def s3_bytes(s3, key: str) -> bytes:
    return s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()


@pytest.fixture(scope="module")
def topology(s3, tmp_path_factory, django_db_setup, django_db_blocker):
    """gunicorn (web), beat and two workers on two queues, each its own process and MEDIA_ROOT."""
    redis_url = require_redis()
    from django.db import connection

    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            msg = "the multi-process topology test needs DATABASE_URL to name PostgreSQL"
            pytest.fail(msg) if in_ci() else pytest.skip(msg)
        db = database_url(connection.settings_dict)
    base = tmp_path_factory.mktemp("topology")
    analyses_q, context_q = unique_queue("analyses"), unique_queue("context")
    media = {name: base / name / "media" for name in ("test", "web", "beat", "analyses", "context")}
    for folder in media.values():
        folder.mkdir(parents=True)
    common = {
        **s3["env"], "DATABASE_URL": db, "REDIS_URL": redis_url, "CELERY_QUEUE": context_q,
        "ANALYSIS_QUEUE": analyses_q, "SECRET_KEY": "topology-test-" + uuid.uuid4().hex,
        "MODEL_ROOT": str(base / "models"), "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
        "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
    }
    procs: list[subprocess.Popen] = []
    workers: dict[str, Worker] = {}
    try:
        port = free_port()
        web_url = f"http://127.0.0.1:{port}"
        web_env = {**os.environ, **common, "MEDIA_ROOT": str(media["web"]), "VAR_DIR": str(base / "web" / "var"),
                   "STATIC_ROOT": str(base / "web" / "static")}
        procs.append(start_process(
            [str(BIN / "gunicorn"), "melanoma_site.wsgi:application", "-b", f"127.0.0.1:{port}", "--workers", "2",
             "--timeout", "60"], env=web_env, log=base / "web.log", ready=lambda: answers(web_url + "/api/v1/")))
        # Model analyses on one queue, everything else (re-scores, heatmaps, the sweeper) on the other.
        for name, queue in (("analyses", analyses_q), ("context", context_q)):
            workers[name] = Worker(queue=queue, database=db, media_root=media[name], model_root=base / "models",
                                   workdir=base / name, beat=False, env={**common, "MEDIA_ROOT": str(media[name])})
            workers[name].start()
        beat_env = {**os.environ, **common, "MEDIA_ROOT": str(media["beat"]), "VAR_DIR": str(base / "beat" / "var"),
                    "ANALYSIS_SWEEP_INTERVAL": "2"}
        beat_log = base / "beat.log"
        procs.append(start_process(
            [str(CELERY), "-A", "melanoma_site", "beat", "--loglevel", "INFO",
             "--schedule", str(base / "beat" / "schedule")],
            env=beat_env, log=beat_log, ready=lambda: b"beat: Starting" in beat_log.read_bytes()))
        yield {"web": web_url, "workers": workers, "media": media, "queues": (analyses_q, context_q),
               "web_log": base / "web.log", "beat_log": beat_log}
    finally:
        for w in workers.values():
            w.stop()
        for p in procs:
            stop_process(p)
        purge_queue(analyses_q)
        purge_queue(context_q)


@pytest.fixture
def on_s3(settings, s3, topology):
    """This test process (the test's own reads, the page views run through Django's test client)
    uses the same bucket, and its own MEDIA_ROOT that must stay empty too."""
    settings.STORAGES = {**settings.STORAGES, "default": s3_storage(s3["env"]["S3_ENDPOINT_URL"], s3["bucket"])}
    settings.MEDIA_ROOT = topology["media"]["test"]
    # This process's messages go where the web's do: analyses to one queue, the rest to the other.
    settings.ANALYSIS_QUEUE = topology["queues"][0]
    restore = use_queue(topology["queues"][1])
    yield
    restore()


def s3_storage(endpoint: str, bucket: str, **extra) -> dict:
    from botocore.config import Config

    return {"BACKEND": "melanoma_site.storage.s3.PrivateS3Storage",
            "OPTIONS": {"bucket_name": bucket, "endpoint_url": endpoint, "access_key": "test-key",
                        "secret_key": "test-secret", "region_name": "us-east-1", "default_acl": "private",
                        "file_overwrite": False,
                        "client_config": Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                                connect_timeout=2, read_timeout=10,
                                                retries={"max_attempts": 1, "mode": "standard"}),
                        **extra}}


def token_for(user) -> dict:
    from rest_framework.authtoken.models import Token

    return {"Authorization": f"Token {Token.objects.get_or_create(user=user)[0].key}"}


def test_s3_round_trip_with_two_workers_on_two_queues(on_s3, s3, topology, tiny_ckpt, clinician,  # noqa: F811
                                                      other_clinician, other_team, patient, client):
    import requests

    version = register_version(tiny_ckpt)
    lesion = LesionFactory(patient=patient)
    web, auth, outsider = topology["web"], token_for(clinician), token_for(other_clinician)
    datas = [jpeg_bytes(seed=s) for s in (31, 32, 33, 34)]

    # Upload through the web process's API: the files land in the bucket, nowhere else.
    resp = requests.post(f"{web}/api/v1/images/", headers=auth, timeout=60,
                         data={"lesion": lesion.pk, "image_type": "dermoscopic", "acquired_on": "2025-04-01"},
                         files=[("files", (f"l{i}.jpg", d, "image/jpeg")) for i, d in enumerate(datas)])
    assert resp.status_code == 201, resp.text[:500]
    images = list(LesionImage.objects.filter(lesion=lesion).order_by("pk"))
    assert len(images) == 4
    stored = keys(s3)
    for img in images:
        assert img.file.name in stored and img.thumbnail.name in stored
        assert hashlib.sha256(s3_bytes(s3, img.file.name)).hexdigest() == img.sha256
        grants = s3["client"].get_object_acl(Bucket=s3["bucket"], Key=img.file.name)["Grants"]
        assert all(g["Grantee"].get("URI", "").rsplit("/", 1)[-1] not in ("AllUsers", "AuthenticatedUsers")
                   for g in grants), grants

    # The analyses worker reads the images from the bucket and scores them; the context worker
    # re-scores the patient and makes the heatmaps (it reads the images from the bucket as well).
    workers = topology["workers"]
    wait_for(lambda: Analysis.objects.filter(image__in=images, status="done").exclude(heatmap="").count() == 4,
             timeout=180, message="4 analyses scored with heatmaps", worker=workers["context"])
    rows = list(Analysis.objects.filter(image__in=images).select_related("model_version"))
    assert all(a.model_version_id == version.pk and a.error == "" for a in rows)
    analyses_name, context_name = (f"{w.queue}-" for w in (workers["analyses"], workers["context"]))
    assert all(a.worker.startswith(analyses_name) for a in rows), [a.worker for a in rows]
    assert all(a.heatmap_info["worker"].startswith(context_name) for a in rows), [a.heatmap_info for a in rows]
    analyses_log, context_log = workers["analyses"].log_tail(10**7), workers["context"].log_tail(10**7)
    ran = lambda task, log: f"Task inference.tasks.{task}[" in log  # noqa: E731 (a worker's "received" line)
    assert ran("analyze_image", analyses_log) and not ran("analyze_image", context_log)
    assert ran("compute_heatmap", context_log) and not ran("compute_heatmap", analyses_log)
    # Re-scores sent as tasks go to the context queue too (a small batch is re-scored in the analysing task).
    assert not ran("rescore_patient", analyses_log)
    # The separate beat process schedules the sweeper; it runs on the context queue.
    wait_for(lambda: "Task inference.tasks.sweep_analyses[" in workers["context"].log_tail(10**7), timeout=30,
             message="a sweep sent by beat", worker=workers["context"])
    assert not ran("sweep_analyses", workers["analyses"].log_tail(10**7))
    assert "Sending due task sweep-stale-analyses" in topology["beat_log"].read_text()
    wait_for(lambda: all(a.final_score is not None for a in Analysis.objects.filter(image__in=images)),
             timeout=60, message="final scores", worker=workers["context"])
    print(f"analyses by {sorted({a.worker for a in rows})}, heatmaps by "
          f"{sorted({a.heatmap_info['worker'] for a in rows})}")

    # Served back by the web process from the bucket, after the visibility check: same bytes,
    # ETag, private caching; another team gets 404 for the image, thumbnail and heatmap alike.
    img, analysis = images[0], next(a for a in rows if a.image_id == images[0].pk)
    analysis.refresh_from_db()
    got = requests.get(f"{web}/api/v1/images/{img.pk}/file/", headers={**auth, "Accept": "image/*"}, timeout=30)
    assert got.status_code == 200 and got.content == s3_bytes(s3, img.file.name)
    assert got.headers["ETag"] == f'"{img.sha256}"' and got.headers["Cache-Control"] == "private, no-cache"
    assert got.headers["Content-Type"] == "image/jpeg"
    again = requests.get(f"{web}/api/v1/images/{img.pk}/file/", timeout=30,
                         headers={**auth, "Accept": "image/*", "If-None-Match": got.headers["ETag"]})
    assert again.status_code == 304
    thumb = requests.get(f"{web}/api/v1/images/{img.pk}/thumbnail/", headers={**auth, "Accept": "image/*"}, timeout=30)
    assert thumb.status_code == 200 and thumb.content == s3_bytes(s3, img.thumbnail.name)
    heat = requests.get(f"{web}/api/v1/analyses/{analysis.pk}/heatmap/", headers={**auth, "Accept": "image/*"},
                        timeout=30)
    assert heat.status_code == 200 and heat.headers["Content-Type"] == "image/png"
    assert heat.content == s3_bytes(s3, analysis.heatmap.name)
    for path in (f"images/{img.pk}/file/", f"images/{img.pk}/thumbnail/", f"analyses/{analysis.pk}/heatmap/"):
        refused = requests.get(f"{web}/api/v1/{path}", headers={**outsider, "Accept": "image/*"}, timeout=30)
        assert refused.status_code == 404, (path, refused.status_code)
    # The web process streams the bytes itself: no redirect, no link into the store.
    assert "X-Amz" not in got.text and not got.history and s3["env"]["S3_ENDPOINT_URL"] not in got.headers.get(
        "Location", "")

    # The PDF report and the pages read the thumbnails through the same storage.
    client.force_login(clinician)
    pdf = client.get(f"/patients/{patient.pk}/report.pdf")
    assert pdf.status_code == 200 and pdf["Content-Type"] == "application/pdf" and len(pdf.content) > 2000
    page_thumb = client.get(reverse("patients:image_thumbnail", args=[img.pk]))
    assert page_thumb.status_code == 200 and b"".join(page_thumb.streaming_content) == s3_bytes(s3, img.thumbnail.name)

    # Deleting the image through the API removes its file, thumbnail and heatmap from the bucket.
    names = {img.file.name, img.thumbnail.name, analysis.heatmap.name}
    assert names <= keys(s3)
    resp = requests.delete(f"{web}/api/v1/images/{img.pk}/", headers=auth, timeout=30)
    assert resp.status_code == 204, resp.text[:300]
    assert not names & keys(s3)
    assert not LesionImage.objects.filter(pk=img.pk).exists()
    assert {i.file.name for i in images[1:]} <= keys(s3)

    # No process wrote anything to a local media folder.
    for name, folder in topology["media"].items():
        assert files_under(folder) == [], (name, files_under(folder))


def test_orphan_media_purge_lists_and_removes_bucket_objects(on_s3, s3, topology, patient, tiny_ckpt):  # noqa: F811
    import datetime

    from django.core.files.storage import default_storage
    from django.core.management import call_command

    from patients.services import orphan_media_files
    from tests.worker_utils import make_image

    img = make_image(LesionFactory(patient=patient), seed=6)
    kept_heatmap = default_storage.save("heatmaps/kept.png", ContentFile(b"png"))
    Analysis.objects.create(image=img, model_version=register_version(tiny_ckpt), status="done",
                            heatmap=kept_heatmap)
    orphans = {default_storage.save("images/orphan.jpg", ContentFile(jpeg_bytes(seed=5))),
               default_storage.save("thumbnails/orphan.jpg", ContentFile(b"jpg")),
               default_storage.save("heatmaps/orphan.png", ContentFile(b"png"))}
    referenced = {img.file.name, img.thumbnail.name, kept_heatmap}
    assert orphans | referenced <= keys(s3)

    # (Objects of earlier tests in this bucket are orphans too once their rows are flushed.)
    listed = set(orphan_media_files(older_than=datetime.timedelta(seconds=-60)))
    assert orphans <= listed and not referenced & listed
    assert orphan_media_files(older_than=datetime.timedelta(hours=1)) == []  # too recent: maybe in flight
    call_command("purge_orphan_media", "--hours", "-0.02", stdout=open(os.devnull, "w"))
    assert not orphans & keys(s3) and referenced <= keys(s3)
    assert not any(default_storage.exists(n) for n in orphans)
    assert files_under(topology["media"]["test"]) == []


def test_private_storage_has_no_urls(on_s3):
    from django.core.files.storage import default_storage

    with pytest.raises(NotImplementedError, match="no URL"):
        default_storage.url("images/anything.jpg")


@pytest.mark.parametrize("env, message", [
    ({"STORAGE": "s3"}, "STORAGE=s3 needs S3_BUCKET"),
    ({"STORAGE": "ftp"}, "STORAGE must be 'local' or 's3'"),
])
def test_storage_settings_refuse_an_incomplete_configuration(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("S3_") and k != "STORAGE"}
    proc = subprocess.run([sys.executable, "-c", "import melanoma_site.settings"], cwd=ROOT, capture_output=True,
                          text=True, env={**clean, "VAR_DIR": str(tmp_path), **env}, timeout=240)
    assert proc.returncode != 0 and message in proc.stderr


def test_s3_settings_come_from_the_environment(tmp_path):
    code = ("import json, melanoma_site.settings as s; d = s.STORAGES['default']; c = d['OPTIONS'].pop('client_config'); "
            "print(json.dumps([d['BACKEND'], d['OPTIONS'], s.ANALYSIS_QUEUE, s.CELERY_TASK_DEFAULT_QUEUE, "
            "[c.s3, c.signature_version, c.connect_timeout, c.retries]]))")
    env = {**os.environ, "VAR_DIR": str(tmp_path), "STORAGE": "s3", "S3_BUCKET": "b", "S3_REGION": "eu-west-1",
           "S3_ENDPOINT_URL": "http://minio:9000", "S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s",
           "S3_SERVER_SIDE_ENCRYPTION": "AES256", "ANALYSIS_QUEUE": "analyses", "CELERY_QUEUE": "context"}
    import json

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr
    backend, options, analysis_q, default_q, client = json.loads(out.stdout.strip().splitlines()[-1])
    assert client == [{"addressing_style": "path"}, "s3v4", 5.0, {"max_attempts": 3, "mode": "standard"}]
    assert backend == "melanoma_site.storage.s3.PrivateS3Storage"
    assert options["bucket_name"] == "b" and options["endpoint_url"] == "http://minio:9000"
    assert options["default_acl"] == "private" and options["file_overwrite"] is False
    assert options["object_parameters"] == {"ServerSideEncryption": "AES256"}
    assert (analysis_q, default_q) == ("analyses", "context")


@pytest.mark.django_db
def test_installing_an_installed_model_on_another_machine_puts_its_weights_there(settings, tmp_path,
                                                                                tiny_ckpt):  # noqa: F811
    """Weights are not media: each worker machine has its own MODEL_ROOT, filled by running
    install_model --skip-if-installed there (deploy/compose.yaml does this before each worker)."""
    from inference import services
    from inference.predictor import predictor_for_version

    settings.MODEL_ROOT = tmp_path / "web-machine"
    version = services.install_model_version(checkpoint_path=tiny_ckpt, activate=True)
    settings.MODEL_ROOT = tmp_path / "worker-machine"
    assert not (tmp_path / "worker-machine" / version.weights_path).exists()
    again = services.install_model_version(checkpoint_path=tiny_ckpt, skip_if_installed=True)
    assert again.pk == version.pk
    copied = tmp_path / "worker-machine" / version.weights_path
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == version.sha256
    pred, _ = predictor_for_version(version)
    assert pred.version_id == version.pk


def test_demo_seeding_stores_its_images_in_the_bucket(on_s3, s3, topology):
    from django.core.management import call_command

    call_command("seed_demo", stdout=open(os.devnull, "w"))
    images = list(LesionImage.objects.filter(lesion__patient__mrn__startswith="DEMO-"))
    assert images
    stored = keys(s3)
    for img in images:
        assert {img.file.name, img.thumbnail.name} <= stored
        assert hashlib.sha256(s3_bytes(s3, img.file.name)).hexdigest() == img.sha256
    assert files_under(topology["media"]["test"]) == []


def test_a_media_store_that_does_not_answer_gives_503_and_stores_nothing(on_s3, s3, settings, patient, clinician,
                                                                       client):
    """Uploads and media fetches answer 503 with Retry-After (not 500) while the store is down;
    the upload leaves no row; a missing object is still a 404."""
    from rest_framework.test import APIClient

    from tests.worker_utils import make_image

    lesion = LesionFactory(patient=patient)
    img = make_image(lesion, seed=7)  # stored in the bucket while it answers
    api = APIClient()
    api.force_authenticate(clinician)
    client.force_login(clinician)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.STORAGES = {**settings.STORAGES, "default": s3_storage(dead, s3["bucket"])}

    resp = api.post("/api/v1/images/", {"lesion": lesion.pk, "image_type": "dermoscopic",
                                         "acquired_on": "2025-04-01", "files": [ContentFile(jpeg_bytes(seed=8),
                                                                                            name="a.jpg")]},
                    format="multipart")
    assert resp.status_code == 503, resp.content[:300]
    assert resp.json()["code"] == "unavailable" and "Nothing was stored" in resp.json()["detail"]
    assert resp["Retry-After"]
    assert list(LesionImage.objects.filter(lesion=lesion)) == [img]

    resp = api.get(f"/api/v1/images/{img.pk}/file/", HTTP_ACCEPT="image/*")
    assert resp.status_code == 503 and resp.json()["code"] == "unavailable"
    page = client.get(reverse("patients:image_thumbnail", args=[img.pk]))
    assert page.status_code == 503 and page["Retry-After"]

    # The store is back: the image is served; an object that is gone is a 404, not a 503.
    settings.STORAGES = {**settings.STORAGES, "default": s3_storage(s3["env"]["S3_ENDPOINT_URL"], s3["bucket"])}
    assert api.get(f"/api/v1/images/{img.pk}/file/", HTTP_ACCEPT="image/*").status_code == 200
    s3["client"].delete_object(Bucket=s3["bucket"], Key=img.file.name)
    assert api.get(f"/api/v1/images/{img.pk}/file/", HTTP_ACCEPT="image/*").status_code == 404

