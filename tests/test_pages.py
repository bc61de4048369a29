"""The clinician pages: rendering, access on every URL, the create → lesion → upload flow, search."""
import datetime
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from patients import services
from patients.models import Lesion, LesionImage, Patient
from tests.factories import LesionFactory, PatientFactory, image_bytes, uploaded

pytestmark = pytest.mark.django_db


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def lesion(patient):
    return LesionFactory(patient=patient, label="L1 upper back", notes="Stable for years.")


@pytest.fixture
def image(clinician, lesion):
    [outcome] = services.upload_images(
        user=clinician, lesion=lesion, files=[uploaded(image_bytes(seed=1), "first.jpg")],
        image_type=LesionImage.ImageType.DERMOSCOPIC, acquired_on=datetime.date(2024, 3, 1),
    )
    return outcome.image


@pytest.fixture
def objects(patient, lesion, image):
    return {"patient": patient, "lesion": lesion, "image": image}


@pytest.fixture
def on_team(client, clinician):
    client.force_login(clinician)
    return client


@pytest.fixture
def off_team(client, other_clinician, other_team):
    client.force_login(other_clinician)
    return client


def media_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# Every URL that names a patient, a lesion or an image: (url name, which object's pk).
OBJECT_URLS = [
    ("patients:patient_detail", "patient"),
    ("patients:patient_edit", "patient"),
    ("patients:lesion_create", "patient"),
    ("patients:lesion_detail", "lesion"),
    ("patients:lesion_edit", "lesion"),
    ("patients:image_upload", "lesion"),
    ("patients:image_file", "image"),
    ("patients:image_thumbnail", "image"),
    ("patients:image_viewer", "image"),
    ("patients:lesion_compare", "lesion"),
    ("patients:patient_report", "patient"),
    ("patients:lesion_report", "lesion"),
]
PAGE_URLS = [u for u in OBJECT_URLS if u[0] not in ("patients:image_file", "patients:image_thumbnail",
                                                     "patients:image_upload", "patients:patient_report",
                                                     "patients:lesion_report")]


def url_of(objects, name, kind):
    return reverse(name, args=[objects[kind].pk])


def snapshot():
    """Everything a POST could change, to prove that a refused one changed nothing."""
    return {
        "patients": sorted(Patient.objects.values_list("pk", "mrn", "name", "birth_date", "sex", "care_team_id")),
        "lesions": sorted(Lesion.objects.values_list("pk", "patient_id", "label", "anatomic_site", "notes",
                                                     "diagnosis", "body_map_x", "body_map_y")),
        "images": sorted(LesionImage.objects.values_list("pk", "lesion_id", "sha256", "acquired_on")),
        "media": sorted(str(p) for p in media_files()),
    }


# --- every page renders for the clinician on the team ---------------------------------------------

def test_worklist_lists_my_patients_with_counts(on_team, objects):
    patient = objects["patient"]
    response = on_team.get(reverse("patients:worklist"))
    assert response.status_code == 200
    html = response.content.decode()
    assert patient.mrn in html and patient.name in html
    assert reverse("patients:patient_detail", args=[patient.pk]) in html
    row = response.context["page"].object_list[0]
    assert (row.n_lesions, row.n_images) == (1, 1)
    assert row.age == patient.age_on(timezone.localdate())
    assert "Female" in html


