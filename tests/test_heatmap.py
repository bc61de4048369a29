"""Explanation heatmaps: Grad-CAM on the network's last feature map, the worker's heatmap task
(after the score, idempotent), the access-checked heatmap file, and the viewer's overlay."""
import io

import numpy as np
import pytest
import torch
from auditlog.models import LogEntry
from django.urls import reverse
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from inference import heatmap as hm
from inference import services
from inference.models import Analysis
from inference.tasks import make_heatmap
from tests.factories import LesionFactory, PatientFactory, lesion_like_array
from tests.worker_utils import make_image, register_version, tiny_ckpt  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db


class BrightnessNet(torch.nn.Module):
    """A toy network with the interface heatmaps need: the logit grows with the first channel."""

    def feature_map(self, x):
        return torch.nn.functional.avg_pool2d(x[:, :1], 4)  # (N, 1, H/4, W/4)

    def logit_from_map(self, fmap):
        return fmap.mean(dim=(1, 2, 3)) * 3.0


def test_gradcam_points_at_what_drives_the_logit():
    x = torch.zeros(1, 3, 64, 64)
    x[:, 0, 40:56, 8:24] = 1.0  # a bright patch, lower left
    cam = hm.gradcam(BrightnessNet(), x)
    assert cam.shape == (1, 16, 16) and cam.max() == pytest.approx(1.0) and cam.min() >= 0
    row, col = np.unravel_index(np.argmax(cam[0]), cam[0].shape)
    assert 10 <= row <= 13 and 2 <= col <= 5
    assert cam[0, :8, 8:].max() == 0  # nothing where the image is empty


def test_gradcam_of_a_flat_map_is_zero_not_nan():
    cam = hm.gradcam(BrightnessNet(), torch.zeros(2, 3, 32, 32))
    assert np.all(cam == 0)


def test_heatmap_png_keeps_the_images_proportions_and_is_transparent_where_there_is_no_evidence():
    cam = np.zeros((8, 8), np.float32)
    cam[2:4, 2:4] = 1.0
    with Image.open(io.BytesIO(hm.heatmap_png(cam, width=1200, height=900))) as img:
        assert img.mode == "RGBA" and img.size == (512, 384)
        alpha = np.asarray(img)[..., 3]
    assert alpha[-1, -1] == 0 and alpha.max() > 150


def test_heatmap_network_is_the_predictors_model():
    class P:
        model = object()

    assert hm.heatmap_network(P) is P.model


@pytest.fixture
def scored(patient, tiny_ckpt):  # noqa: F811
    version = register_version(tiny_ckpt)
    data = io.BytesIO()
    Image.fromarray(lesion_like_array(300, 200, seed=8)).save(data, format="JPEG", quality=92)
    image = make_image(LesionFactory(patient=patient), data=data.getvalue())
    analysis = Analysis.objects.create(image=image, model_version=version, status="done", probability=0.6,
                                       final_score=0.6, final_score_source="image", finished_at=timezone.now())
    return analysis


def test_the_heatmap_task_stores_a_private_png_once(scored):
    assert make_heatmap(scored.pk) is True
    scored.refresh_from_db()
    assert scored.heatmap.name.startswith("heatmaps/") and scored.heatmap_info["method"] == "grad-cam"
    assert scored.heatmap_info["model_version"] == scored.model_version.name
    with scored.heatmap.open("rb") as fh, Image.open(fh) as img:
        assert img.format == "PNG" and img.mode == "RGBA"
        assert abs(img.size[0] / img.size[1] - 200 / 160) < 0.02  # make_image records 200x160
    name = scored.heatmap.name
    assert make_heatmap(scored.pk) is False  # idempotent: a second delivery changes nothing
    scored.refresh_from_db()
    assert scored.heatmap.name == name


