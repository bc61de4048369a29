"""Django admin: lists, search, filters, inlines, read-only image data, no unvalidated uploads."""
import datetime

import pytest
from django.urls import reverse

from patients import services
from patients.models import LesionImage
from tests.factories import LesionFactory, image_bytes, uploaded

pytestmark = pytest.mark.django_db



@pytest.fixture
def image(clinician, patient):
    lesion = LesionFactory(patient=patient, label="L-admin")
    [o] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(image_bytes(seed=2))],
                                 image_type="dermoscopic", acquired_on=datetime.date(2025, 2, 3))
    return o.image


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.mark.parametrize("model", ["careteam", "patient", "lesion", "lesionimage"])
def test_changelists_render_with_search_and_filters(admin_client, image, model):
    url = reverse(f"admin:patients_{model}_changelist")
    assert admin_client.get(url).status_code == 200
    assert admin_client.get(url, {"q": "MRN"}).status_code == 200


def test_patient_search_and_filters(admin_client, image, patient):
    url = reverse("admin:patients_patient_changelist")
    response = admin_client.get(url, {"q": patient.mrn})
    assert patient.mrn in response.content.decode()
    response = admin_client.get(url, {"q": "nobody-has-this-name"})
    assert patient.mrn not in response.content.decode()
    for params in ({"sex__exact": "female"}, {"care_team__id__exact": patient.care_team_id},
                   {"fitzpatrick_skin_type__exact": "II"}):
        assert admin_client.get(url, params).status_code == 200


def test_patient_change_page_has_the_lesion_inline(admin_client, image, patient):
    response = admin_client.get(reverse("admin:patients_patient_change", args=[patient.pk]))
    assert response.status_code == 200
    assert "L-admin" in response.content.decode()


def test_lesion_change_page_shows_images_read_only_with_protected_thumbnail(admin_client, image):
    response = admin_client.get(reverse("admin:patients_lesion_change", args=[image.lesion_id]))
    html = response.content.decode()
    assert response.status_code == 200
    assert reverse("patients:image_thumbnail", args=[image.pk]) in html
    assert image.sha256 in html
    assert 'type="file"' not in html
    assert reverse("patients:lesion_detail", args=[image.lesion_id]) in html


def test_lesion_filters(admin_client, image):
    url = reverse("admin:patients_lesion_changelist")
    assert admin_client.get(url, {"anatomic_site__exact": "Trunk:Posterior trunk"}).status_code == 200
    assert admin_client.get(url, {"diagnosis__exact": ""}).status_code == 200


def test_image_admin_is_read_only_for_files_and_checksums(admin_client, image):
    response = admin_client.get(reverse("admin:patients_lesionimage_change", args=[image.pk]))
    html = response.content.decode()
    assert response.status_code == 200
    assert 'type="file"' not in html
    assert 'name="sha256"' not in html and 'name="size_bytes"' not in html and 'name="width"' not in html
    assert image.sha256 in html and image.upload_sha256 in html
    assert 'name="image_type"' in html and 'name="acquired_on"' in html


def test_image_checksum_cannot_be_changed_through_the_admin(admin_client, image):
    url = reverse("admin:patients_lesionimage_change", args=[image.pk])
    response = admin_client.post(url, {"image_type": "overview", "acquired_on": "2025-02-04",
                                       "sha256": "0" * 64, "size_bytes": 1, "lesion": 999})
    assert response.status_code == 302
    image.refresh_from_db()
    assert image.image_type == "overview" and image.sha256 != "0" * 64 and image.size_bytes > 1


def test_images_cannot_be_added_in_the_admin(admin_client, image):
    assert admin_client.get(reverse("admin:patients_lesionimage_add")).status_code == 403


def test_image_list_filters(admin_client, image):
    url = reverse("admin:patients_lesionimage_changelist")
    for params in ({"image_type__exact": "dermoscopic"}, {"acquired_on__gte": "2025-01-01"},
                   {"acquired_on__year": "2025"}):
        assert admin_client.get(url, params).status_code == 200


def test_deleting_an_image_in_the_admin_removes_its_files(admin_client, image, django_capture_on_commit_callbacks):
    storage = image.file.storage
    names = [image.file.name, image.thumbnail.name]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:patients_lesionimage_delete", args=[image.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not LesionImage.objects.exists()
    assert not any(storage.exists(n) for n in names)


