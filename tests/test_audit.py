"""Audit trail (django-auditlog): who created, changed, deleted or viewed which record, and when."""
import datetime

import pytest
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from patients import services
from patients.models import Lesion, LesionImage, Patient
from tests.factories import LesionFactory, image_bytes, uploaded

pytestmark = pytest.mark.django_db
A = LogEntry.Action



def entries(obj, action):
    return LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(obj), object_pk=str(obj.pk),
                                   action=action)


def token_client(user):
    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def image(clinician, patient):
    [o] = services.upload_images(user=clinician, lesion=LesionFactory(patient=patient),
                                 files=[uploaded(image_bytes(seed=5))], image_type="dermoscopic",
                                 acquired_on=datetime.date(2025, 1, 1))
    return o.image


def test_service_writes_carry_the_actor_outside_any_request(clinician, care_team):
    patient = services.create_patient(user=clinician, mrn="AUD-1", name="A", birth_date=datetime.date(1980, 1, 1))
    lesion = services.create_lesion(user=clinician, patient=patient, label="L1")
    services.update_lesion(user=clinician, lesion=lesion, data={"notes": "changed"})
    [o] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(image_bytes())],
                                 image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 1))
    assert entries(patient, A.CREATE).get().actor == clinician
    assert entries(lesion, A.CREATE).get().actor == clinician
    update = entries(lesion, A.UPDATE).get()
    assert update.actor == clinician and "notes" in update.changes_dict
    assert entries(o.image, A.CREATE).get().actor == clinician


def test_token_api_writes_carry_the_actor(clinician, patient):
    client = token_client(clinician)
    assert client.patch(f"/api/v1/patients/{patient.pk}/", {"name": "Renamed"}, format="json").status_code == 200
    entry = entries(patient, A.UPDATE).get()
    assert entry.actor == clinician and entry.actor_email == clinician.email
    assert entry.changes_dict["name"][1] == "Renamed"
    assert entry.remote_addr == "127.0.0.1"


def test_token_api_delete_carries_the_actor(clinician, image):
    pk = image.pk
    assert token_client(clinician).delete(f"/api/v1/images/{pk}/").status_code == 204
    entry = LogEntry.objects.get(content_type=ContentType.objects.get_for_model(LesionImage), object_pk=str(pk),
                                 action=A.DELETE)
    assert entry.actor == clinician


def test_record_access_writes_a_viewed_entry(clinician, patient):
    services.record_access(user=clinician, obj=patient)
    entry = entries(patient, A.ACCESS).get()
    assert entry.actor == clinician


def test_record_access_refuses_a_patient_the_user_cannot_see(other_clinician, other_team, patient):
    with pytest.raises(PermissionDenied):
        services.record_access(user=other_clinician, obj=patient)
    assert not entries(patient, A.ACCESS).exists()


@pytest.mark.parametrize("kind", ["patient", "lesion", "image"])
def test_api_retrieve_is_recorded_as_viewed(clinician, image, kind):
    obj = {"patient": image.lesion.patient, "lesion": image.lesion, "image": image}[kind]
    assert token_client(clinician).get(f"/api/v1/{kind}s/{obj.pk}/").status_code == 200
    assert entries(obj, A.ACCESS).get().actor == clinician


def test_api_lists_are_not_each_recorded(clinician, image):
    token_client(clinician).get("/api/v1/patients/")
    # one entry for the list read (tests/test_web_tier.py), none for the patient listed
    assert not entries(image.lesion.patient, A.ACCESS).exists()
    assert LogEntry.objects.filter(action=A.ACCESS).get().object_pk == ""


@pytest.mark.parametrize("url_name", ["patients:image_file", "patients:image_thumbnail"])
def test_media_fetch_is_recorded_as_viewed(client, clinician, image, url_name):
    client.force_login(clinician)
    assert client.get(reverse(url_name, args=[image.pk])).status_code == 200
    assert entries(image, A.ACCESS).get().actor == clinician


@pytest.mark.parametrize("kind", ["file", "thumbnail"])
def test_api_media_fetch_is_recorded_as_viewed(clinician, image, kind):
    assert token_client(clinician).get(f"/api/v1/images/{image.pk}/{kind}/").status_code == 200
    assert entries(image, A.ACCESS).get().actor == clinician


def test_refused_access_writes_no_entry(client, other_clinician, other_team, image):
    client.force_login(other_clinician)
    assert client.get(reverse("patients:image_file", args=[image.pk])).status_code == 404
    assert token_client(other_clinician).get(f"/api/v1/patients/{image.lesion.patient_id}/").status_code == 404
    assert not LogEntry.objects.filter(action=A.ACCESS).exists()


@pytest.mark.parametrize("url_name, kind", [("patients:patient_detail", "patient"),
                                            ("patients:lesion_detail", "lesion")])
def test_detail_pages_are_recorded_as_viewed(client, clinician, image, url_name, kind):
    obj = image.lesion.patient if kind == "patient" else image.lesion
    client.force_login(clinician)
    assert client.get(reverse(url_name, args=[obj.pk])).status_code == 200
    assert entries(obj, A.ACCESS).filter(actor=clinician).exists()


def test_care_team_membership_changes_are_logged(staff, care_team, other_clinician):
    care_team.members.add(other_clinician)
    assert LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(care_team),
                                   object_pk=str(care_team.pk)).exists()


def test_entries_survive_deletion_of_the_record(staff, patient):
    pk = patient.pk
    services.delete_patient(user=staff, patient=patient)
    assert not Patient.objects.filter(pk=pk).exists()
    entry = LogEntry.objects.get(content_type=ContentType.objects.get_for_model(Patient), object_pk=str(pk),
                                 action=A.DELETE)
    assert entry.actor == staff
    assert not Lesion.objects.filter(patient_id=pk).exists()
