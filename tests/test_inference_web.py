"""Analyses on pages (the result partial, the polling fragment), the API, the admin, the schema."""
import pytest
from django.template import Context, Template
from django.urls import reverse
from rest_framework.test import APIClient

from inference import selectors as inference_selectors
from inference import services
from inference.models import Analysis, ModelVersion
from patients.models import LesionImage
from tests.factories import LesionFactory, PatientFactory
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db


def version(**kw):
    fields = dict(name="v1", architecture="se_resnet50", input_size=64, sha256="a" * 64, weights_path="x.pt",
                  metrics={"roc_auc": 0.87, "roc_auc_ci": [0.83, 0.9]}, threshold=0.4, validated=False,
                  is_active=True)
    fields.update(kw)
    return ModelVersion.objects.create(**fields)


@pytest.fixture
def lesion(patient):
    return LesionFactory(patient=patient)


@pytest.fixture
def image(lesion):
    return make_image(lesion)


@pytest.fixture
def api(clinician):
    c = APIClient()
    c.force_authenticate(clinician)
    return c


def fragment(client, image):
    return client.get(reverse("inference:image_result", args=[image.pk]))


# ---------------------------------------------------------------------- the partial / fragment

def test_fragment_says_waiting_when_no_model_is_installed(client, clinician, image):
    client.force_login(clinician)
    resp = fragment(client, image)
    assert resp.status_code == 200
    html = resp.content.decode()
    assert "Waiting: no model installed" in html
    assert 'data-poll-interval="15000"' in html  # checks back slowly: results appear once a model is installed


def test_partial_loads_the_vendored_poll_script_when_it_needs_it(rf, clinician, image):
    from django.contrib.staticfiles import finders

    v = version()
    Analysis.objects.create(image=image, model_version=v)
    request = rf.get("/")
    request.user = clinician
    html = Template('{% include "inference/_image_result.html" with image=image %}').render(
        Context({"image": image, "request": request}))
    assert 'src="/static/js/poll.js"' in html
    js = open(finders.find("js/poll.js")).read()
    assert "data-poll-url" in js and "http" not in js.replace("XMLHttpRequest", "")  # vendored, no CDN


def test_fragment_polls_while_queued_and_shows_failure_reason(client, clinician, image):
    v = version()
    a = Analysis.objects.create(image=image, model_version=v)
    client.force_login(clinician)
    html = fragment(client, image).content.decode()
    assert "Queued for analysis by v1" in html
    assert f'data-poll-url="{reverse("inference:image_result", args=[image.pk])}"' in html
    a.status, a.error = "failed", "The image could not be read: OSError: truncated"
    a.save()
    html = fragment(client, image).content.decode()
    assert "Analysis failed" in html and "could not be read" in html and "data-poll-url" not in html


def test_fragment_shows_score_threshold_metrics_and_validation_label(client, clinician, image):
    v = version()
    Analysis.objects.create(image=image, model_version=v, status="done", probability=0.62, final_score=0.71,
                            final_score_source="context")
    client.force_login(clinician)
    html = fragment(client, image).content.decode()
    assert "71%" in html and "(image + patient context)" in html and "flagged" in html
    assert "Image probability: 62.0%" in html
    # a context score: the image model's ROC-AUC is not shown beside it; one threshold
    assert "ROC-AUC 0.870" not in html and "threshold 40%" in html
    assert "score-high" in html and "Not validated for clinical use" in html
    ModelVersion.objects.filter(pk=v.pk).update(validated=True)
    assert "Not validated" not in fragment(client, image).content.decode()


def test_fragment_low_score_without_context_model_says_image_only(client, clinician, image):
    v = version()
    Analysis.objects.create(image=image, model_version=v, status="done", probability=0.05, final_score=0.05,
                            final_score_source="image")
    client.force_login(clinician)
    html = fragment(client, image).content.decode()
    assert "score-low" in html and "5%" in html and "(image)" in html and "not flagged" in html
    assert "ROC-AUC 0.870 (95% CI 0.830–0.900)" in html  # the image model's figures beside its own score


def test_fragment_is_404_for_other_clinicians_and_anonymous(client, other_clinician, staff, image):
    assert fragment(client, image).status_code == 404
    client.force_login(other_clinician)
    assert fragment(client, image).status_code == 404
    client.force_login(staff)
    assert fragment(client, image).status_code == 200


def test_partial_for_many_images_runs_a_bounded_number_of_queries(rf, clinician, lesion,
                                                                  django_assert_max_num_queries):
    v = version()
    imgs = [make_image(lesion, seed=i) for i in range(50)]
    for i, img in enumerate(imgs[:40]):
        Analysis.objects.create(image=img, model_version=v, status="done" if i % 2 else "queued",
                                probability=0.3, final_score=0.3, final_score_source="image")
    request = rf.get("/")
    request.user = clinician
    tpl = Template('{% for image in images %}{% include "inference/_image_result.html" with image=image %}'
                   '{% endfor %}')
    with django_assert_max_num_queries(4):
        images = list(inference_selectors.with_results(LesionImage.objects.filter(lesion=lesion)))
        html = tpl.render(Context({"images": images, "request": request}))
    assert html.count('class="analysis-result') == 50
    assert html.count("Queued for analysis") == 20 and html.count("Waiting for analysis") == 10
    # Also through a relation (patient page: lesions -> images).
    from patients.models import Lesion

    with django_assert_max_num_queries(5):
        lesions = list(Lesion.objects.filter(pk=lesion.pk).prefetch_related(
            "images", inference_selectors.analysis_prefetch(prefix="images__")))
        tpl.render(Context({"images": lesions[0].images.all(), "request": request}))