def test_care_team_members_use_filter_horizontal(admin_client, care_team):
    html = admin_client.get(reverse("admin:patients_careteam_change", args=[care_team.pk])).content.decode()
    assert "selectfilter" in html.lower() or "SelectFilter" in html


def test_audit_log_is_visible_to_admins(admin_client, image):
    response = admin_client.get(reverse("admin:auditlog_logentry_changelist"))
    assert response.status_code == 200


def test_clinicians_cannot_use_the_admin(client, clinician):
    client.force_login(clinician)
    response = client.get(reverse("admin:patients_patient_changelist"))
    assert response.status_code == 302 and "login" in response["Location"]


# --- the admin goes through the services (issue 12) ----------------------------------------------

def _active_version():
    import uuid

    from inference.models import ModelVersion

    return ModelVersion.objects.create(name=f"v-{uuid.uuid4().hex[:8]}", architecture="se_resnet50", input_size=64,
                                       sha256=uuid.uuid4().hex * 2, weights_path="x.pt", is_active=True)


def _inline_management(prefix, total=0, initial=0):
    return {f"{prefix}-TOTAL_FORMS": str(total), f"{prefix}-INITIAL_FORMS": str(initial),
            f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"}


def test_adding_a_patient_in_the_admin_goes_through_the_service(admin_client, staff, care_team):
    from auditlog.models import LogEntry

    from patients.models import Patient

    data = {"mrn": "ADM-1", "name": "Admin Made", "birth_date": "1970-01-02", "sex": "female",
            "fitzpatrick_skin_type": "", "care_team": care_team.pk, **_inline_management("lesions")}
    response = admin_client.post(reverse("admin:patients_patient_add"), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    patient = Patient.objects.get(mrn="ADM-1")
    entry = LogEntry.objects.get_for_object(patient).get(action=LogEntry.Action.CREATE)
    assert entry.actor_id == staff.pk  # the service's audit entry, with the admin as actor
    # The service's rules are form errors here, never a server error.
    response = admin_client.post(reverse("admin:patients_patient_add"), {**data, "mrn": "ADM-2",
                                                                         "birth_date": "2999-01-01"})
    assert response.status_code == 200 and "cannot be in the future" in response.content.decode()


def test_a_site_change_in_the_patients_lesion_inline_queues_a_rescore(admin_client, image, patient,
                                                                      django_capture_on_commit_callbacks):
    from inference.models import PendingRescore

    version = _active_version()
    lesion = image.lesion
    data = {"mrn": patient.mrn, "name": patient.name, "birth_date": patient.birth_date.isoformat(),
            "sex": patient.sex, "fitzpatrick_skin_type": patient.fitzpatrick_skin_type,
            "care_team": patient.care_team_id, **_inline_management("lesions", 1, 1),
            "lesions-0-id": lesion.pk, "lesions-0-patient": patient.pk, "lesions-0-label": lesion.label,
            "lesions-0-anatomic_site": "Lower extremity:Thigh", "lesions-0-diagnosis": ""}
    with django_capture_on_commit_callbacks(execute=False):
        response = admin_client.post(reverse("admin:patients_patient_change", args=[patient.pk]), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    lesion.refresh_from_db()
    assert lesion.anatomic_site == "Lower extremity:Thigh"
    assert PendingRescore.objects.filter(patient=patient, model_version=version).exists()


def test_an_image_date_in_the_future_is_a_form_error_in_the_admin(admin_client, image):
    url = reverse("admin:patients_lesionimage_change", args=[image.pk])
    response = admin_client.post(url, {"image_type": "dermoscopic", "acquired_on": "2999-01-01"})
    assert response.status_code == 200 and "cannot be in the future" in response.content.decode()
    image.refresh_from_db()
    assert image.acquired_on == datetime.date(2025, 2, 3)


def test_an_image_date_change_in_the_admin_queues_a_rescore(admin_client, image, django_capture_on_commit_callbacks):
    from inference.models import PendingRescore

    _active_version()
    url = reverse("admin:patients_lesionimage_change", args=[image.pk])
    with django_capture_on_commit_callbacks(execute=False):
        response = admin_client.post(url, {"image_type": "dermoscopic", "acquired_on": "2025-02-01"})
    assert response.status_code == 302
    image.refresh_from_db()
    assert image.acquired_on == datetime.date(2025, 2, 1)
    assert PendingRescore.objects.filter(patient=image.lesion.patient).exists()
