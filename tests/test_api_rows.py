"""The API lists' fast read path (melanoma_site.api.rows and the row builders of patients.api.rows and
inference.api.rows) answers exactly what DRF's list with the serializers answers: the same bytes
for every list, nested routes, filters, search, ordering and pages, on records that cover every
branch of the builders (no diagnosis / melanoma, missing body map, no uploader, pending, failed,
queued, context and image scores, heatmaps, two model versions, non-ASCII and U+2028 text), in UTC
and in another time zone. The reference is the same view with ``list_rows = None`` (DRF's own
``ListModelMixin.list`` and serializer), so a changed field, type, order or value shows here."""
import datetime

import pytest
from auditlog.models import LogEntry
from django.urls import resolve
from django.utils import timezone
from rest_framework.test import APIClient

from inference.models import Analysis, ModelVersion
from melanoma_site.api.rows import RowListMixin
from patients.models import Lesion, LesionImage
from tests.factories import CareTeamFactory, LesionFactory, PatientFactory, UserFactory
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db

API = "/api/v1"
MELANOMA = "Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma Invasive"


@pytest.fixture
def records(clinician, care_team):
    """Patients of the clinician's team (and one of another team) with lesions, images and analyses
    by two model versions in every state."""
    now = timezone.now()
    with_context = ModelVersion.objects.create(
        name="ctx-v1", architecture="se_resnet50", input_size=64, sha256="c" * 64, weights_path="x.pt",
        card={"members": [{"name": "a"}]}, threshold=0.3, validated=True,
        metrics={"roc_auc": {"value": 0.81, "ci95": [0.7, 0.9]}, "sensitivity": 0.9, "specificity": 0.5,
                 "note": "Données\u2028réelles", "per_source": {"a": {"roc_auc": 0.7}}},
        context_model={"kind": "lesion", "feature_version": 0, "feature_names": ["age"],
                       "metrics": {"roc_auc_context": 0.83, "roc_auc_image_only": 0.8, "sensitivity_context": 0.91,
                                   "specificity_context": 0.55, "data": "simulated", "assumption": "r 0.5"},
                       "training_data": {"kind": "simulated", "n_rows": 10, "secret": "not shown"}})
    image_only = ModelVersion.objects.create(
        name="img-v2", architecture="efficientnet_lite0", input_size=96, sha256="d" * 64, weights_path="y.pt",
        metrics={"roc_auc": 0.77, "roc_auc_ci": [0.7, 0.84]}, threshold=0.45, is_active=True)
    uploader = UserFactory(username="uploader")
    patients = [
        PatientFactory(care_team=care_team, name="Zoë Ångström", fitzpatrick_skin_type="II", sex="male"),
        PatientFactory(care_team=care_team, name="Line\u2028Separator", birth_date=datetime.date(2001, 12, 31)),
        PatientFactory(care_team=care_team, sex="unknown"),
    ]
    foreign = PatientFactory(care_team=CareTeamFactory(members=[UserFactory()]))
    lesions = [
        LesionFactory(patient=patients[0], label="L-a", diagnosis=MELANOMA, body_map_x=0.25, body_map_y=1.0,
                      notes="grows\u2029fast"),
        LesionFactory(patient=patients[0], label="L-b", diagnosis="Benign", anatomic_site=""),
        LesionFactory(patient=patients[1], label="L-c", anatomic_site="Head & neck:Face", body_map_x=0.0),
        LesionFactory(patient=patients[2], label="L-d"),  # no images
        LesionFactory(patient=foreign, label="foreign"),
    ]
    images = []
    for n, (lesion, user) in enumerate([(lesions[0], uploader), (lesions[0], None), (lesions[1], uploader),
                                        (lesions[2], uploader), (lesions[4], uploader)]):
        image = make_image(lesion, seed=n, user=user)
        LesionImage.objects.filter(pk=image.pk).update(
            acquired_on=datetime.date(2024, 1 + n, 2 + n), image_type=["dermoscopic", "overview"][n % 2],
            quality={"warnings": [{"code": "blurred", "message": "flou\u2028"}]} if n == 1 else {})
        images.append(image)

    def analysis(image, version, **fields):
        a = Analysis(image=image, model_version=version, **fields)
        if fields.get("status") == "done":
            a.set_embedding([0.5] * 24)
        a.save()
        Analysis.objects.filter(pk=a.pk).update(queued_at=now - datetime.timedelta(minutes=a.pk))
        return a

    done = dict(status="done", started_at=now, finished_at=now, attempts=1, timings={"inference_ms": 12.5},
                member_probabilities={"a": 0.61, "b": 0.59})
    analysis(images[0], with_context, probability=0.6, final_score=0.7, final_score_source="context",
             context_features={"age": 50.0, "ud_distance": 0.25}, heatmap="heatmaps/x.png",
             heatmap_info={"method": "grad-cam", "size": 64}, previous_final_score=0.65, score_changed_at=now,
             score_change_reason="another lesion changed", context_explanation={"direction": "raised",
                                                                                "text": "plus\u2028haut"}, **done)
    analysis(images[0], image_only, probability=0.2, final_score=0.2, final_score_source="image", **done)
    analysis(images[1], with_context, probability=0.1, **done)  # context pending: the image score
    analysis(images[1], image_only, status="failed", error="decode failed", attempts=3,
             heatmap_info={"error": "no score"})
    analysis(images[2], with_context, status="queued")
    analysis(images[2], image_only, status="running", started_at=now)
    analysis(images[3], with_context, probability=0.05, final_score=0.29, final_score_source="context", **done)
    analysis(images[3], image_only, probability=0.45, final_score=0.45, final_score_source="", **done)
    analysis(images[4], with_context, probability=0.9, final_score=0.9, final_score_source="context", **done)
    return {"patients": patients, "lesions": lesions, "images": images}


