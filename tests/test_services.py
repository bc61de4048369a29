"""Services: models' business rules, permissions, activity ordering, uploads all-or-nothing."""
import datetime
import os

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError
from django.utils import timezone

from patients import services
from patients.models import Lesion, LesionImage, Patient
from patients.signals import images_stored
from patients.uploads import UploadRejected
from tests.factories import CareTeamFactory, LesionFactory, PatientFactory, UserFactory, image_bytes, uploaded

pytestmark = pytest.mark.django_db


TODAY = datetime.date(2026, 1, 15)


def media_files(settings):
    root = settings.MEDIA_ROOT
    if not os.path.isdir(root):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def upload(user, lesion, *files, image_type="dermoscopic", acquired_on=TODAY):
    return services.upload_images(user=user, lesion=lesion, files=list(files), image_type=image_type,
                                  acquired_on=acquired_on)


# --- models -------------------------------------------------------------------------------------

def test_patient_age_and_str(patient):
    assert patient.age_on(datetime.date(2026, 5, 16)) == 55
    assert patient.age_on(datetime.date(2026, 5, 17)) == 56
    assert patient.mrn in str(patient)


def test_lesion_region_and_melanoma_flag(patient):
    lesion = LesionFactory(patient=patient, anatomic_site="Trunk:Posterior trunk")
    assert lesion.anatomic_region == "Trunk"
    assert lesion.is_melanoma is None
    lesion.diagnosis = "Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma Invasive"
    assert lesion.is_melanoma is True


def test_same_upload_bytes_twice_per_lesion_is_refused_by_the_database(clinician, patient):
    lesion = LesionFactory(patient=patient)
    [outcome] = upload(clinician, lesion, uploaded(image_bytes()))
    clone = LesionImage(**{f.attname: getattr(outcome.image, f.attname)
                           for f in LesionImage._meta.concrete_fields if f.name != "id"})
    with pytest.raises(IntegrityError):
        clone.save()


# --- patients -----------------------------------------------------------------------------------

def test_create_patient_defaults_to_the_users_only_care_team(clinician, care_team):
    p = services.create_patient(user=clinician, mrn=" A-1 ", name="Ada Lovelace", birth_date=datetime.date(1980, 1, 2))
    assert p.care_team == care_team and p.mrn == "A-1" and p.sex == "unknown"


def test_create_patient_without_a_team_explains(clinician):
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2))
    assert "not a member of any care team" in e.value.message_dict["care_team"][0]


def test_create_patient_with_several_teams_requires_a_choice(clinician, care_team):
    CareTeamFactory(members=[clinician])
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2))
    assert "choose one" in e.value.message_dict["care_team"][0]


def test_create_patient_on_a_team_the_clinician_is_not_on_is_refused(clinician, care_team, other_team):
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2),
                                care_team=other_team)
    assert "member of" in e.value.message_dict["care_team"][0]
    assert not Patient.objects.exists()


def test_staff_may_choose_any_team(staff, other_team):
    p = services.create_patient(user=staff, mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2),
                                care_team=other_team.pk)
    assert p.care_team == other_team


def test_duplicate_mrn_is_a_field_error(clinician, patient):
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn=patient.mrn, name="X", birth_date=datetime.date(1980, 1, 2))
    assert e.value.message_dict["mrn"] == [services.DUPLICATE_MRN]


def test_invalid_choices_and_future_birth_date_are_field_errors(clinician, care_team):
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2),
                                sex="robot", fitzpatrick_skin_type="IX")
    assert {"sex", "fitzpatrick_skin_type"} <= set(e.value.message_dict)
    with pytest.raises(ValidationError) as e:
        services.create_patient(user=clinician, mrn="A-1", name="X",
                                birth_date=timezone.localdate() + datetime.timedelta(days=1))
    assert "future" in e.value.message_dict["birth_date"][0]


def test_anonymous_cannot_create(care_team):
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(PermissionDenied):
        services.create_patient(user=AnonymousUser(), mrn="A-1", name="X", birth_date=datetime.date(1980, 1, 2),
                                care_team=care_team)


