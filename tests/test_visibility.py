import pytest

from patients.models import Patient
from tests.factories import PatientFactory


@pytest.mark.django_db
def test_visible_to_limits_clinicians_to_their_care_team(clinician, other_clinician, staff, patient, other_team):
    foreign = PatientFactory(care_team=other_team)
    assert list(Patient.objects.visible_to(clinician)) == [patient]
    assert list(Patient.objects.visible_to(other_clinician)) == [foreign]
    assert set(Patient.objects.visible_to(staff)) == {patient, foreign}


@pytest.mark.django_db
def test_visible_to_hides_everything_from_anonymous_and_inactive(clinician, patient):
    from django.contrib.auth.models import AnonymousUser

    assert not Patient.objects.visible_to(AnonymousUser()).exists()
    clinician.is_active = False
    clinician.save()
    assert not Patient.objects.visible_to(clinician).exists()