def test_patient_page_shows_identity_lesions_and_thumbnails_only(on_team, objects, monkeypatch):
    seen = []
    monkeypatch.setattr(services, "record_access", lambda *, user, obj: seen.append((user, obj)))
    patient, lesion, image = objects["patient"], objects["lesion"], objects["image"]
    response = on_team.get(reverse("patients:patient_detail", args=[patient.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    for text in (patient.name, patient.mrn, "17 May 1970", patient.care_team.name, lesion.label, "Trunk",
                 "Posterior trunk", "Add lesion", "Edit patient"):
        assert text in html, text
    assert reverse("patients:image_thumbnail", args=[image.pk]) in html
    assert reverse("patients:image_file", args=[image.pk]) not in html  # thumbnails, never the full image
    assert reverse("patients:lesion_detail", args=[lesion.pk]) in html
    assert reverse("patients:lesion_create", args=[patient.pk]) in html
    assert seen == [(response.wsgi_request.user, patient)]  # audited as "viewed"


def test_patient_page_groups_lesions_by_region_then_site(on_team, patient):
    LesionFactory(patient=patient, label="Back A", anatomic_site="Trunk:Posterior trunk:Upper back")
    LesionFactory(patient=patient, label="Chest A", anatomic_site="Trunk:Anterior trunk")
    LesionFactory(patient=patient, label="Thigh A", anatomic_site="Lower extremity:Thigh")
    LesionFactory(patient=patient, label="Nowhere", anatomic_site="")
    response = on_team.get(reverse("patients:patient_detail", args=[patient.pk]))
    groups = response.context["lesion_groups"]
    assert [g["region"] for g in groups] == ["Lower extremity", "Trunk", "Site not recorded"]
    trunk = groups[1]
    assert [s["site"] for s in trunk["sites"]] == ["Anterior trunk", "Posterior trunk › Upper back"]
    html = response.content.decode()
    html = html[html.index('id="lesions-title"'):]  # the lesion list (the context partial lists them too)
    assert html.index("Lower extremity") < html.index("Thigh A") < html.index("Chest A") < html.index("Back A")


def test_patient_page_empty_state_offers_add_lesion(on_team, patient):
    html = on_team.get(reverse("patients:patient_detail", args=[patient.pk])).content.decode()
    assert "No lesions yet" in html and reverse("patients:lesion_create", args=[patient.pk]) in html


def test_lesion_page_shows_timeline_viewer_links_and_upload_form(on_team, objects, monkeypatch):
    seen = []
    monkeypatch.setattr(services, "record_access", lambda *, user, obj: seen.append(obj))
    lesion, image = objects["lesion"], objects["image"]
    later = services.upload_images(
        user=lesion.patient.care_team.members.first(), lesion=lesion,
        files=[uploaded(image_bytes(seed=2), "later.png")], image_type="clinical_close_up",
        acquired_on=datetime.date(2024, 9, 1),
    )[0].image
    response = on_team.get(reverse("patients:lesion_detail", args=[lesion.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    for text in (lesion.label, "Stable for years.", "Trunk › Posterior trunk", "1 Mar 2024", "1 Sep 2024",
                 "Dermoscopic", "Clinical close-up", 'enctype="multipart/form-data"', "drag and drop images"):
        assert text in html, text
    assert html.index("1 Mar 2024") < html.index("1 Sep 2024")  # date order
    for img in (image, later):
        assert reverse("patients:image_thumbnail", args=[img.pk]) in html
        # The thumbnail opens the in-app viewer (zoom, keyboard), which loads the protected file.
        assert reverse("patients:image_viewer", args=[img.pk]) in html
    assert re.search(r'<input type="file" name="files"[^>]*multiple', html)
    assert f'type="date" name="acquired_on" value="{timezone.localdate().isoformat()}"' in html
    assert "js/upload.js" in html
    assert reverse("patients:image_upload", args=[lesion.pk]) in html
    assert seen == [lesion]


def test_form_pages_render_with_labels_and_date_inputs(on_team, objects):
    patient, lesion = objects["patient"], objects["lesion"]
    html = on_team.get(reverse("patients:patient_create")).content.decode()
    assert "Medical record number" in html and 'type="date" name="birth_date"' in html
    assert patient.care_team.name in html
    html = on_team.get(reverse("patients:patient_edit", args=[patient.pk])).content.decode()
    assert f'value="{patient.name}"' in html and 'value="1970-05-17"' in html
    html = on_team.get(reverse("patients:lesion_create", args=[patient.pk])).content.decode()
    assert '<optgroup label="Trunk">' in html and "Position on the body map" in html
    html = on_team.get(reverse("patients:lesion_edit", args=[lesion.pk])).content.decode()
    assert '<option value="Trunk:Posterior trunk" selected>' in html
    assert "Final diagnosis" in html and '<optgroup label="Malignant">' in html


def test_media_urls_serve_images_to_the_team(on_team, objects):
    image = objects["image"]
    for name in ("patients:image_file", "patients:image_thumbnail"):
        response = on_team.get(reverse(name, args=[image.pk]))
        assert response.status_code == 200
        assert response["Content-Type"].startswith("image/")


# --- access: another clinician's patient is 404 everywhere; staff see all; anonymous log in -------

@pytest.mark.parametrize("name,kind", OBJECT_URLS, ids=[u[0].split(":")[1] for u in OBJECT_URLS])
def test_off_team_clinician_gets_404_on_every_get(off_team, objects, name, kind):
    assert off_team.get(url_of(objects, name, kind)).status_code == 404


def _post_cases(objects):
    patient, lesion = objects["patient"], objects["lesion"]
    return {
        "patient_edit": (reverse("patients:patient_edit", args=[patient.pk]), {
            "mrn": "HIJACK", "name": "Changed", "birth_date": "1980-01-01", "sex": "male",
            "fitzpatrick_skin_type": ""}),
        "lesion_create": (reverse("patients:lesion_create", args=[patient.pk]), {
            "label": "Planted", "anatomic_site": "Trunk", "notes": "", "diagnosis": ""}),
        "lesion_edit": (reverse("patients:lesion_edit", args=[lesion.pk]), {
            "label": "Changed", "anatomic_site": "Trunk", "notes": "changed", "diagnosis": "Benign"}),
        "image_upload": (reverse("patients:image_upload", args=[lesion.pk]), {
            "files": [uploaded(image_bytes(seed=9), "planted.jpg")], "image_type": "dermoscopic",
            "acquired_on": "2024-01-01"}),
    }


@pytest.mark.parametrize("case", ["patient_edit", "lesion_create", "lesion_edit", "image_upload"])
def test_off_team_clinician_gets_404_on_every_post_and_changes_nothing(off_team, objects, case):
    url, data = _post_cases(objects)[case]
    before = snapshot()
    response = off_team.post(url, data)
    assert response.status_code == 404
    assert snapshot() == before


def test_off_team_clinician_cannot_create_a_patient_on_another_team(off_team, objects):
    before = snapshot()
    response = off_team.post(reverse("patients:patient_create"), {
        "mrn": "X1", "name": "Planted", "birth_date": "1980-01-01", "sex": "female",
        "care_team": objects["patient"].care_team_id})
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert snapshot() == before


def test_off_team_worklist_does_not_list_or_find_the_patient(off_team, objects):
    patient = objects["patient"]
    for q in ("", patient.mrn, patient.name):
        response = off_team.get(reverse("patients:worklist"), {"q": q})
        assert list(response.context["page"].object_list) == []
        assert reverse("patients:patient_detail", args=[patient.pk]) not in response.content.decode()


@pytest.mark.parametrize("name,kind", OBJECT_URLS, ids=[u[0].split(":")[1] for u in OBJECT_URLS])
def test_staff_reach_every_url(client, staff, objects, name, kind):
    client.force_login(staff)
    response = client.get(url_of(objects, name, kind))
    expected = 302 if name == "patients:image_upload" else 200  # GET on the upload URL goes to the lesion
    assert response.status_code == expected


def test_staff_worklist_shows_every_team(client, staff, objects, other_team):
    foreign = PatientFactory(care_team=other_team)
    client.force_login(staff)
    html = client.get(reverse("patients:worklist")).content.decode()
    assert objects["patient"].mrn in html and foreign.mrn in html


@pytest.mark.parametrize("name,kind", [("patients:worklist", None), ("patients:patient_create", None),
                                       ("patients:review_queue", None), ("patients:follow_ups", None)] + OBJECT_URLS)
def test_anonymous_is_sent_to_login_on_every_url(client, objects, name, kind):
    url = reverse(name) if kind is None else url_of(objects, name, kind)
    for method in ("get", "post"):
        before = snapshot()
        response = getattr(client, method)(url)
        if method == "post" and name in ("patients:image_file", "patients:image_thumbnail"):
            assert response.status_code == 405  # media views answer GET/HEAD only
        else:
            assert response.status_code == 302, (method, url)
            assert response["Location"].startswith(reverse("login") + "?next=")
        assert snapshot() == before


def test_posts_need_the_csrf_token(clinician, objects):
    client = Client(enforce_csrf_checks=True)
    client.force_login(clinician)
    url, data = _post_cases(objects)["lesion_edit"]
    assert client.post(url, data).status_code == 403


def test_login_page_and_logout_button(client, clinician):
    html = client.get(reverse("login")).content.decode()
    assert 'name="username"' in html and 'name="password"' in html and "Log in" in html
    client.force_login(clinician)
    html = client.get(reverse("patients:worklist")).content.decode()
    assert re.search(r'<form method="post" action="%s"' % re.escape(reverse("logout")), html)
    assert "/api/v1/docs/" in html
    assert reverse("admin:index") not in html  # admin link for staff only
    assert "Decision support only. Scores come from the named model version; not a diagnosis." in html


def test_staff_get_the_admin_link(client, staff):
    client.force_login(staff)
    assert reverse("admin:index") in client.get(reverse("patients:worklist")).content.decode()


def test_pages_reference_no_external_url(on_team, objects):
    """The app must work on a network without internet: no CDN, no external asset."""
    urls = [reverse("patients:worklist"), reverse("patients:patient_create")] + [
        url_of(objects, name, kind) for name, kind in PAGE_URLS]
    for url in urls:
        html = on_team.get(url).content.decode()
        assert not re.search(r'(src|href|action)="(https?:)?//', html), url
    root = Path(settings.BASE_DIR)
    for asset in [root / "static/css/app.css", *sorted((root / "static/js").glob("*.js"))]:
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", asset.read_text()), asset


# --- the flow: create patient → lesion → upload three images at once ------------------------------

def test_create_patient_lesion_and_upload_three_images(on_team, care_team):
    response = on_team.post(reverse("patients:patient_create"), {
        "mrn": "MRN-777", "name": "Ada Example", "birth_date": "1961-02-03", "sex": "female",
        "fitzpatrick_skin_type": "II", "care_team": care_team.pk}, follow=True)
    patient = Patient.objects.get(mrn="MRN-777")
    assert response.redirect_chain[-1][0] == reverse("patients:patient_detail", args=[patient.pk])
    assert patient.care_team == care_team and patient.fitzpatrick_skin_type == "II"
    assert "Ada Example" in response.content.decode()

    response = on_team.post(reverse("patients:lesion_create", args=[patient.pk]), {
        "label": "L1 left shoulder", "anatomic_site": "Upper extremity:Shoulder", "notes": "Itchy.",
        "diagnosis": "", "body_map_x": "0.3", "body_map_y": "0.25"}, follow=True)
    lesion = patient.lesions.get()
    assert response.redirect_chain[-1][0] == reverse("patients:lesion_detail", args=[lesion.pk])
    assert (lesion.label, lesion.anatomic_site, lesion.body_map_x) == ("L1 left shoulder", "Upper extremity:Shoulder", 0.3)

    files = [uploaded(image_bytes(seed=s), f"img{s}.jpg") for s in (1, 2, 3)]
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": files, "image_type": "dermoscopic", "acquired_on": "2025-01-02"}, follow=True)
    assert response.status_code == 200
    html = response.content.decode()
    assert "3 images uploaded" in html
    images = list(lesion.images.all())
    assert len(images) == 3 and {i.acquired_on for i in images} == {datetime.date(2025, 1, 2)}
    for img in images:
        assert reverse("patients:image_thumbnail", args=[img.pk]) in html
    assert html.count('class="card image-card"') == 3

    html = on_team.get(reverse("patients:patient_detail", args=[patient.pk])).content.decode()
    for img in images:
        assert reverse("patients:image_thumbnail", args=[img.pk]) in html
    assert html.count('<li class="thumb">') == 3
    for img in images:
        response = on_team.get(reverse("patients:image_thumbnail", args=[img.pk]))
        assert response.status_code == 200 and response["Content-Type"].startswith("image/")

    # The same bytes again: the existing image, not a second copy.
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": [uploaded(image_bytes(seed=1), "again.jpg")], "image_type": "dermoscopic",
        "acquired_on": "2025-01-02"}, follow=True)
    assert "1 already stored" in response.content.decode()
    assert lesion.images.count() == 3


def test_a_bad_file_in_the_batch_is_named_and_nothing_is_stored(on_team, lesion):
    before = snapshot()
    files = [
        uploaded(image_bytes(seed=1), "good1.jpg"),
        uploaded(b"this is not an image at all", "notes.jpg"),
        uploaded(image_bytes(seed=2, fmt="PNG"), "good2.png", "image/png"),
    ]
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": files, "image_type": "dermoscopic", "acquired_on": "2025-01-02"})
    assert response.status_code == 200
    html = response.content.decode()
    errors = response.context["upload_form"].errors["files"]
    assert any(e.startswith("notes.jpg: ") for e in errors), errors
    assert not any(e.startswith("good1.jpg") for e in errors)
    assert "notes.jpg: " in html and "Nothing was stored" in html
    assert snapshot() == before
    assert lesion.images.count() == 0 and media_files() == []


def test_an_empty_file_is_refused_by_name(on_team, lesion):
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": [uploaded(b"", "empty.jpg")], "image_type": "dermoscopic", "acquired_on": "2025-01-02"})
    assert any(e.startswith("empty.jpg: ") for e in response.context["upload_form"].errors["files"])
    assert lesion.images.count() == 0


def test_upload_form_errors_without_files_or_with_a_future_date(on_team, lesion):
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "image_type": "dermoscopic", "acquired_on": "2025-01-02"})
    assert response.context["upload_form"].errors["files"] == ["Choose at least one image."]
    future = (timezone.localdate() + datetime.timedelta(days=3)).isoformat()
    response = on_team.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": [uploaded(image_bytes(), "a.jpg")], "image_type": "dermoscopic", "acquired_on": future})
    assert "acquired_on" in response.context["upload_form"].errors
    assert lesion.images.count() == 0


def test_edit_patient_and_lesion_notes_and_diagnosis(on_team, lesion):
    patient = lesion.patient
    response = on_team.post(reverse("patients:patient_edit", args=[patient.pk]), {
        "mrn": patient.mrn, "name": "Renamed Person", "birth_date": "1970-05-17", "sex": "female",
        "fitzpatrick_skin_type": "III"})
    assert response.status_code == 302
    patient.refresh_from_db()
    assert (patient.name, patient.fitzpatrick_skin_type) == ("Renamed Person", "III")

    melanoma = "Malignant:Malignant melanocytic proliferations (Melanoma)"
    response = on_team.post(reverse("patients:lesion_edit", args=[lesion.pk]), {
        "label": lesion.label, "anatomic_site": "Trunk:Posterior trunk:Upper back", "notes": "Excised 2025-01.",
        "diagnosis": melanoma, "body_map_x": "", "body_map_y": ""}, follow=True)
    lesion.refresh_from_db()
    assert (lesion.notes, lesion.diagnosis, lesion.anatomic_site) == (
        "Excised 2025-01.", melanoma, "Trunk:Posterior trunk:Upper back")
    assert "Lesion saved." in response.content.decode()
    assert "badge-alert" in response.content.decode()


def test_form_errors_are_shown(on_team, lesion):
    patient = lesion.patient
    other = PatientFactory(care_team=patient.care_team)
    response = on_team.post(reverse("patients:patient_edit", args=[patient.pk]), {
        "mrn": other.mrn, "name": "", "birth_date": "2999-01-01", "sex": "female"})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert {"mrn", "name", "birth_date"} <= set(errors)
    response = on_team.post(reverse("patients:lesion_edit", args=[lesion.pk]), {
        "label": "x", "anatomic_site": "Moon", "body_map_x": "1.5", "body_map_y": ""})
    errors = response.context["form"].errors
    assert {"anatomic_site", "body_map_x"} <= set(errors)
    patient.refresh_from_db()
    lesion.refresh_from_db()
    assert patient.mrn != other.mrn and lesion.anatomic_site == "Trunk:Posterior trunk"


def test_patient_create_rejects_a_duplicate_record_number(on_team, patient, care_team):
    response = on_team.post(reverse("patients:patient_create"), {
        "mrn": patient.mrn, "name": "Someone", "birth_date": "1980-01-01", "sex": "male",
        "care_team": care_team.pk})
    assert response.status_code == 200 and "mrn" in response.context["form"].errors
    assert Patient.objects.count() == 1


# --- worklist: search, order, empty state ---------------------------------------------------------

def test_worklist_search_by_record_number_or_name(on_team, care_team, other_team):
    PatientFactory(care_team=care_team, mrn="A-1001", name="Maria Garcia")
    PatientFactory(care_team=care_team, mrn="B-2002", name="John Smith")
    PatientFactory(care_team=other_team, mrn="A-1003", name="Maria Other")
    url = reverse("patients:worklist")

    def names(q):
        return [p.name for p in on_team.get(url, {"q": q}).context["page"].object_list]

    assert names("a-10") == ["Maria Garcia"]
    assert names("smith") == ["John Smith"]
    assert names("maria") == ["Maria Garcia"]  # the other team's Maria is never found
    assert sorted(names("")) == ["John Smith", "Maria Garcia"]
    html = on_team.get(url, {"q": "nobody"}).content.decode()
    assert "No patient matches" in html and "nobody" in html


def test_worklist_most_recently_active_first_and_paginated(on_team, care_team):
    now = timezone.now()
    for i in range(30):
        p = PatientFactory(care_team=care_team, mrn=f"P{i:03d}")
        Patient.objects.filter(pk=p.pk).update(last_activity_at=now - datetime.timedelta(hours=i))
    response = on_team.get(reverse("patients:worklist"))
    page = response.context["page"]
    assert [p.mrn for p in page.object_list][:3] == ["P000", "P001", "P002"]
    assert page.paginator.count == 30 and len(page.object_list) == 25
    second = on_team.get(reverse("patients:worklist"), {"page": 2}).context["page"]
    assert [p.mrn for p in second.object_list] == [f"P{i:03d}" for i in range(25, 30)]


def test_worklist_empty_state_has_a_call_to_action(on_team):
    html = on_team.get(reverse("patients:worklist")).content.decode()
    assert "No patients yet" in html and reverse("patients:patient_create") in html
