"""Model-version pages and API: an ensemble version shows its members, per-source held-out metrics
and its validation status; analyses name the version and carry each member's probability."""
import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from inference import services
from inference.models import Analysis, ModelVersion
from tests.factories import LesionFactory
from tests.worker_utils import make_image, tiny_ckpt  # noqa: F401 (session fixture)

pytestmark = pytest.mark.django_db


def _m(auc, n, mel):
    return {"n": n, "n_melanoma": mel, "roc_auc": auc, "roc_auc_ci95": [auc - 0.02, auc + 0.02],
            "pauc_80": 0.1, "sensitivity": 0.9, "sensitivity_ci95": [0.88, 0.92], "specificity": 0.61,
            "specificity_ci95": [0.58, 0.64], "calibration": {"slope": 1.02, "intercept": -0.01, "ece": 0.021}}


def ensemble_version(**kw):
    metrics = dict(_m(0.912, 6234, 1149), evaluation="held-out images", note="read the per-source figures",
                   per_source={"isic2017": _m(0.801, 536, 101), "isic2019": _m(0.923, 3129, 717)})
    card = {"architecture": "ensemble: efficientnet_lite0 + se_resnet50", "threshold_method": "sens>=0.9 on held-out",
            "members": [{"name": "efficientnet_lite0", "input_size": 160, "pretrained_weights": "imagenet",
                         "alone": {"roc_auc": {"pooled": 0.905}}, "combiner_weight": 0.93,
                         "adds_roc_auc": {"pooled": 0.04}},
                        {"name": "se_resnet50", "input_size": 96, "pretrained_weights": None,
                         "alone": {"roc_auc": {"pooled": 0.851}}, "combiner_weight": 0.12,
                         "adds_roc_auc": {"pooled": 0.002}}],
            "combiner": {"what_each_member_adds": ["se_resnet50: removing it changes the pooled ROC-AUC by -0.0020: it adds to the ensemble"]},
            "provenance": {"sources": {"isic2017": "ISIC 2017"}, "licence": "CC-BY-NC", "imagenet_weights": {}},
            "disclaimer": "Not validated for clinical use."}
    fields = dict(name="demo-ensemble", architecture=card["architecture"], input_size=160, sha256="e" * 64,
                  weights_path="e.pt", card=card, metrics=metrics, threshold=0.21, validated=False, is_active=True)
    fields.update(kw)
    return ModelVersion.objects.create(**fields)


def test_model_version_page_shows_members_per_source_metrics_and_not_validated(client, clinician):
    v = ensemble_version()
    client.force_login(clinician)
    html = client.get(reverse("inference:model_version_detail", args=[v.pk])).content.decode()
    assert "Not validated for clinical use" in html
    for text in ("isic2017", "isic2019", "pooled", "0.801", "0.923", "0.912", "efficientnet_lite0",
                 "se_resnet50", "removing it changes the pooled ROC-AUC by -0.0020", "CC-BY-NC", "0.610"):
        assert text in html, text
    listing = client.get(reverse("inference:model_version_list")).content.decode()
    assert "demo-ensemble" in listing and "Not validated for clinical use" in listing


def test_model_version_pages_need_a_login(client):
    v = ensemble_version()
    for url in (reverse("inference:model_version_list"), reverse("inference:model_version_detail", args=[v.pk])):
        resp = client.get(url)
        assert resp.status_code == 302 and "/accounts/login/" in resp["Location"]
    client.force_login(__import__("tests.factories", fromlist=["UserFactory"]).UserFactory(username="x"))
    assert client.get(reverse("inference:model_version_detail", args=[v.pk + 99])).status_code == 404


def test_result_shows_member_probabilities_and_links_the_model_card(client, clinician, patient):
    v = ensemble_version()
    image = make_image(LesionFactory(patient=patient))
    (a,) = services.queue_analyses(images=[image], model_version=v)
    Analysis.objects.filter(pk=a.pk).update(status="done", probability=0.42, final_score=0.42,
                                            final_score_source="image",
                                            member_probabilities={"efficientnet_lite0": 0.47, "se_resnet50": 0.30})
    client.force_login(clinician)
    html = client.get(reverse("inference:image_result", args=[image.pk])).content.decode()
    assert "efficientnet_lite0 47.0%" in html and "se_resnet50 30.0%" in html
    assert reverse("inference:model_version_detail", args=[v.pk]) in html
    assert "Not validated for clinical use" in html

    api = APIClient()
    api.force_authenticate(clinician)
    item = api.get("/api/v1/analyses/", {"image": image.pk}).json()["results"][0]
    assert item["member_probabilities"] == {"efficientnet_lite0": 0.47, "se_resnet50": 0.30}
    assert item["model_version"]["name"] == "demo-ensemble"
    assert item["model_version"]["metrics"]["per_source"]["isic2017"]["roc_auc"] == 0.801
    mv = api.get(f"/api/v1/model-versions/{v.pk}/").json()
    assert [m["name"] for m in mv["members"]] == ["efficientnet_lite0", "se_resnet50"]


def test_run_sh_install_activates_a_new_version_but_keeps_an_admins_later_choice(tiny_ckpt, tmp_path):
    from django.core.management import call_command

    from tests.worker_utils import tiny_ensemble

    ens = tiny_ensemble(tmp_path / "ens.pt")
    call_command("install_model", str(tiny_ckpt), "--name", "old", "--skip-if-installed")
    assert not ModelVersion.objects.get(name="old").is_active
    call_command("install_model", str(ens), "--name", "new", "--activate-if-new", "--skip-if-installed")
    new = ModelVersion.objects.get(name="new")
    assert new.is_active and new.architecture == "ensemble: efficientnet_lite0 + se_resnet50"
    # the admin switches back to the old version; running run.sh again must not undo that
    services.activate_model_version(model_version=ModelVersion.objects.get(name="old"))
    call_command("install_model", str(ens), "--name", "new", "--activate-if-new", "--skip-if-installed")
    assert ModelVersion.objects.get(name="old").is_active and not ModelVersion.objects.get(name="new").is_active