def _urls(records):
    patient, lesion, image = records["patients"][0], records["lesions"][0], records["images"][0]
    return [
        f"{API}/patients/", f"{API}/patients/?ordering=name", f"{API}/patients/?search=zo",
        f"{API}/patients/?sex=male", f"{API}/patients/?page=2&page_size=2",
        f"{API}/lesions/", f"{API}/lesions/?ordering=-label", f"{API}/lesions/?anatomic_region=Trunk",
        f"{API}/lesions/?patient={patient.pk}", f"{API}/lesions/?diagnosis=Benign", f"{API}/lesions/?search=L-c",
        f"{API}/lesions/?page_size=1&page=3",
        f"{API}/patients/{patient.pk}/lesions/", f"{API}/patients/{patient.pk}/lesions/?ordering=-created_at",
        f"{API}/images/", f"{API}/images/?ordering=-size_bytes", f"{API}/images/?patient={patient.pk}",
        f"{API}/images/?acquired_on_after=2024-02-01", f"{API}/images/?image_type=overview",
        f"{API}/lesions/{lesion.pk}/images/", f"{API}/lesions/{lesion.pk}/images/?ordering=-acquired_on",
        f"{API}/analyses/", f"{API}/analyses/?ordering=-final_score", f"{API}/analyses/?flagged=true",
        f"{API}/analyses/?flagged=false", f"{API}/analyses/?status=done&page_size=2&page=2",
        f"{API}/analyses/?model_version={ModelVersion.objects.get(name='img-v2').pk}",
        f"{API}/analyses/?patient={patient.pk}&ordering=probability",
        f"{API}/images/{image.pk}/analyses/", f"{API}/images/{image.pk}/analyses/?ordering=queued_at",
    ]


def _drf_list(client, url, monkeypatch):
    """The same request answered by DRF's list and the view's serializer (no row builder)."""
    view = resolve(url.split("?")[0]).func.cls
    assert issubclass(view, RowListMixin) and view.list_rows is not None, url
    with monkeypatch.context() as m:
        m.setattr(view, "list_rows", None)
        return client.get(url)


def _last_list_entry():
    entry = LogEntry.objects.filter(action=LogEntry.Action.ACCESS, object_pk="").latest("pk")
    return entry.object_repr, entry.additional_data


@pytest.mark.parametrize("time_zone", ["UTC", "America/St_Johns"])
def test_every_list_answers_the_serializers_bytes(clinician, records, settings, monkeypatch, time_zone):
    settings.TIME_ZONE = time_zone
    client = APIClient()
    client.force_authenticate(clinician)
    for url in _urls(records):
        fast = client.get(url)
        fast_entry = _last_list_entry()
        drf = _drf_list(client, url, monkeypatch)
        assert fast.status_code == drf.status_code == 200, (url, fast.content)
        assert fast.json()["results"], url  # every variant shows rows
        assert fast.content == drf.content, url
        assert fast_entry == _last_list_entry(), url  # the same audit entry: ids, patients, count


