"""The API contract, checked from the schema and the serializers (never a hard-coded field list):
error format and status codes, strict query parameters, pagination, analyses filters, the API root,
one query per list page. The live fuzzing of every operation is tests/test_api_conformance.py."""
import datetime
import json
import re

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import resolve
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.request import Request

from inference.api.serializers import AnalysisSerializer, ModelVersionSerializer
from inference.context import is_flagged
from inference.models import Analysis, ModelVersion
from melanoma_site.api import MAX_PAGE_SIZE, accepted_query_params
from melanoma_site.api.root import collections
from patients import services
from patients.api.serializers import LesionImageSerializer, LesionSerializer, PatientSerializer, UploadedImageSerializer
from tests.factories import LesionFactory, PatientFactory, image_bytes, uploaded
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db

API = "/api/v1"
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    from drf_spectacular.generators import SchemaGenerator

    with django_db_blocker.unblock():
        return SchemaGenerator().get_schema(request=None, public=True)


def operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def view_for(path: str, method: str):
    """The view instance that answers ``method path`` (ids filled in), as DRF sets it up."""
    url = re.sub(r"{\w+}", "1", path)
    match = resolve(url)
    func = match.func
    view = func.cls(**getattr(func, "initkwargs", {}))
    request = Request(APIRequestFactory().generic(method.upper(), url))
    view.request, view.args, view.kwargs, view.format_kwarg = request, (), match.kwargs, None
    if getattr(func, "actions", None):
        view.action = func.actions.get(method)
    return view


@pytest.fixture
def api(clinician):
    client = APIClient()
    client.force_authenticate(clinician)
    return client


def version(**kw):
    fields = dict(name="v1", architecture="se_resnet50", input_size=64, sha256="a" * 64, weights_path="x.pt",
                  metrics={"roc_auc": 0.8}, threshold=0.4, validated=False, is_active=False)
    fields.update(kw)
    return ModelVersion.objects.create(**fields)


# --- the schema -------------------------------------------------------------------------------

