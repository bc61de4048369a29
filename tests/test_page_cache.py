"""Issue 13 (web tier): the worklist rows and the patient page are rendered once per change of the
records they show and served from the cache in between (patients.pagecache), under change stamps
the database keeps itself (patients.stamps). What must hold: every kind of write -- services, the
worker's bulk updates, plain queryset updates, raw SQL, deletes, a model version's change --
changes the stamp, so a cached page is never stale; a cached page is the same markup as a fresh
one; nothing of one user's page reaches another's; reads stay audited.

These tests commit (transactional database): the stamps are written when a transaction commits,
and the cache is not used inside one."""
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from auditlog.models import LogEntry
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from inference.models import Analysis, ModelVersion
from patients import pagecache, services, stamps
from patients.models import DataChange, Lesion, LesionImage, Patient
from tests.factories import CareTeamFactory, LesionFactory, PatientFactory, UserFactory
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _page_cache_on(settings):
    settings.PAGE_CACHE_SECONDS = 600


@pytest.fixture
def version(db):
    return ModelVersion.objects.create(
        name="cache-v1", architecture="se_resnet50", input_size=64, sha256="c" * 64, weights_path="x.pt",
        card={"members": []}, metrics={"roc_auc": 0.8}, threshold=0.3, is_active=True)


@pytest.fixture
def team():
    return CareTeamFactory(members=[UserFactory(username="dr_a"), UserFactory(username="dr_b")])


@pytest.fixture
def records(team, version):
    """A patient with one lesion, one image and a finished analysis scoring 12 %."""
    user = team.members.get(username="dr_a")
    patient = PatientFactory(care_team=team)
    lesion = LesionFactory(patient=patient)
    image = make_image(lesion, seed=3, user=user)
    analysis = Analysis.objects.create(image=image, model_version=version, status="done", probability=0.12,
                                       final_score=0.12, final_score_source="image", finished_at=timezone.now())
    return {"user": user, "patient": patient, "lesion": lesion, "image": image, "analysis": analysis}


def stamp_of(patient) -> tuple:
    return stamps.with_stamps(Patient.objects.filter(pk=patient.pk)).values_list("stamp", "global_stamp").get()


def logged_in(username) -> Client:
    from django.contrib.auth import get_user_model

    c = Client()
    c.force_login(get_user_model().objects.get(username=username))
    return c


def table(html: bytes) -> str:
    text = html.decode()
    return text[text.index("<table"):text.index("</table>")]


def content(html: bytes) -> str:
    text = html.decode()
    return text[text.index('<nav class="breadcrumbs"'):text.index("</main>")]


# --- stamps --------------------------------------------------------------------------------------