def test_no_heatmap_for_an_analysis_that_is_not_done(patient, tiny_ckpt):  # noqa: F811
    version = register_version(tiny_ckpt)
    a = Analysis.objects.create(image=make_image(LesionFactory(patient=patient)), model_version=version)
    assert make_heatmap(a.pk) is False and not Analysis.objects.get(pk=a.pk).heatmap


def test_a_new_score_drops_the_old_heatmap(scored, django_capture_on_commit_callbacks):
    make_heatmap(scored.pk)
    scored.refresh_from_db()
    old = scored.heatmap.name
    storage = scored.heatmap.storage
    Analysis.objects.filter(pk=scored.pk).update(status="running", claim_token="t")
    with django_capture_on_commit_callbacks(execute=True):
        assert services.complete_analysis(analysis=scored, token="t", probability=0.2,
                                          embedding=np.zeros(2048), timings={})
    scored.refresh_from_db()
    assert not scored.heatmap and not storage.exists(old)


def test_heatmap_file_is_served_to_the_team_only_and_audited(client, clinician, other_clinician, other_team,
                                                             scored):
    make_heatmap(scored.pk)
    url = reverse("inference:analysis_heatmap", args=[scored.pk])
    assert client.get(url).status_code == 302  # anonymous: to the login page
    client.force_login(clinician)
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert response["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert "private" in response["Cache-Control"]
    assert LogEntry.objects.filter(object_pk=str(scored.image.pk), action=LogEntry.Action.ACCESS,
                                   actor=clinician).exists()
    client.force_login(other_clinician)
    assert client.get(url).status_code == 404


def test_no_heatmap_yet_is_a_404(client, clinician, scored):
    client.force_login(clinician)
    assert client.get(reverse("inference:analysis_heatmap", args=[scored.pk])).status_code == 404


def test_api_links_and_serves_the_heatmap(clinician, other_clinician, other_team, scored):
    api = APIClient()
    api.force_authenticate(clinician)
    assert api.get(f"/api/v1/analyses/{scored.pk}/").json()["heatmap_url"] is None
    make_heatmap(scored.pk)
    body = api.get(f"/api/v1/analyses/{scored.pk}/").json()
    assert body["heatmap_url"].endswith(f"/api/v1/analyses/{scored.pk}/heatmap/")
    assert api.get(body["heatmap_url"], HTTP_ACCEPT="image/*").status_code == 200
    api.force_authenticate(other_clinician)
    assert api.get(f"/api/v1/analyses/{scored.pk}/heatmap/", HTTP_ACCEPT="image/*").status_code == 404


def test_viewer_offers_the_overlay_only_when_there_is_a_heatmap(client, clinician, scored):
    client.force_login(clinician)
    url = reverse("patients:image_viewer", args=[scored.image.pk])
    html = client.get(url).content.decode()
    assert "data-heatmap-toggle" not in html and "No heatmap for this result yet" in html
    make_heatmap(scored.pk)
    html = client.get(url).content.decode()
    assert "data-heatmap-toggle" in html
    assert f'src="{reverse("inference:analysis_heatmap", args=[scored.pk])}"' in html and "hidden" in html
    assert f"Grad-CAM of model {scored.model_version.name}" in html


def test_an_ensemble_versions_heatmap_uses_its_first_members_input(patient, tmp_path):
    from tests.worker_utils import tiny_ensemble

    version = register_version(tiny_ensemble(tmp_path / "ens.pt"), name="tiny-ensemble")
    data = io.BytesIO()
    Image.fromarray(lesion_like_array(240, 180, seed=9)).save(data, format="JPEG", quality=92)
    image = make_image(LesionFactory(patient=patient), data=data.getvalue())
    a = Analysis.objects.create(image=image, model_version=version, status="done", probability=0.4,
                                final_score=0.4, final_score_source="image", finished_at=timezone.now())
    assert make_heatmap(a.pk) is True
    a.refresh_from_db()
    assert a.heatmap_info["member"] == "efficientnet_lite0" and a.heatmap_info["input_size"] == 48