def test_every_operation_documents_its_error_statuses_with_the_one_error_body(schema):
    error = schema["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"code", "detail", "errors"}
    for path, method, operation in operations(schema):
        codes = set(operation["responses"])
        expected = {"400", "401", "406"}
        if method != "get":
            expected.add("403")
        if "{" in path or any(p["name"] == "page" for p in operation.get("parameters", [])):
            expected.add("404")  # an id that is not there (or not yours), a page past the last one
        if method in ("post", "put", "patch"):
            expected |= {"415", "422"}
        assert expected <= codes, (method, path, codes)
        for code, response in operation["responses"].items():
            if code >= "400":
                assert response["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                assert response["description"]


def test_documented_query_parameters_are_exactly_the_accepted_ones(schema):
    for path, method, operation in operations(schema):
        documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"} - {"format"}
        assert documented == accepted_query_params(view_for(path, method), method.upper()), (method, path)


def test_response_components_list_every_serializer_field(schema):
    """Derived from the serializers: a field added to one appears in the schema (and the fuzzing
    test then checks the server sends it as documented)."""
    components = schema["components"]["schemas"]
    for name, serializer in [("Analysis", AnalysisSerializer), ("ModelVersion", ModelVersionSerializer),
                             ("Patient", PatientSerializer), ("Lesion", LesionSerializer),
                             ("LesionImage", LesionImageSerializer), ("UploadedImage", UploadedImageSerializer)]:
        assert set(components[name]["properties"]) == set(serializer().fields), name


def test_uploads_answer_a_plain_list_as_documented(schema, world_image):
    for path in ("/api/v1/images/", "/api/v1/lesions/{lesion_pk}/images/"):
        for code in ("200", "201"):
            body = schema["paths"][path]["post"]["responses"][code]["content"]["application/json"]["schema"]
            assert body == {"type": "array", "items": {"$ref": "#/components/schemas/UploadedImage"}}
    client, lesion = world_image
    response = client.post(f"{API}/lesions/{lesion.pk}/images/", {
        "files": [uploaded(image_bytes(seed=3))], "image_type": "overview",
        "acquired_on": datetime.date.today().isoformat()}, format="multipart")
    assert response.status_code == 201 and isinstance(response.json(), list)
    assert set(response.json()[0]) == set(UploadedImageSerializer().fields)


@pytest.fixture
def world_image(api, patient):
    return api, LesionFactory(patient=patient)


def test_api_root_lists_every_collection_and_each_answers(api, schema):
    listed = api.get(f"{API}/").json()
    top_level = {p.split("/")[3] for p in schema["paths"] if p.count("/") == 4 and p != "/api/v1/"}
    assert set(listed) == set(collections()) == top_level
    assert {"patients", "lesions", "images", "analyses", "model-versions"} <= set(listed)
    for url in listed.values():
        assert api.get(url).status_code == 200, url


# --- errors -----------------------------------------------------------------------------------

def _is_error(response, status, code=None):
    body = response.json()
    assert response.status_code == status, body
    assert response["Content-Type"] == "application/json"
    assert set(body) == {"code", "detail", "errors"} and isinstance(body["errors"], dict)
    if code:
        assert body["code"] == code
    return body


def test_every_kind_of_error_has_the_one_format(api, patient):
    _is_error(APIClient().get(f"{API}/patients/"), 401, "not_authenticated")
    _is_error(api.get(f"{API}/patients/999999/"), 404, "not_found")
    _is_error(api.get(f"{API}/no-such-collection/"), 404, "not_found")
    _is_error(api.get(f"{API}/patients/-1/lesions/"), 404, "not_found")
    _is_error(api.delete(f"{API}/patients/{patient.pk}/"), 403, "permission_denied")
    _is_error(api.put(f"{API}/images/", {}, format="json"), 405, "method_not_allowed")
    _is_error(api.get(f"{API}/patients/", HTTP_ACCEPT="text/csv"), 406, "not_acceptable")
    _is_error(api.post(f"{API}/patients/", "mrn=1", content_type="application/x-www-form-urlencoded"), 415,
              "unsupported_media_type")
    body = _is_error(api.post(f"{API}/patients/", {"mrn": "", "birth_date": "soon"}, format="json"), 400, "invalid")
    assert {"mrn", "name", "birth_date"} <= set(body["errors"])
    assert body["detail"].startswith("mrn: ")


def test_schema_valid_but_refused_requests_are_422(api, patient, other_team):
    foreign = PatientFactory(care_team=other_team)
    body = _is_error(api.post(f"{API}/lesions/", {"patient": foreign.pk, "label": "x"}, format="json"), 422,
                     "rejected")
    missing = _is_error(api.post(f"{API}/lesions/", {"patient": 999999, "label": "x"}, format="json"), 422)
    assert body["errors"]["patient"][0].replace(str(foreign.pk), "N") == \
        missing["errors"]["patient"][0].replace("999999", "N")
    _is_error(api.post(f"{API}/patients/", {"mrn": patient.mrn, "name": "n", "birth_date": "1990-01-01"},
                       format="json"), 422, "rejected")
    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    _is_error(api.patch(f"{API}/patients/{patient.pk}/", {"birth_date": tomorrow}, format="json"), 422)
    # A wrong type is the schema's business: 400, even next to a rule's refusal.
    _is_error(api.post(f"{API}/lesions/", {"patient": "abc", "label": "x"}, format="json"), 400, "invalid")


def test_file_route_errors_are_json_whatever_the_accept_header(api):
    response = api.get(f"{API}/images/999999/file/", HTTP_ACCEPT="image/*")
    _is_error(response, 404, "not_found")


# --- query parameters ---------------------------------------------------------------------------

LISTS = ["patients", "lesions", "images", "analyses", "model-versions"]


@pytest.mark.parametrize("collection", LISTS)
def test_unknown_repeated_and_malformed_query_parameters_are_400_naming_them(api, collection):
    body = _is_error(api.get(f"{API}/{collection}/", {"mrn": "DEMO-0001", "final_score_gte": "0.5"}), 400)
    assert set(body["errors"]) == {"mrn", "final_score_gte"} and "mrn" in body["detail"]
    body = _is_error(api.get(f"{API}/{collection}/?page=1&page=2"), 400)
    assert set(body["errors"]) == {"page"}
    for params, name in [({"page_size": 0}, "page_size"), ({"page_size": MAX_PAGE_SIZE + 1}, "page_size"),
                         ({"page": "last"}, "page"), ({"page": "1.5"}, "page"), ({"ordering": "nonsense"}, "ordering"),
                         ({"ordering": "id,-"}, "ordering")]:
        assert set(_is_error(api.get(f"{API}/{collection}/", params), 400)["errors"]) == {name}, params
    assert api.get(f"{API}/{collection}/", {"page": "", "page_size": ""}).status_code == 200  # empty = not given
    _is_error(api.get(f"{API}/{collection}/", {"page": 2}), 404, "not_found")  # past the last page


def test_detail_routes_take_no_query_parameters(api, patient):
    body = _is_error(api.get(f"{API}/patients/{patient.pk}/", {"sex": "male"}), 400)
    assert set(body["errors"]) == {"sex"} and "accepts none" in body["errors"]["sex"][0]
    assert api.get(f"{API}/patients/{patient.pk}/", {"format": "json"}).status_code == 200


def test_page_size_up_to_the_maximum(api, care_team):
    PatientFactory.create_batch(5, care_team=care_team)
    data = api.get(f"{API}/patients/", {"page_size": 2}).json()
    assert data["count"] == 5 and len(data["results"]) == 2 and "page_size=2" in data["next"]
    assert len(api.get(f"{API}/patients/", {"page_size": MAX_PAGE_SIZE}).json()["results"]) == 5


def test_nul_in_a_search_is_a_400_not_a_server_error(api):
    _is_error(api.get(f"{API}/patients/", {"search": "a\x00b"}), 400)


def test_out_of_range_ids_in_filters_and_paths_read_as_missing(api):
    assert api.get(f"{API}/lesions/", {"patient": 10 ** 30}).json()["count"] == 0
    _is_error(api.get(f"{API}/patients/{10 ** 30}/"), 404)


def test_browsable_api_lists_no_records_in_filter_forms(client, clinician, patient, other_team):
    foreign = PatientFactory(care_team=other_team, mrn="FOREIGN-1")
    foreign_image = make_image(LesionFactory(patient=foreign), seed=4)
    Analysis.objects.create(image=foreign_image, model_version=version(), status="done", probability=0.5)
    client.force_login(clinician)
    for collection in LISTS:
        response = client.get(f"{API}/{collection}/", HTTP_ACCEPT="text/html")
        html = response.content.decode()
        assert response.status_code == 200 and "<form" in html
        assert "FOREIGN-1" not in html
        for name in ("image", "patient", "care_team", "model_version"):  # ids are typed, never listed
            assert not re.search(rf'<select[^>]*name="{name}"', html), (collection, name)


# --- analyses filters -----------------------------------------------------------------------------

@pytest.fixture
def scored(patient, other_team):
    """Analyses with known scores: image-scored and context-scored, one foreign, one queued."""
    ctx = json.loads((settings.DEMO_MODEL_DIR / "context_model.json").read_text())
    ctx["threshold"] = 0.7  # a stray threshold in the context model is ignored: one threshold per version (0.4)
    v = version(context_model=ctx)
    lesion = LesionFactory(patient=patient)
    rows = {}
    for key, seed, status, prob, final, source, day in [
        ("low", 1, "done", 0.1, 0.1, "image", 1), ("high", 2, "done", 0.9, 0.9, "image", 2),
        ("ctx_mid", 3, "done", 0.3, 0.35, "context", 3),  # 0.35 < the version's threshold 0.4: not flagged
        ("ctx_high", 4, "done", 0.2, 0.75, "context", 4),  # flagged by the version's threshold
        ("queued", 5, "queued", None, None, "", None),
    ]:
        image = make_image(lesion, seed=seed)
        rows[key] = Analysis.objects.create(
            image=image, model_version=v, status=status, probability=prob, final_score=final,
            final_score_source=source,
            finished_at=datetime.datetime(2025, 5, day, 12, tzinfo=datetime.UTC) if day else None)
    foreign_image = make_image(LesionFactory(patient=PatientFactory(care_team=other_team)), seed=9)
    rows["foreign"] = Analysis.objects.create(image=foreign_image, model_version=v, status="done",
                                              probability=0.99, final_score=0.99, final_score_source="image")
    return v, rows


def _ids(api, **params):
    response = api.get(f"{API}/analyses/", params)
    assert response.status_code == 200, response.json()
    return [r["id"] for r in response.json()["results"]]


def test_flagged_is_the_same_rule_in_sql_and_python(api, scored):
    _v, rows = scored
    listed = {r["id"]: r["flagged"] for r in api.get(f"{API}/analyses/").json()["results"]}
    for key in ("low", "high", "ctx_mid", "ctx_high", "queued"):
        python = is_flagged(Analysis.objects.select_related("model_version").get(pk=rows[key].pk))
        assert listed[rows[key].pk] is python, key
    assert [listed[rows[k].pk] for k in ("low", "high", "ctx_mid", "ctx_high", "queued")] == \
        [False, True, False, True, None]


def test_analyses_filters(api, scored, patient):
    v, rows = scored
    pk = {k: a.pk for k, a in rows.items()}
    assert set(_ids(api, flagged="true")) == {pk["high"], pk["ctx_high"]}
    assert set(_ids(api, flagged="false")) == {pk["low"], pk["ctx_mid"]}
    assert set(_ids(api, final_score__gte=0.3)) == {pk["high"], pk["ctx_mid"], pk["ctx_high"]}
    assert set(_ids(api, final_score__gte=0.3, final_score__lte=0.8)) == {pk["ctx_mid"], pk["ctx_high"]}
    assert set(_ids(api, probability__lte=0.2)) == {pk["low"], pk["ctx_high"]}
    assert set(_ids(api, status="queued")) == {pk["queued"]}
    assert set(_ids(api, model_version=v.pk)) == set(pk.values()) - {pk["foreign"]}
    assert set(_ids(api, patient=patient.pk)) == set(pk.values()) - {pk["foreign"]}
    assert set(_ids(api, finished_on_after="2025-05-02", finished_on_before="2025-05-03")) == \
        {pk["high"], pk["ctx_mid"]}
    assert _ids(api, ordering="-final_score")[:4] == [pk["high"], pk["ctx_high"], pk["ctx_mid"], pk["low"]]
    assert _ids(api, ordering="-final_score")[-1] == pk["queued"]  # no score: last, both directions
    assert _ids(api, ordering="final_score")[-1] == pk["queued"]
    for bad in ({"flagged": "maybe"}, {"final_score__gte": "high"}, {"status": "done-ish"},
                {"finished_on_after": "May"}, {"patient": "me"}):
        assert set(_is_error(api.get(f"{API}/analyses/", bad), 400)["errors"]) == set(bad), bad


def test_filters_by_a_foreign_id_answer_exactly_like_an_unknown_id(api, scored):
    _v, rows = scored
    foreign = rows["foreign"]
    for name, value in [("image", foreign.image_id), ("lesion", foreign.image.lesion_id),
                        ("patient", foreign.image.lesion.patient_id)]:
        a = api.get(f"{API}/analyses/", {name: value})
        b = api.get(f"{API}/analyses/", {name: 999999})
        assert a.status_code == b.status_code == 200 and a.json() == b.json() == \
            {"count": 0, "next": None, "previous": None, "results": []}


# --- one query per page -----------------------------------------------------------------------------

def _analysis(image, model_version):
    a = Analysis(image=image, model_version=model_version, status="done", probability=0.5, final_score=0.5,
                 final_score_source="image")
    a.set_embedding([0.0] * 16)
    a.save()


def _fill(clinician, patient, lesion, image, n, start):
    """n more rows in every list the test reads: patients, lesions (with images), images of ``lesion``,
    analyses (also of ``image``, by further model versions), model versions."""
    v1 = ModelVersion.objects.get(name="v1")
    for i in range(start, start + n):
        other = LesionFactory(patient=patient)
        _analysis(make_image(other, seed=100 + i, user=clinician), v1)
        make_image(lesion, seed=300 + i, user=clinician)
        _analysis(image, version(name=f"extra{i}", sha256=f"{i:064d}"))
        PatientFactory(care_team=patient.care_team)


LIST_URLS = {
    "patients": lambda p, l, i: f"{API}/patients/",
    "lesions": lambda p, l, i: f"{API}/lesions/",
    "patient lesions": lambda p, l, i: f"{API}/patients/{p}/lesions/",
    "images": lambda p, l, i: f"{API}/images/",
    "lesion images": lambda p, l, i: f"{API}/lesions/{l}/images/",
    "analyses": lambda p, l, i: f"{API}/analyses/",
    "image analyses": lambda p, l, i: f"{API}/images/{i}/analyses/",
    "model versions": lambda p, l, i: f"{API}/model-versions/",
}


@pytest.mark.parametrize("name", LIST_URLS)
def test_each_list_is_a_fixed_number_of_queries_per_page(api, clinician, patient, name, django_assert_max_num_queries):
    lesion = LesionFactory(patient=patient)
    image = make_image(lesion, seed=1, user=clinician)
    _analysis(image, version())
    url = LIST_URLS[name](patient.pk, lesion.pk, image.pk)
    with CaptureQueriesContext(connection) as one_row:
        first = api.get(url).json()
    _fill(clinician, patient, lesion, image, 12, start=0)
    with django_assert_max_num_queries(len(one_row)):
        data = api.get(url).json()
    assert data["count"] >= first["count"] + 12 and len(data["results"]) >= 13
