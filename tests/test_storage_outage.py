"""A media store outage seen by a worker: the store (a moto S3 server behind a TCP proxy that the
test switches off and on) does not answer when the analysis arrives. The worker must hand the claim
back for another try, not fail the analysis as an unreadable image; once the store is back the next
try scores it. Its own module: no other worker or beat may pick the analysis up meanwhile.
"""
from __future__ import annotations

import socket

import pytest
from django.core.files.base import ContentFile

from inference.models import Analysis
from tests.factories import LesionFactory
from tests.test_storage_s3 import files_under, free_port, s3, s3_storage  # noqa: F401 (s3: module fixture)
from tests.worker_utils import (
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


class SwitchableProxy:
    """A TCP forwarder on ``port`` to the S3 server that can be switched off (the store "goes away":
    connections refused) and on again, like a store outage between a worker and its bucket."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.port, self.target, self.server, self.thread = port, target, None, None

    def start(self):
        import socketserver
        import threading

        target = self.target

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self):
                upstream = socket.create_connection(target)
                pair = [(self.request, upstream), (upstream, self.request)]

                def pump(src, dst):
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        for s in (src, dst):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass

                back = threading.Thread(target=pump, args=pair[1], daemon=True)
                back.start()
                pump(*pair[0])
                back.join(30)
                upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Pipe)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_a_worker_that_cannot_reach_the_store_retries_instead_of_failing(s3, settings, tmp_path, patient,
                                                                         clinician, tiny_ckpt):  # noqa: F811
    """The worker's bucket is unreachable when the analysis arrives: the claim is handed back (not a
    permanent "unreadable image"), and the next try after the store is back scores it."""
    from rest_framework.test import APIClient

    from django.db import connection

    redis_url = require_redis()
    if connection.vendor != "postgresql":
        msg = "the worker process needs DATABASE_URL to name PostgreSQL"
        pytest.fail(msg) if in_ci() else pytest.skip(msg)
    register_version(tiny_ckpt)
    lesion = LesionFactory(patient=patient)
    # This process stores into the bucket directly; its own media folder must stay empty too.
    settings.STORAGES = {**settings.STORAGES, "default": s3_storage(s3["env"]["S3_ENDPOINT_URL"], s3["bucket"])}
    settings.MEDIA_ROOT = tmp_path / "test-media"
    settings.MEDIA_ROOT.mkdir()
    queue = unique_queue("analyses-outage")
    settings.ANALYSIS_QUEUE = queue  # only the worker below consumes it (no beat, no other worker)
    restore = use_queue(unique_queue("context-outage"))
    port = free_port()
    moto_port = int(s3["env"]["S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = SwitchableProxy(port, ("127.0.0.1", moto_port))  # off: nothing listens on the port yet
    base = tmp_path / "worker"
    (base / "media").mkdir(parents=True)
    worker = Worker(queue=queue, database=database_url(connection.settings_dict), media_root=base / "media",
                    model_root=base / "models", workdir=base, beat=False,
                    env={**s3["env"], "REDIS_URL": redis_url, "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                         "S3_MAX_ATTEMPTS": "1", "S3_CONNECT_TIMEOUT": "2", "ANALYSIS_QUEUE": queue,
                         "ANALYSIS_HEATMAPS": "false"})
    worker.start()
    try:
        api = APIClient()
        api.force_authenticate(clinician)
        resp = api.post("/api/v1/images/", {"lesion": lesion.pk, "image_type": "dermoscopic",
                                             "acquired_on": "2025-04-01",
                                             "files": [ContentFile(jpeg_bytes(seed=41), name="a.jpg")]},
                        format="multipart")
        assert resp.status_code == 201, resp.content[:300]
        analysis = Analysis.objects.get(image__lesion=lesion)
        wait_for(lambda: Analysis.objects.filter(pk=analysis.pk, attempts__gte=1, status="queued").exists(),
                 timeout=120, message="the claim handed back after the store did not answer", worker=worker)
        assert Analysis.objects.get(pk=analysis.pk).status != "failed"
        proxy.start()  # the store is back
        wait_for(lambda: Analysis.objects.filter(pk=analysis.pk, status__in=["done", "failed"]).exists(),
                 timeout=120, message="the analysis after the store came back", worker=worker)
        analysis.refresh_from_db()
        assert analysis.status == "done", analysis.error
        assert analysis.attempts >= 2 and analysis.probability is not None
        assert analysis.worker.startswith(f"{queue}-")
        assert files_under(base / "media") == [] and files_under(settings.MEDIA_ROOT) == []
    finally:
        worker.stop()
        proxy.stop()
        restore()
        purge_queue(queue)