def test_update_patient_changes_fields_and_bumps_activity(clinician, patient):
    before = patient.last_activity_at
    services.update_patient(user=clinician, patient=patient, data={"name": "New Name", "sex": "male"})
    patient.refresh_from_db()
    assert patient.name == "New Name" and patient.sex == "male"
    assert patient.last_activity_at > before


def test_update_patient_of_another_team_is_denied(other_clinician, other_team, patient):
    with pytest.raises(PermissionDenied):
        services.update_patient(user=other_clinician, patient=patient, data={"name": "Hacked"})
    patient.refresh_from_db()
    assert patient.name != "Hacked"


def test_update_patient_refuses_unknown_fields_and_foreign_team(clinician, patient, other_team):
    with pytest.raises(ValidationError):
        services.update_patient(user=clinician, patient=patient, data={"id": 5})
    with pytest.raises(ValidationError) as e:
        services.update_patient(user=clinician, patient=patient, data={"care_team": other_team})
    assert "care_team" in e.value.message_dict


def test_update_patient_duplicate_mrn(clinician, patient, care_team):
    other = PatientFactory(care_team=care_team)
    with pytest.raises(ValidationError) as e:
        services.update_patient(user=clinician, patient=other, data={"mrn": patient.mrn})
    assert e.value.message_dict["mrn"] == [services.DUPLICATE_MRN]


# --- lesions ------------------------------------------------------------------------------------

def test_create_lesion_bumps_activity_so_the_patient_heads_the_worklist(clinician, care_team):
    first = PatientFactory(care_team=care_team)
    second = PatientFactory(care_team=care_team)
    assert list(Patient.objects.visible_to(clinician))[0] == second
    services.create_lesion(user=clinician, patient=first, label="L1", anatomic_site="Trunk:Posterior trunk")
    assert list(Patient.objects.visible_to(clinician))[0] == first


def test_create_lesion_validates_site_diagnosis_and_body_map(clinician, patient):
    with pytest.raises(ValidationError) as e:
        services.create_lesion(user=clinician, patient=patient, label="L1", anatomic_site="Moon",
                               diagnosis="Bad", body_map_x=1.5, body_map_y=0.2)
    assert {"body_map_x"} <= set(e.value.message_dict)
    with pytest.raises(ValidationError) as e:
        services.create_lesion(user=clinician, patient=patient, label="L1", anatomic_site="Moon", diagnosis="Bad")
    assert {"anatomic_site", "diagnosis"} <= set(e.value.message_dict)
    with pytest.raises(ValidationError) as e:
        services.create_lesion(user=clinician, patient=patient, label="", body_map_x=0.5)
    assert "body_map_y" in e.value.message_dict
    assert not Lesion.objects.exists()


def test_create_lesion_on_foreign_patient_is_denied(other_clinician, other_team, patient):
    with pytest.raises(PermissionDenied):
        services.create_lesion(user=other_clinician, patient=patient, label="L1")
    assert not Lesion.objects.exists()


def test_update_lesion_sets_diagnosis_and_notes(clinician, patient):
    lesion = LesionFactory(patient=patient)
    services.update_lesion(user=clinician, lesion=lesion,
                           data={"notes": "Grew 2 mm", "diagnosis": "Benign:Benign melanocytic proliferations:Nevus"})
    lesion.refresh_from_db()
    assert lesion.notes == "Grew 2 mm" and lesion.diagnosis.startswith("Benign")


def test_update_lesion_cannot_move_it_to_another_patient(clinician, patient):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(ValidationError):
        services.update_lesion(user=clinician, lesion=lesion, data={"patient": PatientFactory()})


def test_update_lesion_of_foreign_patient_is_denied(other_clinician, other_team, patient):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(PermissionDenied):
        services.update_lesion(user=other_clinician, lesion=lesion, data={"notes": "x"})


# --- uploads ------------------------------------------------------------------------------------

