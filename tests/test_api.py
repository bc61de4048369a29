"""REST API /api/v1/: access matrix over every endpoint, CRUD through the services, uploads, filters."""
import datetime
from dataclasses import dataclass

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from patients import services
from patients.models import Lesion, LesionImage, Patient
from tests.factories import (
    CareTeamFactory,
    LesionFactory,
    PatientFactory,
    StaffFactory,
    UserFactory,
    image_bytes,
    uploaded,
)

pytestmark = pytest.mark.django_db


API = "/api/v1"
DAY = "2025-06-01"


@dataclass
class World:
    clinician: object
    other: object
    staff: object
    team: object
    other_team: object
    patient: Patient
    lesion: Lesion
    image: LesionImage


@pytest.fixture
def world(clinician, other_clinician, staff, care_team, other_team, patient):
    lesion = LesionFactory(patient=patient)
    [outcome] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(image_bytes(seed=1))],
                                       image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2))
    return World(clinician, other_clinician, staff, care_team, other_team, patient, lesion, outcome.image)


ROLES = ["on_team", "off_team", "staff", "anonymous", "token"]


def client_for(role, w: World) -> APIClient:
    client = APIClient()
    if role == "on_team":
        client.force_login(w.clinician)
    elif role == "off_team":
        client.force_login(w.other)
    elif role == "staff":
        client.force_login(w.staff)
    elif role == "token":
        token, _ = Token.objects.get_or_create(user=w.clinician)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def upload_payload(w, seed=7, with_lesion=True):
    data = {"files": [uploaded(image_bytes(seed=seed), name=f"new{seed}.jpg")], "image_type": "clinical_close_up",
            "acquired_on": DAY}
    if with_lesion:
        data["lesion"] = w.lesion.pk
    return data


