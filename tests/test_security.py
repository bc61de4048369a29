"""Hardening of login, API and deployment (issue 12): login lockout (django-axes), API throttling,
the Content-Security-Policy header, the HTTPS production switch with a clean `check --deploy`, and
API answers that are never a 500 or an existence oracle."""
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from patients import services
from tests.factories import LesionFactory, PatientFactory, UserFactory, image_bytes, uploaded

API = "/api/v1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image(clinician, patient):
    lesion = LesionFactory(patient=patient)
    [outcome] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(image_bytes(seed=3))],
                                       image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2))
    return outcome.image


def token_client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


# --- format suffixes on the image file routes ---------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("route", ["file", "thumbnail"])
@pytest.mark.parametrize("suffix", [".json", ".api", ".jpeg", ".xyz"])
def test_image_file_routes_with_a_format_suffix_are_not_found_not_server_errors(clinician, image, route, suffix):
    response = token_client(clinician).get(f"{API}/images/{image.pk}/{route}{suffix}/")
    assert response.status_code == 404, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "not_found"



# --- login lockout (django-axes) ----------------------------------------------------------------

PASSWORD = "correct horse battery staple"


@pytest.fixture
def account(db):
    return UserFactory(username="locked_clinician", password=PASSWORD)


def login(client, username, password, *, admin=False, address="10.0.0.1"):
    url = reverse("admin:login") if admin else reverse("login")
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.django_db
def test_five_wrong_passwords_lock_the_account_with_a_clear_page_even_for_the_right_password(client, account, settings):
    assert settings.AXES_FAILURE_LIMIT == 5
    for _ in range(4):
        assert login(client, account.username, "wrong").status_code == 200  # the form again, with its error
    locked = login(client, account.username, "wrong")
    assert locked.status_code == 429
    page = locked.content.decode()
    assert "Login temporarily locked" in page and "15 minutes" in page and "administrator" in page
    right = login(client, account.username, PASSWORD)
    assert right.status_code == 429 and not logged_in(client)


@pytest.mark.django_db
def test_lockout_is_per_account_across_addresses(client, account):
    for n in range(5):
        login(client, account.username, "wrong", address=f"10.0.1.{n}")
    assert login(client, account.username, PASSWORD, address="10.0.2.1").status_code == 429
    assert not logged_in(client)


@pytest.mark.django_db
def test_lockout_is_per_address_across_accounts(client, account):
    for n in range(5):
        login(client, f"guess{n}", "wrong", address="10.0.3.3")
    assert login(client, account.username, PASSWORD, address="10.0.3.3").status_code == 429
    assert not logged_in(client)
    # The same account from another address is not locked: only that address is.
    assert login(client, account.username, PASSWORD, address="10.0.3.4").status_code == 302
    assert logged_in(client)


