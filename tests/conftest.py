import os
import time

import pytest
from django.test import TransactionTestCase

from tests.factories import CareTeamFactory, PatientFactory, StaffFactory, UserFactory

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _is_deadlock(exc: BaseException | None) -> bool:
    while exc is not None:
        if type(exc).__name__ == "DeadlockDetected" or "deadlock detected" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_flush = TransactionTestCase._fixture_teardown


def _flush_retrying_deadlocks(self):
    """A transactional test's teardown empties the tables with one TRUNCATE, which takes every
    table's exclusive lock in turn. A real worker process kept alive across tests (module-scoped)
    may commit at that moment, and its change-stamp trigger (patients/stamps.py) reads tables at
    commit time: PostgreSQL then picks one of the two as a deadlock victim. Production never
    truncates; here the flush (rolled back whole) is simply run again."""
    for attempt in range(5):
        try:
            return _flush(self)
        except Exception as exc:  # CommandError from OperationalError from DeadlockDetected
            if attempt == 4 or not _is_deadlock(exc):
                raise
            time.sleep(0.2 * (attempt + 1))


TransactionTestCase._fixture_teardown = _flush_retrying_deadlocks


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