def test_the_records_reach_every_branch_of_the_row_builders(clinician, records, settings):
    """What the byte comparison above covers (so it is not vacuous): every kind of value appears."""
    settings.TIME_ZONE = "America/St_Johns"
    client = APIClient()
    client.force_authenticate(clinician)
    analyses = client.get(f"{API}/analyses/").json()["results"]
    assert {a["source"] for a in analyses} == {"context", "image", None}
    assert {a["flagged"] for a in analyses} == {True, False, None}
    assert {a["context_pending"] for a in analyses} == {True, False}
    assert {a["status"] for a in analyses} == {"done", "failed", "queued", "running"}
    assert {a["heatmap_url"] is None for a in analyses} == {True, False}
    assert {a["embedding_dim"] for a in analyses} == {24, None}
    assert {a["score_metrics"]["producer"] if a["score_metrics"] else None for a in analyses} == {
        "image model", "image model + patient context", None}
    assert {a["model_version"]["context_metrics"] is None for a in analyses} == {True, False}
    assert any(a["score_changed_at"] and a["score_changed_at"].endswith(("-03:30", "-02:30")) for a in analyses)
    lesions = client.get(f"{API}/lesions/").json()["results"]
    assert {l["is_melanoma"] for l in lesions} == {True, False, None}
    assert {l["body_map_x"] for l in lesions} >= {0.25, 0.0, None}
    assert {l["id"]: l["image_count"] for l in lesions} == {
        l.pk: l.images.count() for l in Lesion.objects.filter(pk__in=[l["id"] for l in lesions])}
    assert {0, 1, 2} <= {l["image_count"] for l in lesions}
    images = client.get(f"{API}/images/").json()["results"]
    assert {i["uploaded_by"] for i in images} == {"uploader", None}
    assert len(images) == 4  # the other team's image is not listed


def test_shared_values_are_encoded_once_and_spliced_like_drf_would_write_them():
    from rest_framework.renderers import JSONRenderer

    from melanoma_site.api.rows import Shared, SharedJSONRenderer

    version = Shared({"metrics": {"note": "é\u2028", "roc_auc": 0.8, "ci": [1e-05, 1e16]}, "n": 3})
    data = {"count": 3, "next": None, "previous": "http://x/?page=1", "results": [
        {"id": 1, "model_version": version, "score": None, "metrics": Shared({})},
        {"model_version": version, "id": 2, "text": "a\u2029b"},
        {"id": 3, "model_version": None, "flags": [True, False]},
    ]}
    expected = JSONRenderer().render(data)
    assert SharedJSONRenderer().render(data) == expected
    assert b"\\u2028" in expected and "é".encode() in expected
    assert SharedJSONRenderer().render(data, "application/json; indent=2") == JSONRenderer().render(
        data, "application/json; indent=2")
    with pytest.raises(ValueError):  # strict JSON, as DRF: no NaN
        SharedJSONRenderer().render({"results": [{"v": version, "x": float("nan")}]})


def test_choice_filters_share_their_vocabulary_between_requests_and_still_validate(clinician, records):
    """Each filtered request copies its FilterSet; the copies share the (never changed) vocabulary
    instead of copying hundreds of choices, and still refuse a value outside it."""
    from django.http import QueryDict

    from patients.api.filters import LesionFilter

    filterset = LesionFilter(QueryDict("anatomic_site=Trunk&diagnosis=Benign"), queryset=Lesion.objects.all())
    assert filterset.is_valid()
    for name in ("anatomic_site", "diagnosis"):  # declared, and made from the model field's choices
        assert filterset.filters[name].extra["choices"] is LesionFilter.base_filters[name].extra["choices"]
        assert filterset.form.fields[name].choices and filterset.form.fields[name] is not LesionFilter.base_filters[
            name].field
    client = APIClient()
    client.force_authenticate(clinician)
    wanted = {l.pk for l in records["lesions"][:3] if l.diagnosis == "Benign"}
    assert {l["id"] for l in client.get(f"{API}/lesions/", {"diagnosis": "Benign"}).json()["results"]} == wanted
    refused = client.get(f"{API}/lesions/", {"anatomic_site": "Trunk:Nowhere"})
    assert refused.status_code == 400 and set(refused.json()["errors"]) == {"anatomic_site"}
