"""An ensemble model version in the real worker (Redis, a Celery worker process): every member runs
on each upload, the analysis stores the ensemble probability, each member's probability and the
embedding member's embedding, exactly as a direct call of the shared scoring path."""
import numpy as np
import pytest

from inference.models import Analysis
from tests.test_inference_worker import (  # noqa: F401 (module fixtures)
    _shared_dirs, api, done, lesion, upload, worker, worker_env,
)
from tests.worker_utils import jpeg_bytes, register_version, tiny_ensemble, wait_for, worker_runtimes

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_ensemble_upload_is_scored_by_every_member(worker, api, lesion, tmp_path_factory):
    from inference.predictor import Predictor

    path = tiny_ensemble(tmp_path_factory.mktemp("ens") / "ens.pt")
    version = register_version(path, architecture="ensemble: efficientnet_lite0 + se_resnet50", input_size=48)
    images = upload(api, lesion, [jpeg_bytes(seed=s) for s in (21, 22)])
    wait_for(lambda: done(images, version), timeout=120, message="2 ensemble analyses done", worker=worker)
    rows = {a.image_id: a for a in Analysis.objects.filter(image__in=images, model_version=version)}
    assert all(a.status == "done" for a in rows.values()), [a.error for a in rows.values()]
    runtimes = worker_runtimes(version)  # each member's measured runtime, recorded with the version
    assert {a.timings["precision"] for a in rows.values()} == {"+".join(runtimes) if len(set(runtimes)) > 1
                                                               else runtimes[0]}
    bf16 = "bf16-autocast" in runtimes
    direct = Predictor.from_checkpoint(path, runtime=runtimes).predict_files([img.file.path for img in images])
    for k, img in enumerate(images):
        a = rows[img.pk]
        assert set(a.member_probabilities) == {"efficientnet_lite0", "se_resnet50"}
        assert a.get_embedding().shape == (1280,)
        assert a.timings["input_sizes"] == [32, 48]
        np.testing.assert_allclose(a.probability, direct.probabilities[k], atol=0.02 if bf16 else 1e-4)
        np.testing.assert_allclose([a.member_probabilities["efficientnet_lite0"], a.member_probabilities["se_resnet50"]],
                                   direct.member_probabilities[k], atol=0.02 if bf16 else 1e-4)
        z = -0.5 + 0.8 * np.log(a.member_probabilities["efficientnet_lite0"] / (1 - a.member_probabilities["efficientnet_lite0"])) \
            + 0.3 * np.log(a.member_probabilities["se_resnet50"] / (1 - a.member_probabilities["se_resnet50"]))
        assert a.probability == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-4)
