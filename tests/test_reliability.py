"""Nothing is lost when the broker, a worker or a request fails (issue 12), with real processes.

- The broker is stopped during uploads: a private ``redis-server`` (port 8131), a real gunicorn
  web process (port 8132) and a real Celery worker point at it; uploads, an edit and a delete go
  through the HTTP API while it is down; none answers 500, every accepted upload keeps its files,
  and after Redis comes back the sweeper sends what was pending: every image gets its analysis and
  the patient its re-scoring.
- A worker is SIGKILLed with a batch in flight and restarted with the default 300 s stale timeout:
  the new worker hands back the dead worker's claims at start; everything is done exactly once
  within 60 s of the restart.
- A re-scoring whose message was lost is recovered by the sweeper (pending outbox row; and a done
  analysis whose context was never computed).
- Admin edits go through the services: a site change or an image deletion re-scores the patient;
  a lesion cannot be moved to another patient.
- Transient errors release claims for another try (attempts counted); the sweeper is bounded.

The measured figures are printed (``pytest -s``) with the prefix ``RELIABILITY``.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from inference import services
from inference.models import Analysis, PendingRescore, WorkerLease
from patients.models import Lesion, LesionImage
from tests.factories import LesionFactory, PatientFactory
from tests.worker_utils import (
    ROOT,
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
)

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REDIS_PORT = 8131
WEB_PORT = 8132
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
GUNICORN = Path(sys.executable).with_name("gunicorn")


def figure(text: str) -> None:
    print(f"RELIABILITY {text}", flush=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """A private redis-server process (no persistence: a restart comes back empty, as after a crash)."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir, self.proc = port, Path(workdir), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if _port_open(self.port):
            pytest.fail(f"port {self.port} is taken: the private Redis of this test cannot start")
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: _port_open(self.port), timeout=20, message=f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        wait_for(lambda: not _port_open(self.port), timeout=10, message="redis-server stopped")


class WebServer:
    """The app under gunicorn, a process of its own (its own broker connection and settings)."""

    def __init__(self, port: int, env: dict, workdir: Path):
        self.port, self.env, self.workdir, self.proc = port, env, Path(workdir), None
        self.log_path = self.workdir / f"gunicorn-{uuid.uuid4().hex[:6]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WebServer":
        if _port_open(self.port):
            pytest.fail(f"port {self.port} is taken: the web process of this test cannot start")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(GUNICORN), "melanoma_site.wsgi", "-b", f"127.0.0.1:{self.port}", "-w", "1", "--threads", "4",
             "--timeout", "120"], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for(lambda: _port_open(self.port) or self.proc.poll() is not None, timeout=60, message="gunicorn")
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{self.log_tail()}")
        return self

    def log_tail(self, n=4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, django_db_setup, django_db_blocker):
    require_redis()
    from django.db import connection

    with django_db_blocker.unblock():
        name = str(connection.settings_dict["NAME"])
        if connection.vendor == "sqlite" and ("memory" in name or not name):
            msg = "an in-memory SQLite test database cannot be shared with other processes: set DATABASE_URL"
            pytest.fail(msg) if in_ci() else pytest.skip(msg)
        db = database_url(connection.settings_dict)
    base = tmp_path_factory.mktemp("reliability")
    queue = unique_queue("melanoma-reliability")
    restore = use_queue(queue)
    yield {"db": db, "base": base, "queue": queue, "media": base / "media", "models": base / "models"}
    restore()
    purge_queue(queue)


@pytest.fixture(autouse=True)
def _shared_dirs(settings, env):
    settings.MEDIA_ROOT = env["media"]
    settings.MODEL_ROOT = env["models"]


def _worker(env, **extra) -> Worker:
    return Worker(queue=env["queue"], database=env["db"], media_root=env["media"], model_root=env["models"],
                  workdir=env["base"], env={"ANALYSIS_BATCH_SIZE": "4", **extra})


def _done(images) -> bool:
    return Analysis.objects.filter(image__in=images, status__in=["done", "failed"]).count() == len(images)