WRITES = {
    "lesion created by the service": lambda r: services.create_lesion(
        user=r["user"], patient=r["patient"], label="L9", anatomic_site="", notes="", diagnosis="",
        body_map_x=None, body_map_y=None),
    "lesion notes by queryset update": lambda r: Lesion.objects.filter(pk=r["lesion"].pk).update(notes="changed"),
    "image date by queryset update": lambda r: LesionImage.objects.filter(pk=r["image"].pk).update(
        acquired_on="2020-02-02"),
    "analysis score by bulk_update (the worker's context re-score)": lambda r: Analysis.objects.bulk_update(
        [Analysis(pk=r["analysis"].pk, final_score=0.9)], ["final_score"]),
    "analysis by raw SQL": lambda r: connection.cursor().execute(
        "UPDATE inference_analysis SET probability = 0.5 WHERE id = %s", [r["analysis"].pk]),
    "review recorded": lambda r: services.record_review(user=r["user"], lesion=r["lesion"], decision="monitor",
                                                        follow_up_months=3),
    "image deleted": lambda r: LesionImage.objects.filter(pk=r["image"].pk).delete(),
    "lesion deleted": lambda r: Lesion.objects.filter(pk=r["lesion"].pk).delete(),
    "patient renamed": lambda r: Patient.objects.filter(pk=r["patient"].pk).update(name="Renamed Person"),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_every_kind_of_write_changes_the_patient_stamp_and_no_other(write, records, team):
    other = PatientFactory(care_team=team)
    before, other_before = stamp_of(records["patient"]), stamp_of(other)
    WRITES[write](records)
    after = stamp_of(records["patient"])
    assert after[0] is not None and (before[0] is None or after[0] > before[0]), write
    assert stamp_of(other) == other_before


def test_a_model_version_change_changes_the_global_stamp(records, version):
    before = stamp_of(records["patient"])
    ModelVersion.objects.filter(pk=version.pk).update(validated=True)
    after = stamp_of(records["patient"])
    assert after[0] == before[0] and after[1] is not None and after[1] != before[1]


def test_a_transaction_stamps_when_it_commits_and_the_cache_is_not_used_inside_one(records):
    before = stamp_of(records["patient"])
    with transaction.atomic():
        Lesion.objects.filter(pk=records["lesion"].pk).update(notes="inside")
        assert not pagecache.usable()
        assert stamp_of(records["patient"]) == before  # deferred to the commit (PostgreSQL)
    assert pagecache.usable()
    assert stamp_of(records["patient"])[0] > before[0]


def test_compaction_keeps_only_the_newest_row_per_patient_and_every_stamp(records, team):
    other = PatientFactory(care_team=team)
    for i in range(3):
        Lesion.objects.filter(pk=records["lesion"].pk).update(notes=f"v{i}")
    ModelVersion.objects.update(validated=True)
    stamps_before = {p.pk: stamp_of(p) for p in (records["patient"], other)}
    n_before = DataChange.objects.count()
    removed = stamps.compact()
    assert removed > 0 and DataChange.objects.count() == n_before - removed
    assert {p.pk: stamp_of(p) for p in (records["patient"], other)} == stamps_before
    assert DataChange.objects.filter(patient_id=records["patient"].pk).count() == 1
    assert stamps.compact() == 0


# --- pages ---------------------------------------------------------------------------------------

def test_worklist_row_is_served_from_the_cache_until_its_patient_changes(records):
    c = logged_in("dr_a")
    first = c.get(reverse("patients:worklist"))
    assert "12%" in table(first.content)
    with CaptureQueriesContext(connection) as fresh:
        c.get(reverse("patients:worklist"))
    # cached: the lesions' results are not computed again
    assert not any("inference_analysis" in q["sql"] for q in fresh.captured_queries)
    # The worker writes a new score the way it does (a bulk update, no Python signal): the row changes.
    Analysis.objects.bulk_update([Analysis(pk=records["analysis"].pk, final_score=0.47)], ["final_score"])
    again = c.get(reverse("patients:worklist"))
    assert "47%" in table(again.content) and "12%" not in table(again.content)


def test_patient_page_shows_a_new_result_written_behind_the_services_back(records):
    c = logged_in("dr_a")
    url = reverse("patients:patient_detail", args=[records["patient"].pk])
    assert "12%" in content(c.get(url).content)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE inference_analysis SET final_score = 0.81 WHERE id = %s", [records["analysis"].pk])
    page = content(c.get(url).content)
    assert "81%" in page and "12%" not in page


def test_patient_page_names_a_model_version_change_at_once(records, version):
    c = logged_in("dr_a")
    url = reverse("patients:patient_detail", args=[records["patient"].pk])
    assert "not validated" in content(c.get(url).content).lower()
    ModelVersion.objects.filter(pk=version.pk).update(validated=True, name="cache-v1-validated")
    page = content(c.get(url).content)
    assert "cache-v1-validated" in page and "not validated" not in page.lower()


def test_cached_pages_are_the_same_markup_as_fresh_ones(records, settings):
    c = logged_in("dr_a")
    url = reverse("patients:patient_detail", args=[records["patient"].pk])
    c.get(url), c.get(reverse("patients:worklist"))  # fill the cache
    cached_page, cached_list = content(c.get(url).content), table(c.get(reverse("patients:worklist")).content)
    settings.PAGE_CACHE_SECONDS = 0
    assert content(c.get(url).content) == cached_page
    assert table(c.get(reverse("patients:worklist")).content) == cached_list


def test_a_page_cached_for_one_clinician_carries_nothing_of_theirs_to_another(records):
    a, b = logged_in("dr_a"), logged_in("dr_b")
    url = reverse("patients:patient_detail", args=[records["patient"].pk])
    page_a = a.get(url).content.decode()
    page_b = b.get(url).content.decode()
    assert content(page_a.encode()) == content(page_b.encode())  # one rendering, shared
    assert "dr_b" in page_b and "dr_a" not in page_b.replace(content(page_a.encode()), "")
    token_a = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page_a).group(1)
    assert token_a not in page_b