def test_upload_three_images_stores_rows_files_and_thumbnails(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)
    before = Patient.objects.get(pk=patient.pk).last_activity_at
    outcomes = upload(clinician, lesion, *(uploaded(image_bytes(seed=i), name=f"p{i}.jpg") for i in range(3)))
    assert [o.created for o in outcomes] == [True, True, True]
    image = outcomes[0].image
    assert image.uploaded_by == clinician and image.format == "JPEG" and (image.width, image.height) == (320, 240)
    assert image.size_bytes == image.file.size and len(image.sha256) == 64
    assert "p0" not in image.file.name and image.file.name.startswith("images/")
    assert len(media_files(settings)) == 6
    assert Patient.objects.get(pk=patient.pk).last_activity_at > before


def test_same_bytes_again_give_the_existing_image_back(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)
    data = image_bytes(seed=4)
    [first] = upload(clinician, lesion, uploaded(data, name="a.jpg"))
    again = upload(clinician, lesion, uploaded(data, name="renamed.jpg"), uploaded(data, name="twice.jpg"))
    assert [(o.image.pk, o.created) for o in again] == [(first.image.pk, False), (first.image.pk, False)]
    assert LesionImage.objects.count() == 1 and len(media_files(settings)) == 2


def test_same_bytes_within_one_batch_are_stored_once(clinician, patient):
    lesion = LesionFactory(patient=patient)
    data = image_bytes(seed=5)
    outcomes = upload(clinician, lesion, uploaded(data, name="a.jpg"), uploaded(data, name="a.jpg"))
    assert [o.created for o in outcomes] == [True, False]
    assert outcomes[0].image.pk == outcomes[1].image.pk


def test_same_bytes_on_another_lesion_is_a_new_image(clinician, patient):
    data = image_bytes(seed=6)
    [a] = upload(clinician, LesionFactory(patient=patient), uploaded(data))
    [b] = upload(clinician, LesionFactory(patient=patient), uploaded(data))
    assert b.created and a.image.pk != b.image.pk


def test_one_refused_file_in_a_batch_of_three_stores_nothing(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)
    files = [uploaded(image_bytes(seed=1), "good1.jpg"), uploaded(b"hello", "notes.jpg"),
             uploaded(image_bytes(seed=2), "good2.jpg")]
    with pytest.raises(UploadRejected) as e:
        upload(clinician, lesion, *files)
    assert list(e.value.message_dict) == ["notes.jpg"]
    assert "not an image" in e.value.message_dict["notes.jpg"][0]
    assert not LesionImage.objects.exists() and media_files(settings) == []


def test_every_refused_file_is_named(clinician, patient):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(UploadRejected) as e:
        upload(clinician, lesion, uploaded(b"", "empty.png"), uploaded(b"x", "x.png"), uploaded(b"x", "x.png"))
    assert set(e.value.message_dict) == {"empty.png", "x.png", "x.png (2)"}


def test_database_error_after_the_file_write_leaves_no_file(clinician, patient, settings, monkeypatch):
    lesion = LesionFactory(patient=patient)
    real_save = LesionImage.save
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(self.file.name)
        assert self.file.storage.exists(self.file.name)  # the file really was written first
        if len(calls) == 2:
            raise IntegrityError("forced")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(LesionImage, "save", failing_save)
    with pytest.raises(IntegrityError):
        upload(clinician, lesion, uploaded(image_bytes(seed=1)), uploaded(image_bytes(seed=2)))
    assert len(calls) == 2
    assert not LesionImage.objects.exists()
    assert media_files(settings) == []


def test_failing_signal_receiver_rolls_back_rows_and_files(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)

    def boom(**kwargs):
        raise RuntimeError("receiver failed")

    images_stored.connect(boom, dispatch_uid="test-boom")
    try:
        with pytest.raises(RuntimeError):
            upload(clinician, lesion, uploaded(image_bytes()))
    finally:
        images_stored.disconnect(dispatch_uid="test-boom")
    assert not LesionImage.objects.exists() and media_files(settings) == []


