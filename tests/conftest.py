import os

import pytest

from tests.factories import CareTeamFactory, PatientFactory, StaffFactory, UserFactory

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path):
    """Every test writes media and models into its own temporary folder, and hashes fast."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # API throttling stays on (the code path runs) but far above what any test sends; the
    # throttling tests set their own low rates.
    settings.API_THROTTLE_RATES = {"user": "100000/minute", "anon": "100000/minute"}
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MODEL_ROOT = tmp_path / "models"
    # A model loaded in the test process measures its runtime candidates briefly (as test workers do).
    settings.ANALYSIS_RUNTIME_BUDGET_S = 8
    # Tests do not run collectstatic: serve static files without the hashed manifest.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def clinician(db):
    return UserFactory(username="dr_on_team")


@pytest.fixture
def other_clinician(db):
    return UserFactory(username="dr_off_team")


@pytest.fixture
def staff(db):
    return StaffFactory(username="admin_user")


@pytest.fixture
def care_team(clinician):
    return CareTeamFactory(members=[clinician])


@pytest.fixture
def other_team(other_clinician):
    return CareTeamFactory(members=[other_clinician])


@pytest.fixture
def patient(care_team):
    return PatientFactory(care_team=care_team)