def _files_present(images) -> bool:
    return all(img.file.storage.exists(img.file.name) and img.thumbnail.storage.exists(img.thumbnail.name)
               for img in images)


# --------------------------------------------------------------------------- broker down during uploads

def test_broker_down_during_uploads_no_500_files_kept_and_all_analysed_after_it_returns(
        env, tiny_ckpt, clinician, patient):
    import requests
    from rest_framework.authtoken.models import Token

    redis_srv = RedisServer(REDIS_PORT, env["base"]).start()
    queue = unique_queue("melanoma-outage")
    common = {"REDIS_URL": redis_srv.url, "CELERY_QUEUE": queue, "DATABASE_URL": env["db"],
              "MEDIA_ROOT": str(env["media"]), "MODEL_ROOT": str(env["models"])}
    register_version(tiny_ckpt)
    lesion = LesionFactory(patient=patient, anatomic_site="Trunk:Posterior trunk")
    other = LesionFactory(patient=patient, anatomic_site="Head & Neck:Face")
    token = Token.objects.create(user=clinician).key
    web_env = {**os.environ, **common, "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
               "VAR_DIR": str(env["base"] / "web-var"), "ALLOWED_HOSTS": "127.0.0.1,localhost",
               "SECRET_KEY": "reliability-test-" + uuid.uuid4().hex, "NO_ALBUMENTATIONS_UPDATE": "1"}
    web = WebServer(WEB_PORT, web_env, env["base"]).start()
    worker = Worker(queue=queue, database=env["db"], media_root=env["media"], model_root=env["models"],
                    workdir=env["base"], env={**common, "ANALYSIS_SWEEP_INTERVAL": "2",
                                              "ANALYSIS_STALE_SECONDS": "30", "ANALYSIS_HEATMAPS": "false"})
    http = requests.Session()
    http.headers["Authorization"] = f"Token {token}"
    api = f"{web.url}/api/v1"

    def upload(target, seeds):
        files = [("files", (f"s{s}.jpg", jpeg_bytes(seed=s), "image/jpeg")) for s in seeds]
        t0 = time.monotonic()
        r = http.post(f"{api}/lesions/{target.pk}/images/", files=files,
                      data={"image_type": "dermoscopic", "acquired_on": "2025-04-01"}, timeout=60)
        return r, time.monotonic() - t0

    try:
        worker.start()
        r, _ = upload(other, [900])  # everything up: the normal path
        assert r.status_code == 201, (r.status_code, r.text[:500])
        before = list(LesionImage.objects.filter(lesion=other))
        wait_for(lambda: _done(before), timeout=120, message="the first analysis", worker=worker)

        redis_srv.stop()
        t_down = time.monotonic()
        statuses, seconds = [], []
        for i in range(5):
            r, dt = upload(lesion, [1000 + 2 * i, 1001 + 2 * i])
            statuses.append(r.status_code)
            seconds.append(dt)
        # An edit and a delete that queue a re-score, while the broker is down.
        r_edit = http.patch(f"{api}/lesions/{lesion.pk}/", json={"anatomic_site": "Lower extremity:Thigh"}, timeout=60)
        r_delete = http.delete(f"{api}/images/{before[0].pk}/", timeout=60)
        outage = time.monotonic() - t_down
        figure(f"broker down: {len(statuses)} uploads answered {statuses}, edit {r_edit.status_code}, "
               f"delete {r_delete.status_code}; slowest upload {max(seconds):.2f}s (mean {sum(seconds) / len(seconds):.2f}s)")
        assert statuses == [201] * 5, web.log_tail()
        assert r_edit.status_code == 200 and r_delete.status_code == 204, web.log_tail()

        images = list(LesionImage.objects.filter(lesion=lesion))
        assert len(images) == 10
        assert _files_present(images), "an accepted upload lost its file"
        rows = Analysis.objects.filter(image__in=images)
        assert rows.count() == 10 and all(a.status == "queued" and a.enqueued_at is None for a in rows)
        assert PendingRescore.objects.filter(patient=patient, sent_at__isnull=True).exists()

        redis_srv.start()  # back, and empty (nothing persisted): only the database knows the work
        t_up = time.monotonic()
        wait_for(lambda: _done(images), timeout=150, message="every upload analysed after Redis returned",
                 worker=worker)
        analysed = time.monotonic() - t_up
        wait_for(lambda: not PendingRescore.objects.filter(patient=patient).exists(), timeout=60,
                 message="the patient re-scored", worker=worker)
        rescored = time.monotonic() - t_up
        rows = list(Analysis.objects.filter(image__in=images))
        assert all(a.status == "done" for a in rows), [(a.pk, a.status, a.error) for a in rows]
        assert all(a.context_updated_at is not None for a in rows)
        assert _files_present(images)
        # The edit during the outage is in the context: the thigh is a lower-extremity site.
        assert all(a.context_features and a.context_features.get("site_lower_extremity") == 1.0
                   for a in rows if a.image.lesion_id == lesion.pk), rows[0].context_features
        assert not LesionImage.objects.filter(pk=before[0].pk).exists()
        figure(f"broker outage {outage:.1f}s; after Redis returned: 10/10 uploads analysed in {analysed:.1f}s, "
               f"patient re-scored in {rescored:.1f}s (sweep interval 2s)")
    finally:
        worker.stop()
        web.stop()
        redis_srv.stop()