@pytest.mark.django_db
def test_a_forged_forwarded_for_header_does_not_escape_the_address_lockout(client, account):
    for n in range(5):
        client.post(reverse("login"), {"username": f"guess{n}", "password": "wrong"}, REMOTE_ADDR="10.0.4.4",
                    HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")
    response = client.post(reverse("login"), {"username": account.username, "password": PASSWORD},
                           REMOTE_ADDR="10.0.4.4", HTTP_X_FORWARDED_FOR="192.0.2.200")
    assert response.status_code == 429 and not logged_in(client)


@pytest.mark.django_db
def test_behind_one_trusted_proxy_each_client_address_is_counted_on_its_own(client, account, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    proxy = "10.0.5.1"
    for n in range(5):  # one client behind the proxy; what it forges on the left is ignored
        client.post(reverse("login"), {"username": f"guess{n}", "password": "wrong"}, REMOTE_ADDR=proxy,
                    HTTP_X_FORWARDED_FOR=f"198.51.100.{n}, 203.0.113.7")
    locked = client.post(reverse("login"), {"username": account.username, "password": PASSWORD},
                         REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert locked.status_code == 429
    other = client.post(reverse("login"), {"username": account.username, "password": PASSWORD},
                        REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR="203.0.113.8")
    assert other.status_code == 302 and logged_in(client)


@pytest.mark.django_db
def test_admin_login_is_locked_too_with_the_same_page(client, account):
    account.is_staff = True
    account.save()
    for _ in range(5):
        login(client, account.username, "wrong", admin=True)
    response = login(client, account.username, PASSWORD, admin=True)
    assert response.status_code == 429 and "Login temporarily locked" in response.content.decode()
    # And the site's login refuses the account as well.
    assert login(client, account.username, PASSWORD, address="10.9.9.9").status_code == 429


@pytest.mark.django_db
def test_fewer_failures_then_success_resets_the_count(client, account):
    for _ in range(4):
        login(client, account.username, "wrong")
    assert login(client, account.username, PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        login(client, account.username, "wrong")
    assert login(client, account.username, PASSWORD).status_code == 302


@pytest.mark.django_db
def test_lockout_ends_after_the_cool_off(client, account):
    for _ in range(5):
        login(client, account.username, "wrong")
    assert login(client, account.username, PASSWORD).status_code == 429
    # Age the recorded failures past the 15 minute cool-off instead of waiting for it.
    from django.utils import timezone
    AccessAttempt.objects.update(attempt_time=timezone.now() - datetime.timedelta(minutes=16))
    assert login(client, account.username, PASSWORD).status_code == 302


@pytest.mark.django_db
def test_staff_unlock_an_account_in_the_admin(client, account, staff):
    for _ in range(5):
        login(client, account.username, "wrong")
    assert login(client, account.username, PASSWORD).status_code == 429
    admin_client = type(client)()
    admin_client.force_login(staff)
    listing = admin_client.get(reverse("admin:axes_accessattempt_changelist"))
    assert listing.status_code == 200 and account.username in listing.content.decode()
    ids = list(AccessAttempt.objects.values_list("pk", flat=True))
    response = admin_client.post(reverse("admin:axes_accessattempt_changelist"),
                                 {"action": "delete_selected", "_selected_action": ids, "post": "yes"})
    assert response.status_code == 302
    assert not AccessAttempt.objects.exists()
    assert login(client, account.username, PASSWORD).status_code == 302


# --- API throttling -----------------------------------------------------------------------------

@pytest.fixture
def low_rates(settings):
    from django.core.cache import cache
    settings.API_THROTTLE_RATES = {"user": "3/minute", "anon": "2/minute"}
    yield settings.API_THROTTLE_RATES
    cache.delete_many([f"throttle_anon_{address}" for address in ("10.1.0.1", "10.1.0.2", "10.1.0.3")])


def assert_throttled(response):
    assert response.status_code == 429, response.content[:300]
    body = response.json()
    assert body["code"] == "throttled" and body["errors"] == {}
    assert int(response["Retry-After"]) > 0


@pytest.mark.django_db
def test_token_requests_over_the_user_rate_get_429_in_the_error_format(low_rates, clinician):
    from django.core.cache import cache
    cache.delete(f"throttle_user_{clinician.pk}")
    client = token_client(clinician)
    for _ in range(3):
        assert client.get(f"{API}/patients/").status_code == 200
    assert_throttled(client.get(f"{API}/patients/"))
    cache.delete(f"throttle_user_{clinician.pk}")


@pytest.mark.django_db
def test_requests_without_credentials_are_throttled_per_address(low_rates):
    client = APIClient()
    for _ in range(2):
        assert client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.1").status_code == 401
    assert_throttled(client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.1"))
    # Another address has its own count.
    assert client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.2").status_code == 401


@pytest.mark.django_db
def test_a_forged_forwarded_for_header_does_not_escape_the_anonymous_rate(low_rates):
    client = APIClient()
    for n in range(2):
        assert client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.1", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}").status_code == 401
    assert_throttled(client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.1", HTTP_X_FORWARDED_FOR="192.0.2.99"))


@pytest.mark.django_db
def test_wrong_tokens_are_throttled_per_address(low_rates):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    for _ in range(2):
        assert client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.3").status_code == 401
    assert_throttled(client.get(f"{API}/patients/", REMOTE_ADDR="10.1.0.3"))


@pytest.mark.django_db
def test_the_schema_documents_429(clinician):
    client = token_client(clinician)
    schema = client.get(f"{API}/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert "429" in schema["paths"]["/api/v1/patients/"]["get"]["responses"]


# --- Content-Security-Policy --------------------------------------------------------------------

@pytest.mark.django_db
def test_every_page_carries_a_strict_content_security_policy(client, clinician, patient):
    client.force_login(clinician)
    for url in [reverse("patients:worklist"), reverse("patients:patient_detail", args=[patient.pk])]:
        policy = client.get(url)["Content-Security-Policy"]
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    client.logout()
    assert "script-src 'self'" in client.get(reverse("login"))["Content-Security-Policy"]


@pytest.mark.django_db
def test_vendor_interfaces_may_use_inline_styles_but_never_inline_scripts(client, staff):
    client.force_login(staff)
    for url in [reverse("admin:index"), f"{API}/patients/?format=api"]:
        policy = client.get(url)["Content-Security-Policy"]
        assert "style-src 'self' 'unsafe-inline'" in policy and "script-src 'self';" in policy


TEMPLATE_DIRS = [ROOT / "templates"]


def test_no_template_has_inline_script_style_or_event_handler():
    import re
    offending = []
    pattern = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|\sstyle=|<style|\son[a-z]+=", re.I)
    for folder in TEMPLATE_DIRS:
        for path in folder.rglob("*.html"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offending == []


# --- the production switch ----------------------------------------------------------------------

def deploy_check(**extra):
    environment = {k: v for k, v in os.environ.items() if k not in {"HTTPS", "DEBUG", "SECURE_COOKIES"}}
    environment.update({
        "DEBUG": "false",
        "SECRET_KEY": "k3Q9-production-secret-from-the-environment-7fTz0wXbN2vLm8RcYp4sHd6",
        "ALLOWED_HOSTS": "records.example.org",
        "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
        **extra,
    })
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_in_the_documented_production_configuration():
    result = deploy_check(HTTPS="true")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout + result.stderr
    assert "WARNINGS" not in result.stdout + result.stderr


def test_without_the_https_switch_check_deploy_warns_about_each_setting_it_turns_on():
    result = deploy_check()
    output = result.stdout + result.stderr
    for warning in ["security.W004", "security.W008", "security.W012", "security.W016"]:
        assert warning in output


# --- audit of account and model-version changes -------------------------------------------------

def audit_entries(obj, action=None):
    from auditlog.models import LogEntry
    from django.contrib.contenttypes.models import ContentType

    qs = LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(obj), object_pk=str(obj.pk))
    return qs.filter(action=action) if action is not None else qs


@pytest.mark.django_db
def test_granting_staff_in_the_admin_is_audited_with_the_actor(client, staff, clinician):
    from auditlog.models import LogEntry

    client.force_login(staff)
    change = reverse("admin:auth_user_change", args=[clinician.pk])
    joined = clinician.date_joined
    response = client.post(change, {
        "username": clinician.username, "first_name": clinician.first_name, "last_name": clinician.last_name,
        "email": clinician.email, "is_active": "on", "is_staff": "on",
        "date_joined_0": joined.strftime("%Y-%m-%d"), "date_joined_1": joined.strftime("%H:%M:%S"),
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    entry = audit_entries(clinician, LogEntry.Action.UPDATE).get()
    assert entry.actor == staff
    assert entry.changes_dict["is_staff"] == ["False", "True"]
    assert "password" not in entry.changes_dict and "last_login" not in entry.changes_dict


@pytest.mark.django_db
def test_group_membership_and_superuser_changes_are_audited(clinician):
    from auditlog.models import LogEntry
    from django.contrib.auth.models import Group

    clinician.is_superuser = True
    clinician.save()
    clinician.groups.add(Group.objects.create(name="auditors"))
    changes = [e.changes_dict for e in audit_entries(clinician, LogEntry.Action.UPDATE).order_by("pk")]
    assert changes[0]["is_superuser"] == ["False", "True"]
    assert changes[1]["groups"]["objects"] == ["auditors"] and changes[1]["groups"]["operation"] == "add"


@pytest.mark.django_db
def test_logging_in_leaves_no_account_audit_entry(client):
    user = UserFactory(username="quiet_login", password=PASSWORD)
    before = audit_entries(user).count()
    assert login(client, user.username, PASSWORD).status_code == 302
    assert audit_entries(user).count() == before


@pytest.mark.django_db
def test_model_version_activation_in_the_admin_is_audited_for_both_versions(client, staff):
    from auditlog.models import LogEntry

    from tests.worker_utils import register_version

    checkpoint = ROOT / "models" / "demo-v2" / "model.pt"
    old = register_version(checkpoint, name="old", active=True)
    new = register_version(checkpoint, name="new", active=False, sha256="f" * 64)
    client.force_login(staff)
    response = client.post(reverse("admin:inference_modelversion_changelist"),
                           {"action": "activate", "_selected_action": [new.pk]})
    assert response.status_code == 302
    on = audit_entries(new, LogEntry.Action.UPDATE).get()
    off = audit_entries(old, LogEntry.Action.UPDATE).get()
    assert on.changes_dict["is_active"] == ["False", "True"] and on.actor == staff
    assert off.changes_dict["is_active"] == ["True", "False"] and off.actor == staff


@pytest.mark.django_db
def test_model_version_deactivation_by_the_service_is_audited_once():
    from auditlog.models import LogEntry

    from inference.services import deactivate_model_version
    from tests.worker_utils import register_version

    version = register_version(ROOT / "models" / "demo-v2" / "model.pt", name="solo", active=True)
    deactivate_model_version(model_version=version)
    deactivate_model_version(model_version=version)  # already inactive: nothing changes, no entry
    [entry] = audit_entries(version, LogEntry.Action.UPDATE)
    assert entry.changes_dict["is_active"] == ["True", "False"] and entry.actor is None


# --- id filters: no existence oracle, no dropdown of records ------------------------------------

ID_FILTERS = [
    ("analyses", "image"), ("analyses", "lesion"), ("analyses", "patient"), ("analyses", "model_version"),
    ("images", "lesion"), ("images", "patient"), ("lesions", "patient"), ("patients", "care_team"),
    ("reviews", "lesion"), ("reviews", "patient"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("collection,parameter", ID_FILTERS)
def test_a_foreign_id_in_a_filter_answers_exactly_like_an_unknown_one(clinician, other_clinician, other_team,
                                                                      image, collection, parameter):
    foreign_patient = PatientFactory(care_team=other_team)
    foreign_lesion = LesionFactory(patient=foreign_patient)
    [outcome] = services.upload_images(user=other_clinician, lesion=foreign_lesion,
                                       files=[uploaded(image_bytes(seed=9))], image_type="dermoscopic",
                                       acquired_on=datetime.date(2025, 1, 3))
    foreign = {"image": outcome.image.pk, "lesion": foreign_lesion.pk, "patient": foreign_patient.pk,
               "care_team": other_team.pk, "model_version": 987654}[parameter]
    client = token_client(clinician)
    seen = client.get(f"{API}/{collection}/?{parameter}={foreign}")
    unknown = client.get(f"{API}/{collection}/?{parameter}=99999999")
    assert seen.status_code == unknown.status_code == 200
    assert seen.json() == unknown.json() and seen.json()["count"] == 0


@pytest.mark.django_db
@pytest.mark.parametrize("collection", sorted({c for c, _ in ID_FILTERS}))
def test_the_browsable_api_filter_form_lists_no_records(client, clinician, other_clinician, other_team, image,
                                                        collection):
    foreign = PatientFactory(care_team=other_team, mrn="FOREIGN-MRN-1")
    LesionFactory(patient=foreign, label="foreign lesion label")
    client.force_login(clinician)
    page = client.get(f"{API}/{collection}/", HTTP_ACCEPT="text/html").content.decode()
    assert "FOREIGN-MRN-1" not in page and "foreign lesion label" not in page
    for _, parameter in (f for f in ID_FILTERS if f[0] == collection):
        assert f'<select name="{parameter}"' not in page and f'name="{parameter}"' in page


def test_no_api_filterset_uses_a_model_choice_filter():
    import django_filters

    from inference.api import views as inference_views
    from patients.api import filters as patient_filters
    from patients.api import views as patient_views

    filtersets = [obj for module in (inference_views, patient_filters, patient_views) for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, django_filters.FilterSet)]
    assert len(filtersets) >= 6
    for filterset in filtersets:
        for name, field in filterset.base_filters.items():
            assert not isinstance(field, django_filters.ModelChoiceFilter | django_filters.ModelMultipleChoiceFilter), \
                (filterset.__name__, name)