def test_a_cached_page_is_still_refused_to_another_team_and_still_audited(records):
    outsider = UserFactory(username="dr_elsewhere")
    CareTeamFactory(members=[outsider])
    url = reverse("patients:patient_detail", args=[records["patient"].pk])
    logged_in("dr_a").get(url)  # cached now
    assert logged_in("dr_elsewhere").get(url).status_code == 404
    before = LogEntry.objects.filter(action=LogEntry.Action.ACCESS, object_pk=str(records["patient"].pk)).count()
    assert logged_in("dr_b").get(url).status_code == 200
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS,
                                   object_pk=str(records["patient"].pk)).count() == before + 1


def test_stamps_work_on_the_embedded_sqlite_database(tmp_path):
    """The first-run default (SQLite): the same triggers, in SQLite's dialect, stamp every write."""
    script = """
import django, os
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from patients.models import CareTeam, Lesion, Patient
from patients.stamps import with_stamps
def stamp(p): return with_stamps(Patient.objects.filter(pk=p.pk)).values_list("stamp", flat=True).get()
p = Patient.objects.create(mrn="S1", name="S", birth_date="1970-01-01", sex="male",
                           care_team=CareTeam.objects.create(name="T"))
s0 = stamp(p); lesion = Lesion.objects.create(patient=p, label="L1"); s1 = stamp(p)
Lesion.objects.filter(pk=lesion.pk).update(notes="x"); s2 = stamp(p)
lesion.delete(); s3 = stamp(p)
assert s0 is not None and s0 < s1 < s2 < s3, (s0, s1, s2, s3)
print("ok", s0, s1, s2, s3)
"""
    env = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "VAR_DIR": str(tmp_path / "var"),
           "REDIS_URL": "", "NO_ALBUMENTATIONS_UPDATE": "1", "LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


# --- API lists -----------------------------------------------------------------------------------

API_LISTS = ["/api/v1/patients/", "/api/v1/lesions/", "/api/v1/images/", "/api/v1/analyses/"]


def api_client(username):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    c = APIClient()
    token, _ = Token.objects.get_or_create(user=get_user_model().objects.get(username=username))
    c.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return c


@pytest.mark.parametrize("url", API_LISTS)
def test_a_cached_api_list_is_the_same_json_and_still_audited(url, records, settings):
    c = api_client("dr_a")
    fresh = c.get(url)  # fills the cache
    with CaptureQueriesContext(connection) as hit:
        cached = c.get(url)
    assert cached.status_code == 200 and cached.content == fresh.content
    # the rows came from the cache: no query but the count and the stamps read the list's own table
    table_of = {"patients": "patients_patient", "lesions": "patients_lesion", "images": "patients_lesionimage",
                "analyses": "inference_analysis"}[url.rstrip("/").rsplit("/", 1)[1]]
    reads = [q["sql"] for q in hit.captured_queries if q["sql"].startswith("SELECT") and f'FROM "{table_of}"' in q["sql"]
             and "COUNT(" not in q["sql"] and "patients_datachange" not in q["sql"]]
    assert not reads, reads
    settings.PAGE_CACHE_SECONDS = 0
    assert c.get(url).content == fresh.content
    entries = LogEntry.objects.filter(action=LogEntry.Action.ACCESS, object_pk="",
                                      additional_data__list__startswith="api:").order_by("-pk")[:3]
    assert len({tuple(e.additional_data["shown"]) for e in entries}) == 1 and len(entries) == 3


def test_api_analyses_list_shows_a_score_the_worker_wrote_in_bulk(records):
    c = api_client("dr_a")
    assert c.get("/api/v1/analyses/").json()["results"][0]["score"] == pytest.approx(0.12)
    Analysis.objects.bulk_update([Analysis(pk=records["analysis"].pk, final_score=0.66)], ["final_score"])
    assert c.get("/api/v1/analyses/").json()["results"][0]["score"] == pytest.approx(0.66)