# --------------------------------------------------------------------------- transient errors, bounded sweeper

def test_soft_time_limit_while_loading_the_model_releases_the_claim_and_counts_the_attempt(
        env, tiny_ckpt, patient, settings, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    from inference import predictor
    from inference.tasks import analyze_image

    settings.ANALYSIS_MAX_ATTEMPTS = 2
    idle = unique_queue("melanoma-idle")
    restore = use_queue(idle)
    try:
        register_version(tiny_ckpt)
        lesion = LesionFactory(patient=patient)
        a = Analysis.objects.create(image=make_image(lesion, seed=4000), model_version=services.active_model_version())

        def slow_load(version, **kw):
            raise SoftTimeLimitExceeded("soft time limit while loading")

        monkeypatch.setattr(predictor, "predictor_for_version", slow_load)
        for attempt in (1, 2):
            with pytest.raises(SoftTimeLimitExceeded):
                analyze_image.run(a.pk)
            a.refresh_from_db()
            assert a.status == "queued" and a.attempts == attempt and "loading the model" in a.error
        assert queue_length(idle) == 2  # each try handed back and sent again
        with pytest.raises(SoftTimeLimitExceeded):
            analyze_image.run(a.pk)  # the third delivery: attempts used up
        a.refresh_from_db()
        assert a.status == "failed" and "Gave up after 2 attempts" in a.error and "loading the model" in a.error
    finally:
        restore()
        purge_queue(idle)


def test_a_stored_file_that_comes_back_is_analysed_on_the_next_try(env, tiny_ckpt, patient):
    from inference.tasks import analyze_image

    idle = unique_queue("melanoma-idle")
    restore = use_queue(idle)
    try:
        register_version(tiny_ckpt)
        lesion = LesionFactory(patient=patient)
        img = make_image(lesion, seed=4100)
        a = Analysis.objects.create(image=img, model_version=services.active_model_version())
        path = Path(img.file.path)
        path.rename(path.with_suffix(".away"))  # the share is gone for a moment
        result = analyze_image.run(a.pk)
        a.refresh_from_db()
        assert result["done"] == 0 and a.status == "queued" and a.attempts == 1
        assert queue_length(idle) == 1
        path.with_suffix(".away").rename(path)  # and back
        analyze_image.run(a.pk)
        a.refresh_from_db()
        assert a.status == "done" and a.attempts == 2 and a.error == ""
    finally:
        restore()
        purge_queue(idle)


def test_sweeper_sends_at_most_its_limit_less_the_backlog(env, tiny_ckpt, patient, settings):
    idle = unique_queue("melanoma-idle")
    restore = use_queue(idle)
    try:
        version = register_version(tiny_ckpt)
        lesion = LesionFactory(patient=patient)
        images = [make_image(lesion, seed=4200 + i) for i in range(25)]
        Analysis.objects.bulk_create([Analysis(image=img, model_version=version) for img in images])  # never sent
        settings.ANALYSIS_SWEEP_LIMIT = 10
        assert services.sweep_stale()["requeued"] == 10
        assert queue_length(idle) == 10
        result = services.sweep_stale()  # ten still waiting in the queue: nothing more
        assert result["requeued"] == 0 and result["backlog"] == 10
        purge_queue(idle)  # the worker took them
        assert services.sweep_stale()["requeued"] == 10  # the next never-sent ones, not the ones just sent
        assert Analysis.objects.filter(image__in=images, enqueued_at__isnull=True).count() == 5
    finally:
        restore()
        purge_queue(idle)


def test_dispatcher_never_raises_and_leaves_rows_pending_when_the_broker_is_down(env, tiny_ckpt, patient, clinician,
                                                                                  settings):
    """In this process, the broker is a port where nothing listens: services still succeed."""
    from melanoma_site.celery import app
    from patients import services as records
    from tests.factories import uploaded

    register_version(tiny_ckpt)
    lesion = LesionFactory(patient=patient)
    old_url = app.conf.broker_url
    app.conf.broker_url = f"redis://127.0.0.1:{REDIS_PORT + 9}/0"  # nothing listens there
    app._pool = None
    app.amqp._producer_pool = None
    try:
        t0 = time.monotonic()
        outcomes = records.upload_images(user=clinician, lesion=lesion,
                                         files=[uploaded(jpeg_bytes(seed=s)) for s in (4300, 4301, 4302)],
                                         image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2))
        upload_s = time.monotonic() - t0
        records.update_lesion(user=clinician, lesion=lesion, data={"anatomic_site": "Lower extremity:Thigh"})
        records.delete_image(user=clinician, image=outcomes[0].image)
    finally:
        app.conf.broker_url = old_url
        app._pool = None
        app.amqp._producer_pool = None
    kept = [o.image for o in outcomes[1:]]
    assert _files_present(kept)
    assert all(a.enqueued_at is None and a.status == "queued" for a in Analysis.objects.filter(image__in=kept))
    assert PendingRescore.objects.get(patient=patient).sent_at is None
    figure(f"in-process upload of 3 images with no broker listening: {upload_s:.2f}s, no error")