# (name, method, url(w), payload(w) or None, format, expected status per role)
# Expected: on-team clinician and token (same clinician) succeed; another team's clinician gets 404
# for anything addressed by id (422 where the id is only inside the payload); anonymous gets 401.
ENDPOINTS = [
    ("patient list", "get", lambda w: f"{API}/patients/", None, None,
     dict(on_team=200, off_team=200, staff=200, anonymous=401, token=200)),
    ("patient create", "post", lambda w: f"{API}/patients/",
     lambda w: {"mrn": "NEW-1", "name": "New Person", "birth_date": "1990-01-01", "care_team": w.team.pk}, "json",
     dict(on_team=201, off_team=422, staff=201, anonymous=401, token=201)),
    ("patient detail", "get", lambda w: f"{API}/patients/{w.patient.pk}/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("patient update", "patch", lambda w: f"{API}/patients/{w.patient.pk}/", lambda w: {"name": "Changed"}, "json",
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("patient replace", "put", lambda w: f"{API}/patients/{w.patient.pk}/",
     lambda w: {"mrn": w.patient.mrn, "name": "Replaced", "birth_date": "1970-05-17", "sex": "male"}, "json",
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("patient delete", "delete", lambda w: f"{API}/patients/{w.patient.pk}/", None, None,
     dict(on_team=403, off_team=404, staff=204, anonymous=401, token=403)),
    ("patient lesions", "get", lambda w: f"{API}/patients/{w.patient.pk}/lesions/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("patient lesion create", "post", lambda w: f"{API}/patients/{w.patient.pk}/lesions/",
     lambda w: {"label": "L-new", "anatomic_site": "Head and neck:Head:Face"}, "json",
     dict(on_team=201, off_team=404, staff=201, anonymous=401, token=201)),
    ("lesion list", "get", lambda w: f"{API}/lesions/", None, None,
     dict(on_team=200, off_team=200, staff=200, anonymous=401, token=200)),
    ("lesion create", "post", lambda w: f"{API}/lesions/", lambda w: {"patient": w.patient.pk, "label": "L-x"}, "json",
     dict(on_team=201, off_team=422, staff=201, anonymous=401, token=201)),
    ("lesion detail", "get", lambda w: f"{API}/lesions/{w.lesion.pk}/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("lesion update", "patch", lambda w: f"{API}/lesions/{w.lesion.pk}/", lambda w: {"notes": "Itchy"}, "json",
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("lesion delete", "delete", lambda w: f"{API}/lesions/{w.lesion.pk}/", None, None,
     dict(on_team=204, off_team=404, staff=204, anonymous=401, token=204)),
    ("lesion images", "get", lambda w: f"{API}/lesions/{w.lesion.pk}/images/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("lesion image upload", "post", lambda w: f"{API}/lesions/{w.lesion.pk}/images/",
     lambda w: upload_payload(w, with_lesion=False), "multipart",
     dict(on_team=201, off_team=404, staff=201, anonymous=401, token=201)),
    ("image list", "get", lambda w: f"{API}/images/", None, None,
     dict(on_team=200, off_team=200, staff=200, anonymous=401, token=200)),
    ("image upload", "post", lambda w: f"{API}/images/", lambda w: upload_payload(w), "multipart",
     dict(on_team=201, off_team=422, staff=201, anonymous=401, token=201)),
    ("image detail", "get", lambda w: f"{API}/images/{w.image.pk}/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("image file", "get", lambda w: f"{API}/images/{w.image.pk}/file/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("image thumbnail", "get", lambda w: f"{API}/images/{w.image.pk}/thumbnail/", None, None,
     dict(on_team=200, off_team=404, staff=200, anonymous=401, token=200)),
    ("image delete", "delete", lambda w: f"{API}/images/{w.image.pk}/", None, None,
     dict(on_team=204, off_team=404, staff=204, anonymous=401, token=204)),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name, method, url, payload, fmt, expected", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_access_matrix(world, role, name, method, url, payload, fmt, expected):
    client = client_for(role, world)
    kwargs = {}
    if payload is not None:
        kwargs = {"data": payload(world), "format": fmt}
    response = getattr(client, method)(url(world), **kwargs)
    assert response.status_code == expected[role], (name, role, getattr(response, "data", None))


@pytest.mark.parametrize("role", ROLES)
def test_lists_show_only_visible_records(world, role):
    foreign_patient = PatientFactory(care_team=world.other_team)
    foreign_lesion = LesionFactory(patient=foreign_patient)
    services.upload_images(user=world.other, lesion=foreign_lesion, files=[uploaded(image_bytes(seed=9))],
                           image_type="overview", acquired_on=datetime.date(2025, 1, 1))
    client = client_for(role, world)
    expected = {"on_team": ({world.patient.pk}, {world.lesion.pk}, {world.image.pk}),
                "token": ({world.patient.pk}, {world.lesion.pk}, {world.image.pk}),
                "off_team": ({foreign_patient.pk}, {foreign_lesion.pk}, None),
                "staff": ({world.patient.pk, foreign_patient.pk}, {world.lesion.pk, foreign_lesion.pk}, None)}
    response = client.get(f"{API}/patients/")
    if role == "anonymous":
        assert response.status_code == 401
        return
    assert {p["id"] for p in response.data["results"]} == expected[role][0]
    assert {x["id"] for x in client.get(f"{API}/lesions/").data["results"]} == expected[role][1]
    images = {x["id"] for x in client.get(f"{API}/images/").data["results"]}
    if expected[role][2] is not None:
        assert images == expected[role][2]
    # Filtering by a foreign id reads exactly like an id that does not exist: empty, not an error.
    assert client.get(f"{API}/lesions/", {"patient": 999999}).data["count"] == 0
    if role in ("on_team", "token"):
        assert client.get(f"{API}/lesions/", {"patient": foreign_patient.pk}).data["count"] == 0
        assert client.get(f"{API}/images/", {"lesion": foreign_lesion.pk}).data["count"] == 0


def test_off_team_answers_exactly_like_a_missing_record(world):
    client = client_for("off_team", world)
    foreign = client.get(f"{API}/patients/{world.patient.pk}/")
    missing = client.get(f"{API}/patients/999999/")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.data == missing.data


def test_session_writes_need_the_csrf_token(world):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(world.clinician)
    response = client.patch(f"{API}/patients/{world.patient.pk}/", {"name": "No CSRF"}, format="json")
    assert response.status_code == 403
    world.patient.refresh_from_db()
    assert world.patient.name != "No CSRF"


def test_bad_token_is_refused(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert client.get(f"{API}/patients/").status_code == 401


def test_inactive_users_token_is_refused(world):
    client = client_for("token", world)
    world.clinician.is_active = False
    world.clinician.save()
    assert client.get(f"{API}/patients/").status_code in (401, 403)


# --- patients -----------------------------------------------------------------------------------

def test_patient_search_filter_and_ordering(world):
    a = PatientFactory(care_team=world.team, name="Zelda Quinn", mrn="Q-777", sex="male")
    client = client_for("on_team", world)
    assert [p["id"] for p in client.get(f"{API}/patients/", {"search": "Q-777"}).data["results"]] == [a.pk]
    assert [p["id"] for p in client.get(f"{API}/patients/", {"search": "zelda"}).data["results"]] == [a.pk]
    assert [p["id"] for p in client.get(f"{API}/patients/", {"sex": "male"}).data["results"]] == [a.pk]
    assert client.get(f"{API}/patients/", {"care_team": world.team.pk}).data["count"] == 2
    names = [p["name"] for p in client.get(f"{API}/patients/", {"ordering": "-name"}).data["results"]]
    assert names == sorted(names, reverse=True)
    assert client.get(f"{API}/patients/", {"care_team": "abc"}).status_code == 400


def test_patient_list_is_most_recently_active_first(world):
    newer = PatientFactory(care_team=world.team)
    client = client_for("on_team", world)
    assert client.get(f"{API}/patients/").data["results"][0]["id"] == newer.pk
    client.post(f"{API}/patients/{world.patient.pk}/lesions/", {"label": "L2"}, format="json")
    assert client.get(f"{API}/patients/").data["results"][0]["id"] == world.patient.pk


def test_create_patient_defaults_to_the_only_team_and_reports_duplicates(world):
    client = client_for("token", world)
    response = client.post(f"{API}/patients/", {"mrn": "N-1", "name": "New", "birth_date": "1990-02-03"},
                           format="json")
    assert response.status_code == 201, response.data
    assert response.data["care_team"] == world.team.pk
    assert response.data["lesions_url"].endswith(f"/api/v1/patients/{response.data['id']}/lesions/")
    again = client.post(f"{API}/patients/", {"mrn": "N-1", "name": "Other", "birth_date": "1990-02-03"},
                        format="json")
    assert again.status_code == 422 and again.data["errors"]["mrn"] == [services.DUPLICATE_MRN]


def test_create_patient_with_foreign_or_unknown_team_is_a_field_error(world):
    client = client_for("on_team", world)
    for team in (world.other_team.pk, 999999):
        response = client.post(f"{API}/patients/", {"mrn": "N-2", "name": "N", "birth_date": "1990-02-03",
                                                    "care_team": team}, format="json")
        assert response.status_code == 422 and "care_team" in response.data["errors"]
    assert not Patient.objects.filter(mrn="N-2").exists()


def test_patient_bad_input_is_a_clear_field_error(world):
    client = client_for("on_team", world)
    response = client.post(f"{API}/patients/", {"mrn": "", "name": "N", "birth_date": "yesterday", "sex": "x"},
                           format="json")
    assert response.status_code == 400
    assert {"mrn", "birth_date", "sex"} <= set(response.data["errors"])


def test_moving_a_patient_to_a_foreign_team_is_refused(world):
    client = client_for("on_team", world)
    response = client.patch(f"{API}/patients/{world.patient.pk}/", {"care_team": world.other_team.pk}, format="json")
    assert response.status_code == 422 and "care_team" in response.data["errors"]
    world.patient.refresh_from_db()
    assert world.patient.care_team == world.team


# --- lesions ------------------------------------------------------------------------------------

def test_lesion_crud_and_filters(world):
    client = client_for("on_team", world)
    response = client.post(f"{API}/lesions/", {"patient": world.patient.pk, "label": "L-arm",
                                               "anatomic_site": "Upper extremity:Upper arm", "body_map_x": 0.2,
                                               "body_map_y": 0.4}, format="json")
    assert response.status_code == 201, response.data
    lesion_id = response.data["id"]
    assert response.data["anatomic_region"] == "Upper extremity"
    assert client.get(f"{API}/lesions/", {"anatomic_site": "Upper extremity:Upper arm"}).data["count"] == 1
    assert client.get(f"{API}/lesions/", {"anatomic_region": "Upper extremity"}).data["count"] == 1
    assert client.get(f"{API}/lesions/", {"patient": world.patient.pk}).data["count"] == 2
    diagnosis = "Benign:Benign melanocytic proliferations:Nevus"
    response = client.patch(f"{API}/lesions/{lesion_id}/", {"diagnosis": diagnosis, "notes": "stable"}, format="json")
    assert response.status_code == 200 and response.data["diagnosis"] == diagnosis
    assert response.data["is_melanoma"] is False


def test_lesion_cannot_be_moved_to_another_patient(world):
    other_patient = PatientFactory(care_team=world.team)
    client = client_for("on_team", world)
    response = client.patch(f"{API}/lesions/{world.lesion.pk}/", {"patient": other_patient.pk}, format="json")
    assert response.status_code == 422 and "cannot be moved" in response.data["errors"]["patient"][0]
    assert client.patch(f"{API}/lesions/{world.lesion.pk}/", {"patient": world.patient.pk, "notes": "n"},
                        format="json").status_code == 200
    world.lesion.refresh_from_db()
    assert world.lesion.patient == world.patient


def test_lesion_bad_body_map_and_site_are_field_errors(world):
    client = client_for("on_team", world)
    response = client.post(f"{API}/patients/{world.patient.pk}/lesions/",
                           {"label": "L", "body_map_x": 2, "anatomic_site": "Moon"}, format="json")
    assert response.status_code == 400 and {"body_map_x", "anatomic_site"} <= set(response.data["errors"])
    response = client.post(f"{API}/patients/{world.patient.pk}/lesions/", {"label": "L", "body_map_x": 0.5},
                           format="json")
    assert response.status_code == 422 and "body_map_y" in response.data["errors"]
    assert Lesion.objects.count() == 1


# --- images -------------------------------------------------------------------------------------

def test_image_representation(world):
    client = client_for("token", world)
    data = client.get(f"{API}/images/{world.image.pk}/").data
    for key in ("id", "lesion", "patient", "sha256", "width", "height", "size_bytes", "format", "image_type",
                "acquired_on", "uploaded_by", "uploaded_at", "file_url", "thumbnail_url", "analyses_url"):
        assert key in data
    assert data["patient"] == world.patient.pk and data["lesion"] == world.lesion.pk
    assert data["uploaded_by"] == world.clinician.username
    assert data["analyses_url"] == f"http://testserver/api/v1/images/{world.image.pk}/analyses/"
    assert data["file_url"] == f"http://testserver/api/v1/images/{world.image.pk}/file/"
    assert data["thumbnail_url"] == f"http://testserver/api/v1/images/{world.image.pk}/thumbnail/"


def test_upload_several_files_returns_created_flags_in_order(world):
    client = client_for("token", world)
    original = image_bytes(seed=1)  # the bytes uploaded in the fixture
    files = [uploaded(image_bytes(seed=21), "a.jpg"), uploaded(original, "dup.jpg"),
             uploaded(image_bytes(seed=22, fmt="PNG"), "b.png", "image/png")]
    response = client.post(f"{API}/images/", {"lesion": world.lesion.pk, "files": files,
                                              "image_type": "dermoscopic", "acquired_on": DAY}, format="multipart")
    assert response.status_code == 201, response.data
    assert [item["created"] for item in response.data] == [True, False, True]
    assert response.data[1]["id"] == world.image.pk
    assert response.data[2]["format"] == "PNG"
    assert LesionImage.objects.filter(lesion=world.lesion).count() == 3


def test_upload_accepts_a_single_file_field(world):
    client = client_for("on_team", world)
    response = client.post(f"{API}/lesions/{world.lesion.pk}/images/",
                           {"file": uploaded(image_bytes(seed=31)), "image_type": "overview", "acquired_on": DAY},
                           format="multipart")
    assert response.status_code == 201 and response.data[0]["image_type"] == "overview"


def test_upload_of_only_known_bytes_answers_200(world):
    client = client_for("on_team", world)
    response = client.post(f"{API}/lesions/{world.lesion.pk}/images/",
                           {"files": [uploaded(image_bytes(seed=1))], "image_type": "dermoscopic",
                            "acquired_on": DAY}, format="multipart")
    assert response.status_code == 200 and response.data[0]["created"] is False


def test_refused_files_are_field_errors_and_nothing_is_stored(world):
    client = client_for("on_team", world)
    files = [uploaded(image_bytes(seed=41), "fine.jpg"), uploaded(b"<html><body>hi</body></html>", "page.jpg"),
             uploaded(b"", "empty.jpg")]
    response = client.post(f"{API}/images/", {"lesion": world.lesion.pk, "files": files,
                                              "image_type": "dermoscopic", "acquired_on": DAY}, format="multipart")
    assert response.status_code == 422
    assert set(response.data["errors"]) == {"files"}
    assert any(m.startswith("page.jpg: not an image") for m in response.data["errors"]["files"])
    assert "empty.jpg: file is empty" in response.data["errors"]["files"]
    assert LesionImage.objects.count() == 1


@pytest.mark.parametrize("payload, field, status", [
    ({"image_type": "dermoscopic", "acquired_on": DAY}, "files", 422),  # either field may carry them
    ({"image_type": "xray", "acquired_on": DAY, "files": "x"}, "image_type", 400),  # outside the enum
    ({"image_type": "dermoscopic", "acquired_on": "soon", "files": "x"}, "acquired_on", 400),  # not a date
    ({"image_type": "dermoscopic", "acquired_on": "2999-01-01", "files": "x"}, "acquired_on", 422),  # future
])
def test_upload_field_errors(world, payload, field, status):
    client = client_for("on_team", world)
    if payload.get("files") == "x":
        payload = {**payload, "files": [uploaded(image_bytes(seed=51))]}
    response = client.post(f"{API}/lesions/{world.lesion.pk}/images/", payload, format="multipart")
    assert response.status_code == status and field in response.data["errors"], response.data
    assert LesionImage.objects.count() == 1


@pytest.mark.parametrize("csrf", [False, True])
def test_too_many_files_is_a_clear_field_error(world, settings, csrf):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3  # Django's own cap, hit while the request is parsed
    client = APIClient(enforce_csrf_checks=csrf)
    client.force_login(world.clinician)
    headers = {}
    if csrf:  # a browser session: the CSRF check reads the form before the view runs
        client.cookies["csrftoken"] = "a" * 32
        headers["HTTP_X_CSRFTOKEN"] = "a" * 32
    files = [uploaded(image_bytes(seed=70 + i), f"{i}.jpg") for i in range(4)]
    response = client.post(f"{API}/lesions/{world.lesion.pk}/images/",
                           {"files": files, "image_type": "dermoscopic", "acquired_on": DAY}, format="multipart",
                           **headers)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "files at once" in response.json()["errors"]["files"][0]
    assert LesionImage.objects.count() == 1


def test_upload_to_an_invisible_lesion_in_the_payload_does_not_leak(world):
    client = client_for("off_team", world)
    foreign = client.post(f"{API}/images/", upload_payload(world), format="multipart")
    missing = client.post(f"{API}/images/", {**upload_payload(world), "lesion": 999999}, format="multipart")
    assert foreign.status_code == missing.status_code == 422
    assert str(foreign.data["errors"]["lesion"][0]).replace(str(world.lesion.pk), "N") == \
        str(missing.data["errors"]["lesion"][0]).replace("999999", "N")


def test_image_filters(world):
    client = client_for("on_team", world)
    services.upload_images(user=world.clinician, lesion=world.lesion, files=[uploaded(image_bytes(seed=61))],
                           image_type="overview", acquired_on=datetime.date(2025, 3, 1))
    other_lesion = LesionFactory(patient=world.patient)
    assert client.get(f"{API}/images/", {"image_type": "overview"}).data["count"] == 1
    assert client.get(f"{API}/images/", {"acquired_on_after": "2025-02-01"}).data["count"] == 1
    assert client.get(f"{API}/images/", {"acquired_on_before": "2025-02-01"}).data["count"] == 1
    assert client.get(f"{API}/images/", {"patient": world.patient.pk}).data["count"] == 2
    assert client.get(f"{API}/images/", {"lesion": other_lesion.pk}).data["count"] == 0
    dates = [i["acquired_on"] for i in client.get(f"{API}/images/", {"ordering": "-acquired_on"}).data["results"]]
    assert dates == ["2025-03-01", "2025-01-02"]


def test_image_file_and_thumbnail_over_the_api(world):
    client = client_for("token", world)
    response = client.get(f"{API}/images/{world.image.pk}/file/", HTTP_ACCEPT="image/*")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/jpeg"
    assert b"".join(response.streaming_content)[:3] == b"\xff\xd8\xff"
    thumb = client.get(f"{API}/images/{world.image.pk}/thumbnail/")
    assert thumb.status_code == 200 and thumb["Content-Type"] == "image/jpeg"
    assert "private" in thumb["Cache-Control"] and thumb["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("accept", ["image/jpeg", "image/*", "*/*", "application/json"])
def test_image_file_content_negotiation(world, accept):
    client = client_for("token", world)
    response = client.get(f"{API}/images/{world.image.pk}/file/", HTTP_ACCEPT=accept)
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"


def test_deleting_an_image_removes_its_files(world, django_capture_on_commit_callbacks):
    storage = world.image.file.storage
    names = [world.image.file.name, world.image.thumbnail.name]
    client = client_for("on_team", world)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"{API}/images/{world.image.pk}/").status_code == 204
    assert not any(storage.exists(n) for n in names)


def test_staff_without_a_team_must_choose_one(world):
    lonely_staff = StaffFactory()
    client = APIClient()
    client.force_login(lonely_staff)
    response = client.post(f"{API}/patients/", {"mrn": "S-1", "name": "S", "birth_date": "1990-02-03"},
                           format="json")
    assert response.status_code == 422 and "care_team" in response.data["errors"]
    response = client.post(f"{API}/patients/", {"mrn": "S-1", "name": "S", "birth_date": "1990-02-03",
                                                "care_team": world.other_team.pk}, format="json")
    assert response.status_code == 201


def test_clinician_on_two_teams_sees_both(world):
    both = UserFactory()
    world.team.members.add(both)
    world.other_team.members.add(both)
    foreign = PatientFactory(care_team=world.other_team)
    client = APIClient()
    client.force_login(both)
    ids = {p["id"] for p in client.get(f"{API}/patients/").data["results"]}
    assert ids == {world.patient.pk, foreign.pk}
    third = CareTeamFactory()
    assert client.get(f"{API}/patients/", {"care_team": third.pk}).data["count"] == 0