def test_a_patient_moved_to_another_team_leaves_the_cached_lists_at_once(records):
    c = api_client("dr_a")
    for url in API_LISTS:
        assert c.get(url).json()["count"] == 1
    elsewhere = CareTeamFactory()
    Patient.objects.filter(pk=records["patient"].pk).update(care_team=elsewhere)
    for url in API_LISTS:
        body = c.get(url).json()
        assert body["count"] == 0 and body["results"] == [], url


def test_a_clinician_taken_off_the_team_no_longer_gets_the_cached_lists(records, team):
    c = api_client("dr_b")
    assert c.get("/api/v1/analyses/").json()["count"] == 1
    team.members.remove(team.members.get(username="dr_b"))
    body = c.get("/api/v1/analyses/").json()
    assert body["count"] == 0 and body["results"] == []


def test_two_teams_never_share_a_cached_list(records, version):
    other_user = UserFactory(username="dr_other")
    other_team = CareTeamFactory(members=[other_user])
    other_patient = PatientFactory(care_team=other_team)
    mine, theirs = api_client("dr_a").get("/api/v1/patients/").json(), api_client("dr_other").get(
        "/api/v1/patients/").json()
    assert [p["id"] for p in mine["results"]] == [records["patient"].pk]
    assert [p["id"] for p in theirs["results"]] == [other_patient.pk]


def test_a_page_past_the_last_is_still_404_with_the_cache(records):
    c = api_client("dr_a")
    c.get("/api/v1/analyses/")
    assert c.get("/api/v1/analyses/?page=9").status_code == 404


# --- one build per key (pagecache.get_or_build) ----------------------------------------------------

def _in_threads(n, target):
    """Run ``target()`` in ``n`` threads started together; their results (each thread its own
    database connection, closed at the end)."""
    from django.db import connections

    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        try:
            barrier.wait(10)
            results[i] = target()
        except Exception as exc:  # noqa: BLE001 -- reported by the caller's assertion
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    return results


def test_concurrent_misses_of_one_api_list_build_it_once(records, monkeypatch):
    from inference.api.rows import AnalysisRows

    builds = []
    original = AnalysisRows.__call__

    def slow_counting_build(self, tuples):
        builds.append(1)
        time.sleep(0.3)  # long enough for every other request to arrive while it builds
        return original(self, tuples)

    monkeypatch.setattr(AnalysisRows, "__call__", slow_counting_build)
    Analysis.objects.filter(pk=records["analysis"].pk).update(final_score=0.41)  # a new key for the list
    user = records["user"]
    api_client("dr_a")  # the token, made before the threads

    def get():
        response = api_client(user.username).get("/api/v1/analyses/")
        return response.status_code, response.content

    answers = _in_threads(8, get)
    assert len(builds) == 1
    assert {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1 and b'"final_score":0.41' in answers[0][1]
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS,
                                   additional_data__list="api:analysis-list").count() == 8  # all audited


def test_a_failed_build_leaves_no_lock_behind():
    key = f"page:test-failed-build:{uuid.uuid4()}"  # the cache outlives the test

    def fail():
        raise RuntimeError("template error")

    with pytest.raises(RuntimeError):
        pagecache.get_or_build(key, fail)
    t0 = time.monotonic()
    assert pagecache.get_or_build(key, lambda: "built") == "built"
    assert time.monotonic() - t0 < 0.5  # built at once, not after waiting for the failed builder


def test_a_request_waits_for_a_builder_at_most_the_set_time_then_builds_itself(settings):
    from django.core.cache import caches

    settings.PAGE_CACHE_BUILD_WAIT = 0.3
    key = f"page:test-dead-builder:{uuid.uuid4()}"  # the cache outlives the test
    caches[settings.PAGE_CACHE_ALIAS].add(key + ":building", 1, timeout=5)  # a builder that died
    t0 = time.monotonic()
    assert pagecache.get_or_build(key, lambda: "built here") == "built here"
    assert 0.3 <= time.monotonic() - t0 < 2
    assert caches[settings.PAGE_CACHE_ALIAS].get(key) == "built here"


def test_a_waiting_request_gets_the_builders_value():
    key = f"page:test-shared-build:{uuid.uuid4()}"  # the cache outlives the test
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return f"value {len(calls)}"

    assert _in_threads(5, lambda: pagecache.get_or_build(key, build)) == ["value 1"] * 5
    assert len(calls) == 1