def test_a_dead_workers_lease_is_recognised_and_its_claims_handed_back(env, tiny_ckpt, patient):
    from inference import workers

    idle = unique_queue("melanoma-idle")
    restore = use_queue(idle)
    try:
        version = register_version(tiny_ckpt)
        lesion = LesionFactory(patient=patient)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        now = timezone.now()
        WorkerLease.objects.create(name=f"gone@host pid {dead.pid}", hostname=socket.gethostname(), pid=dead.pid,
                                   started_at=now, heartbeat_at=now)
        WorkerLease.objects.create(name=f"me pid {os.getpid()}", hostname=socket.gethostname(), pid=os.getpid(),
                                   started_at=now, heartbeat_at=now)
        a = Analysis.objects.create(image=make_image(lesion, seed=4400), model_version=version, status="running",
                                    started_at=now, attempts=1, worker=f"gone@host pid {dead.pid}", claim_token="x")
        b = Analysis.objects.create(image=make_image(lesion, seed=4401), model_version=version, status="running",
                                    started_at=now, attempts=1, worker=f"me pid {os.getpid()}", claim_token="y")
        assert workers.dead_worker_names() == [f"gone@host pid {dead.pid}"]
        assert workers.reclaim_dead_claims() == [a.pk]
        a.refresh_from_db()
        b.refresh_from_db()
        assert a.status == "queued" and a.attempts == 1 and b.status == "running"
        assert queue_length(idle) == 1
    finally:
        restore()
        purge_queue(idle)


# --------------------------------------------------------------------------- kill -9 with a batch in flight