# ---------------------------------------------------------------------- API

def test_analysis_api_lists_filters_and_hides_other_teams(api, lesion, image, other_team):
    v = version()
    mine = Analysis.objects.create(image=image, model_version=v, status="done", probability=0.2,
                                   final_score=0.2, final_score_source="image", timings={"inference_ms": 3})
    mine.set_embedding([0.5] * 2048)
    mine.save()
    foreign_img = make_image(LesionFactory(patient=PatientFactory(care_team=other_team)), seed=9)
    foreign = Analysis.objects.create(image=foreign_img, model_version=v)

    data = api.get("/api/v1/analyses/").json()
    assert [r["id"] for r in data["results"]] == [mine.pk]
    item = data["results"][0]
    assert item["model_version"] == {"id": v.pk, "name": "v1", "architecture": "se_resnet50", "input_size": 64,
                                     "metrics": v.metrics, "threshold": 0.4, "validated": False,
                                     "context_metrics": None}
    assert item["score"] == 0.2 and item["threshold"] == 0.4 and item["flagged"] is False
    assert item["source"] == "image" and item["scale"] == "calibrated_probability" and not item["context_pending"]
    assert item["embedding_dim"] == 2048 and "embedding" not in item
    assert item["patient"] == lesion.patient_id and item["lesion"] == lesion.pk
    assert item["timings"] == {"inference_ms": 3} and item["final_score_source"] == "image"
    for params, expected in [({"image": image.pk}, 1), ({"lesion": lesion.pk}, 1), ({"patient": lesion.patient_id}, 1),
                             ({"status": "queued"}, 0), ({"model_version": v.pk}, 1), ({"status": "done"}, 1)]:
        assert api.get("/api/v1/analyses/", params).json()["count"] == expected, params
    assert api.get(f"/api/v1/analyses/{foreign.pk}/").status_code == 404
    assert api.get(f"/api/v1/analyses/{mine.pk}/").json()["probability"] == 0.2

    nested = api.get(f"/api/v1/images/{image.pk}/analyses/")
    assert nested.status_code == 200 and [r["id"] for r in nested.json()["results"]] == [mine.pk]
    assert api.get(f"/api/v1/images/{foreign_img.pk}/analyses/").status_code == 404
    assert APIClient().get("/api/v1/analyses/").status_code in (401, 403)


def test_model_versions_api_is_read_only(api):
    v = version()
    data = api.get("/api/v1/model-versions/").json()
    (item,) = data["results"]
    assert item["name"] == "v1" and item["is_active"] is True and item["roc_auc"] == 0.87
    assert item["validated"] is False and item["threshold"] == 0.4 and item["has_context_model"] is False
    assert item["context_model"] is None
    assert api.post("/api/v1/model-versions/", {"name": "x"}).status_code == 405
    assert api.delete(f"/api/v1/model-versions/{v.pk}/").status_code == 405


def test_model_version_api_says_what_the_context_model_was_trained_on(api):
    from tests.test_context_rescore import bundled_context_model

    v = version(context_model=bundled_context_model())
    item = api.get(f"/api/v1/model-versions/{v.pk}/").json()
    assert item["has_context_model"] is True
    summary = item["context_model"]
    assert summary["training_data"]["kind"] == "simulated patients"
    assert summary["training_data"]["resemblance"] == 0.5
    assert "not real patients" in summary["training_data"]["description"]
    assert summary["metrics"]["roc_auc_context"] > summary["metrics"]["roc_auc_image_only"]
    assert summary["validated"] is False and 0 < summary["threshold"] < 1


def test_schema_generates_without_errors_or_warnings_for_analyses():
    from drf_spectacular.drainage import GENERATOR_STATS
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.validation import validate_schema

    GENERATOR_STATS.reset()
    with GENERATOR_STATS.silence():
        schema = SchemaGenerator().get_schema(request=None, public=True)
    validate_schema(schema)
    for p in ("/api/v1/analyses/", "/api/v1/analyses/{id}/", "/api/v1/images/{image_pk}/analyses/",
              "/api/v1/model-versions/", "/api/v1/model-versions/{id}/"):
        assert p in schema["paths"], p
    ours = [m for m in list(GENERATOR_STATS._warn_cache) + list(GENERATOR_STATS._error_cache)
            if "inference" in str(m) or "Analys" in str(m) or "ModelVersion" in str(m)]
    assert not ours, ours
    props = schema["components"]["schemas"]["Analysis"]["properties"]
    assert "embedding" not in props and "embedding_dim" in props


# ---------------------------------------------------------------------- admin

def test_admin_lists_versions_and_analyses_and_activates(client, staff, image):
    v1 = version()
    v2 = version(name="v2", sha256="b" * 64, is_active=False, metrics={"roc_auc": 0.9})
    Analysis.objects.create(image=image, model_version=v1, status="done", probability=0.3)
    client.force_login(staff)
    html = client.get(reverse("admin:inference_modelversion_changelist")).content.decode()
    assert "0.870 (0.830–0.900)" in html and "v2" in html
    assert client.get(reverse("admin:inference_analysis_changelist") + "?status=done").status_code == 200
    a = Analysis.objects.get()
    assert client.get(reverse("admin:inference_analysis_change", args=[a.pk])).status_code == 200
    resp = client.post(reverse("admin:inference_modelversion_changelist"),
                       {"action": "activate", "_selected_action": [v2.pk]}, follow=True)
    assert resp.status_code == 200
    assert ModelVersion.objects.get(is_active=True) == v2
    assert Analysis.objects.filter(model_version=v2, status="queued").count() == 1