def test_images_stored_is_sent_inside_the_transaction_with_only_new_images(clinician, patient, django_capture_on_commit_callbacks):
    lesion = LesionFactory(patient=patient)
    seen = []

    def receiver(sender, images, **kwargs):
        from django.db import transaction

        seen.append((sender, [i.pk for i in images], transaction.get_connection().in_atomic_block))

    images_stored.connect(receiver, dispatch_uid="test-recv")
    try:
        [a] = upload(clinician, lesion, uploaded(image_bytes(seed=1)))
        outcomes = upload(clinician, lesion, uploaded(image_bytes(seed=1)), uploaded(image_bytes(seed=2)))
        upload(clinician, lesion, uploaded(image_bytes(seed=2)))  # nothing new: no signal
    finally:
        images_stored.disconnect(dispatch_uid="test-recv")
    assert seen == [(LesionImage, [a.image.pk], True), (LesionImage, [outcomes[1].image.pk], True)]


def test_upload_to_a_foreign_lesion_is_denied_and_stores_nothing(other_clinician, other_team, patient, settings):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(PermissionDenied):
        upload(other_clinician, lesion, uploaded(image_bytes()))
    assert not LesionImage.objects.exists() and media_files(settings) == []


@pytest.mark.parametrize("field, kwargs", [
    ("image_type", {"image_type": "xray"}),
    ("acquired_on", {"acquired_on": timezone.localdate() + datetime.timedelta(days=2)}),
    ("acquired_on", {"acquired_on": "2024-01-01"}),
])
def test_upload_field_errors(clinician, patient, field, kwargs):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(ValidationError) as e:
        upload(clinician, lesion, uploaded(image_bytes()), **kwargs)
    assert field in e.value.message_dict
    assert not LesionImage.objects.exists()


def test_upload_with_no_files_or_too_many(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(ValidationError) as e:
        upload(clinician, lesion)
    assert "files" in e.value.message_dict
    settings.UPLOAD_MAX_FILES = 2
    with pytest.raises(ValidationError) as e:
        upload(clinician, lesion, *(uploaded(image_bytes(seed=i)) for i in range(3)))
    assert "At most 2" in e.value.message_dict["files"][0]


def test_delete_image_removes_row_and_files_after_commit(clinician, patient, settings, django_capture_on_commit_callbacks):
    lesion = LesionFactory(patient=patient)
    [o] = upload(clinician, lesion, uploaded(image_bytes()))
    with django_capture_on_commit_callbacks(execute=True):
        services.delete_image(user=clinician, image=o.image)
    assert not LesionImage.objects.exists() and media_files(settings) == []


def test_delete_image_of_foreign_patient_is_denied(clinician, other_clinician, other_team, patient):
    lesion = LesionFactory(patient=patient)
    [o] = upload(clinician, lesion, uploaded(image_bytes()))
    with pytest.raises(PermissionDenied):
        services.delete_image(user=other_clinician, image=o.image)
    assert LesionImage.objects.filter(pk=o.image.pk).exists()


def test_orphan_files_are_found_and_purged(clinician, patient, settings):
    lesion = LesionFactory(patient=patient)
    [o] = upload(clinician, lesion, uploaded(image_bytes()))
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    stray = default_storage.save("images/stray.png", ContentFile(b"x"))
    assert services.orphan_media_files(older_than=datetime.timedelta(hours=1)) == []  # too new
    assert services.orphan_media_files(older_than=datetime.timedelta(seconds=-1)) == [stray]
    assert services.purge_orphan_media_files(older_than=datetime.timedelta(seconds=-1)) == 1
    assert default_storage.exists(o.image.file.name) and not default_storage.exists(stray)


def test_uploads_by_another_user_on_the_team_work(patient, care_team):
    colleague = UserFactory()
    care_team.members.add(colleague)
    [o] = upload(colleague, LesionFactory(patient=patient), uploaded(image_bytes()))
    assert o.created and o.image.uploaded_by == colleague


@pytest.mark.django_db
def test_purge_orphan_media_command_deletes_only_unreferenced_old_files(settings, tmp_path):
    import os
    import time

    from django.core.management import call_command

    images = settings.MEDIA_ROOT / "images"
    images.mkdir(parents=True, exist_ok=True)
    orphan = images / "orphan.jpg"
    orphan.write_bytes(b"x")
    fresh = images / "fresh.jpg"
    fresh.write_bytes(b"y")
    old = time.time() - 3 * 3600
    os.utime(orphan, (old, old))
    call_command("purge_orphan_media", "--hours", "1")
    assert not orphan.exists()
    assert fresh.exists()
