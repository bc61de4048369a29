"""The worker loads and probes the active model version when it starts (inference.warmup), not on
the first upload: a real Celery worker process (Redis, prefork) started with an active version."""
import pytest

from inference.models import Analysis, ModelVersion
from tests.test_inference_worker import (  # noqa: F401 (module fixtures)
    _shared_dirs, api, done, lesion, upload, worker_env,
)
from tests.worker_utils import Worker, jpeg_bytes, register_version, tiny_ckpt, wait_for  # noqa: F401

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_worker_loads_and_probes_the_model_at_start_so_the_first_task_shows_no_load(worker_env, api, lesion,
                                                                                   tiny_ckpt):
    version = register_version(tiny_ckpt)  # active before the worker starts
    w = Worker(queue=worker_env["queue"], database=worker_env["db"], media_root=worker_env["media"],
               model_root=worker_env["models"], workdir=worker_env["base"], beat=False)
    w.start()
    try:
        # Before any upload: the runtime was measured and recorded, and the process says it is warm.
        wait_for(lambda: (ModelVersion.objects.get(pk=version.pk).runtime or {}).get("latest"), timeout=180,
                 message="the runtime decision recorded at worker start", worker=w)
        wait_for(lambda: "model warm: version" in w.log_tail(20000), timeout=60, message="warm-up logged", worker=w)
        assert not Analysis.objects.exists()

        images = upload(api, lesion, [jpeg_bytes(seed=31)])
        wait_for(lambda: done(images), timeout=120, message="the first analysis", worker=w)
        a = Analysis.objects.get(image=images[0])
        assert a.status == "done", a.error
        assert "model_load_ms" not in a.timings  # the model was loaded before the task
        recorded = ModelVersion.objects.get(pk=version.pk).runtime["latest"]
        assert a.timings["precision"] == recorded["members"][0]["chosen"]
    finally:
        w.stop()