@pytest.fixture(scope="module")
def worker(env):
    w = _worker(env, ANALYSIS_STALE_SECONDS="3", ANALYSIS_SWEEP_INTERVAL="1", ANALYSIS_HEATMAPS="false",
                WORKER_HEARTBEAT_SECONDS="1")
    w.start()
    yield w
    w.stop()


def test_worker_killed_with_a_batch_in_flight_all_done_exactly_once_within_60s_of_restart(env, tiny_ckpt, patient):
    register_version(tiny_ckpt)
    lesion = LesionFactory(patient=patient)
    # The default stale timeout (300 s): recovery must not wait for it.
    settings = dict(ANALYSIS_STALE_SECONDS="300", ANALYSIS_SWEEP_INTERVAL="60", ANALYSIS_HEATMAPS="false")
    w = _worker(env, **settings)
    w.start()
    try:
        images = [make_image(lesion, seed=2000 + i) for i in range(12)]
        with transaction.atomic():
            services.queue_analyses(images=images)
        wait_for(lambda: Analysis.objects.filter(image__in=images, status="running").exists(), timeout=120,
                 interval=0.01, message="a batch in flight", worker=w)
        w.kill()
        states = dict(Analysis.objects.filter(image__in=images).values_list("pk", "status"))
        in_flight = [pk for pk, s in states.items() if s == "running"]
        assert in_flight, states
        t0 = time.monotonic()
        w = _worker(env, **settings)  # a new process (and log) under the same settings
        w.start()
        ready = time.monotonic() - t0
        wait_for(lambda: _done(images), timeout=60, message="every analysis done within 60 s of the restart",
                 worker=w)
        recovery = time.monotonic() - t0
    finally:
        w.stop()
    rows = list(Analysis.objects.filter(image__in=images))
    assert len(rows) == len(images)  # one analysis per image and version
    assert all(a.status == "done" for a in rows), [(a.pk, a.status, a.error) for a in rows]
    # Exactly once: each in-flight row was claimed once more (2 attempts), the others once.
    assert {a.pk: a.attempts for a in rows if a.pk in in_flight} == {pk: 2 for pk in in_flight}
    assert all(a.attempts == 1 for a in rows if a.pk not in in_flight)
    assert "handed back" in w.log_tail(200000)
    figure(f"kill -9 with {len(in_flight)} analyses in flight ({sorted(states.values())}): worker ready "
           f"{ready:.1f}s after restart, all {len(images)} done exactly once {recovery:.1f}s after restart "
           f"(ANALYSIS_STALE_SECONDS=300; before: 304 s)")


# --------------------------------------------------------------------------- lost re-score

def _analysed_patient(worker, lesion_sites, tiny_ckpt, patient):
    register_version(tiny_ckpt)
    lesions = [LesionFactory(patient=patient, anatomic_site=site) for site in lesion_sites]
    images = [make_image(les, seed=3000 + i) for i, les in enumerate(lesions)]
    with transaction.atomic():
        services.queue_analyses(images=images)
    wait_for(lambda: _done(images) and not PendingRescore.objects.filter(patient=patient).exists(), timeout=120,
             message="analyses and re-scoring", worker=worker)
    return lesions, images


def test_lost_rescore_is_recovered_by_the_sweeper(worker, env, tiny_ckpt, patient, clinician):
    from patients import services as records

    lesions, images = _analysed_patient(worker, ["Trunk:Posterior trunk", "Head & Neck:Face"], tiny_ckpt, patient)
    before = timezone.now()
    # 1. The message is sent but lost (it goes to a queue nobody reads, which is then dropped).
    lost = unique_queue("melanoma-lost")
    restore = use_queue(lost)
    try:
        records.update_lesion(user=clinician, lesion=lesions[0], data={"anatomic_site": "Lower extremity:Thigh"})
        assert queue_length(lost) == 1
    finally:
        restore()
        purge_queue(lost)
    row = PendingRescore.objects.get(patient=patient)
    assert row.sent_at is not None
    t0 = time.monotonic()
    wait_for(lambda: not PendingRescore.objects.filter(patient=patient).exists(), timeout=60,
             message="the sweeper re-sending the lost re-scoring", worker=worker)
    first = time.monotonic() - t0
    a = Analysis.objects.get(image=images[0])
    assert a.context_updated_at > before and a.context_features["site_lower_extremity"] == 1.0

    # 2. A done analysis whose context was never computed, and nothing pending for it (the worker
    # died between the result and its re-scoring message, before this outbox existed).
    Analysis.objects.filter(image__in=images).update(context_updated_at=None, finished_at=before)
    t0 = time.monotonic()
    wait_for(lambda: Analysis.objects.filter(image__in=images, context_updated_at__isnull=True).count() == 0,
             timeout=60, message="the sweeper finding the never re-scored analyses", worker=worker)
    second = time.monotonic() - t0
    figure(f"lost re-score recovered by the sweeper in {first:.1f}s (message lost; stale after 3s, sweep every 1s); "
           f"never-computed context recovered in {second:.1f}s")


# --------------------------------------------------------------------------- admin through the services

@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


def _lesion_form(lesion, **changes):
    data = {"label": lesion.label, "anatomic_site": lesion.anatomic_site, "notes": lesion.notes,
            "diagnosis": lesion.diagnosis, "body_map_x": "", "body_map_y": "",
            "images-TOTAL_FORMS": "0", "images-INITIAL_FORMS": "0", "images-MIN_NUM_FORMS": "0",
            "images-MAX_NUM_FORMS": "1000",
            "reviews-TOTAL_FORMS": "0", "reviews-INITIAL_FORMS": "0", "reviews-MIN_NUM_FORMS": "0",
            "reviews-MAX_NUM_FORMS": "1000"}
    data.update(changes)
    return data


def test_admin_site_change_and_image_deletion_rescore_the_patient(worker, tiny_ckpt, patient, admin_client):
    lesions, images = _analysed_patient(worker, ["Trunk:Posterior trunk", "Head & Neck:Face", "Trunk:Abdomen"],
                                        tiny_ckpt, patient)
    before = timezone.now()
    url = reverse("admin:patients_lesion_change", args=[lesions[0].pk])
    response = admin_client.post(url, _lesion_form(lesions[0], anatomic_site="Lower extremity:Thigh"))
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Lesion.objects.get(pk=lesions[0].pk).anatomic_site == "Lower extremity:Thigh"
    t0 = time.monotonic()
    wait_for(lambda: Analysis.objects.get(image=images[0]).context_updated_at > before, timeout=60,
             message="re-scoring after the admin edit", worker=worker)
    edit = time.monotonic() - t0
    assert Analysis.objects.get(image=images[0]).context_features["site_lower_extremity"] == 1.0

    # Deleting an image in the admin: the other lesions are compared with one lesion fewer.
    before = timezone.now()
    n_before = Analysis.objects.get(image=images[1]).context_features["n_other_lesions"]
    response = admin_client.post(reverse("admin:patients_lesionimage_delete", args=[images[2].pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not LesionImage.objects.filter(pk=images[2].pk).exists()
    wait_for(lambda: Analysis.objects.get(image=images[1]).context_updated_at > before, timeout=60,
             message="re-scoring after the admin deletion", worker=worker)
    assert Analysis.objects.get(image=images[1]).context_features["n_other_lesions"] == n_before - 1
    figure(f"admin site change re-scored the patient in {edit:.1f}s")


def test_admin_cannot_move_a_lesion_to_another_patient(admin_client, patient, care_team):
    lesion = LesionFactory(patient=patient)
    other = PatientFactory(care_team=care_team)
    url = reverse("admin:patients_lesion_change", args=[lesion.pk])
    html = admin_client.get(url).content.decode()
    assert 'name="patient"' not in html  # shown, not editable
    response = admin_client.post(url, _lesion_form(lesion, patient=str(other.pk), notes="moved?"))
    assert response.status_code == 302
    lesion.refresh_from_db()
    assert lesion.patient_id == patient.pk and lesion.notes == "moved?"
    # Adding a lesion still chooses its patient.
    assert 'name="patient"' in admin_client.get(reverse("admin:patients_lesion_add")).content.decode()
