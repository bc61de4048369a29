"""Web tier (issue 13): the pages and API lists run a number of SQL queries that does not grow with
the rows they show, and every list or search read is recorded in the audit trail as ONE entry per
request (issue 12's audit gap), never one per row."""
import datetime

import pytest
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from inference.models import Analysis, ModelVersion
from patients import services
from patients.models import Lesion, LesionImage, LesionReview, Patient
from tests.factories import CareTeamFactory, LesionFactory, PatientFactory
from tests.test_api_contract import LIST_URLS
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db
ACCESS = LogEntry.Action.ACCESS
API = "/api/v1"


@pytest.fixture
def active_version(db):
    return ModelVersion.objects.create(
        name="web-v1", architecture="se_resnet50", input_size=64, sha256="b" * 64, weights_path="x.pt",
        card={"members": []}, metrics={"roc_auc": 0.8, "per_source": {"a": {"roc_auc": 0.7}}}, threshold=0.3,
        context_model={"kind": "lesion", "feature_version": 0, "metrics": {"roc_auc_context": 0.8}},
        is_active=True)


def add_records(clinician, patient, version, *, lesions: int, images: int, review=True):
    """``lesions`` lesions of ``patient``, each with ``images`` analysed images (the newest flagged)
    and, when ``review``, a review with a follow-up due."""
    now = timezone.now()
    for i in range(lesions):
        lesion = LesionFactory(patient=patient, anatomic_site=["Trunk:Posterior trunk", "Head & neck:Face", ""][i % 3])
        for k in range(images):
            image = make_image(lesion, seed=1000 * lesion.pk + k, user=clinician)
            LesionImage.objects.filter(pk=image.pk).update(acquired_on=datetime.date(2024, 1 + k, 1))
            score = 0.6 if k == images - 1 else 0.1
            a = Analysis(image=image, model_version=version, status="done", probability=score, final_score=score,
                         final_score_source="context", context_features={"ud_distance": 0.3},
                         finished_at=now, context_updated_at=now)
            a.set_embedding([0.1] * 32)
            a.save()
        if review:
            services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=1)


def more_patients(clinician, care_team, version, n):
    for _ in range(n):
        add_records(clinician, PatientFactory(care_team=care_team), version, lesions=2, images=2)


def token_client(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def list_entries():
    return LogEntry.objects.filter(action=ACCESS, object_pk="")


# --------------------------------------------------------------------------- query counts

PAGES = {
    "worklist": lambda patient: reverse("patients:worklist"),
    "worklist search": lambda patient: reverse("patients:worklist") + "?q=Patient",
    "patient page": lambda patient: reverse("patients:patient_detail", args=[patient.pk]),
    "review queue": lambda patient: reverse("patients:review_queue"),
    "follow-ups": lambda patient: reverse("patients:follow_ups") + "?within=90",
}


@pytest.mark.parametrize("name", PAGES)
def test_page_queries_do_not_grow_with_patients_lesions_and_images(client, clinician, care_team, patient,
                                                                     active_version, name,
                                                                     django_assert_max_num_queries):
    client.force_login(clinician)
    add_records(clinician, patient, active_version, lesions=1, images=1)
    url = PAGES[name](patient)
    client.get(url)  # caches filled (content types, ...)
    with CaptureQueriesContext(connection) as small:
        assert client.get(url).status_code == 200
    # Four times the lesions and images for this patient, and more patients with theirs.
    add_records(clinician, patient, active_version, lesions=4, images=3)
    more_patients(clinician, care_team, active_version, 6)
    with django_assert_max_num_queries(len(small)):
        response = client.get(url)
    assert response.status_code == 200


def test_patient_page_shows_every_lesion_with_its_current_score(client, clinician, patient, active_version):
    add_records(clinician, patient, active_version, lesions=3, images=3, review=False)
    client.force_login(clinician)
    html = client.get(reverse("patients:patient_detail", args=[patient.pk])).content.decode()
    assert html.count("60%") >= 3  # each lesion's latest image (the flagged one) is its current score


def test_worklist_counts_lesions_and_images_and_shows_the_highest_current_score(client, clinician, patient,
                                                                                 active_version):
    add_records(clinician, patient, active_version, lesions=2, images=3)
    client.force_login(clinician)
    response = client.get(reverse("patients:worklist"))
    [row] = response.context["page"].object_list
    assert (row.n_lesions, row.n_images) == (2, 6)
    assert row.top_result.score == pytest.approx(0.6) and row.flagged
    assert row.n_unreviewed == 0  # reviewed after the results


# The API lists of the contract test (one definition of the list URLs), plus the reviews list.
API_LISTS = {**{k: v for k, v in LIST_URLS.items() if k != "model versions"},
             "reviews": lambda p, l, i: f"{API}/reviews/"}


@pytest.mark.parametrize("name", API_LISTS)
def test_api_list_queries_do_not_grow_with_rows(clinician, care_team, patient, active_version, name,
                                                django_assert_max_num_queries):
    api = token_client(clinician)
    add_records(clinician, patient, active_version, lesions=1, images=1)
    lesion = patient.lesions.get()
    image = lesion.images.get()
    url = API_LISTS[name](patient.pk, lesion.pk, image.pk)
    api.get(url)
    with CaptureQueriesContext(connection) as small:
        first = api.get(url)
    assert first.status_code == 200
    add_records(clinician, patient, active_version, lesions=4, images=3)
    more_patients(clinician, care_team, active_version, 4)
    for k in range(3):  # more images of the same lesion for the nested image list
        make_image(lesion, seed=50 + k, user=clinician)
    with django_assert_max_num_queries(len(small)):
        data = api.get(url).json()
    assert data["count"] >= first.json()["count"]


# --------------------------------------------------------------------------- list reads in the audit trail

def test_worklist_search_is_one_audit_entry_with_the_query_the_count_and_the_ids_shown(
        client, clinician, care_team, active_version, other_team):
    mine = [PatientFactory(care_team=care_team, name=f"Smith {i}") for i in range(3)]
    PatientFactory(care_team=care_team, name="Jones")
    PatientFactory(care_team=other_team, name="Smith of another team")
    client.force_login(clinician)
    assert client.get(reverse("patients:worklist"), {"q": "smith"}).status_code == 200
    entry = list_entries().get()
    assert entry.actor == clinician and entry.remote_addr == "127.0.0.1"
    assert entry.content_type == ContentType.objects.get_for_model(Patient)
    data = entry.additional_data
    assert data["list"] == "worklist" and data["query"] == {"q": "smith"} and data["count"] == 3
    assert sorted(data["shown"]) == sorted(p.pk for p in mine) == data["patients"]
    assert "search 'smith'" in entry.object_repr


def test_worklist_entry_names_only_the_page_shown(client, clinician, care_team):
    for i in range(30):
        PatientFactory(care_team=care_team)
    client.force_login(clinician)
    client.get(reverse("patients:worklist"), {"page": 2})
    data = list_entries().get().additional_data
    assert data["count"] == 30 and len(data["shown"]) == 5 and data["query"] == {"page": "2"}


@pytest.mark.parametrize("name", API_LISTS)
def test_api_list_read_is_one_audit_entry_per_request_not_one_per_row(clinician, care_team, patient, other_team,
                                                                       active_version, name):
    add_records(clinician, patient, active_version, lesions=3, images=2)
    add_records(clinician, PatientFactory(care_team=other_team), active_version, lesions=1, images=1, review=False)
    lesion = patient.lesions.first()
    image = lesion.images.first()
    before = set(list_entries().values_list("pk", flat=True))
    response = token_client(clinician).get(API_LISTS[name](patient.pk, lesion.pk, image.pk), {"page_size": 2})
    assert response.status_code == 200
    data = response.json()
    [entry] = list_entries().exclude(pk__in=before)
    assert entry.actor == clinician
    assert entry.additional_data["list"].startswith("api:")
    assert entry.additional_data["query"] == {"page_size": "2"}
    assert entry.additional_data["count"] == data["count"]
    assert entry.additional_data["shown"] == [row["id"] for row in data["results"]]
    assert entry.additional_data["patients"] == [patient.pk]  # never another team's


def test_api_search_and_filters_are_recorded(clinician, care_team, patient, active_version):
    add_records(clinician, patient, active_version, lesions=2, images=1)
    api = token_client(clinician)
    api.get(f"{API}/patients/", {"search": patient.mrn, "ordering": "name"})
    api.get(f"{API}/analyses/", {"flagged": "true", "patient": patient.pk})
    first, second = list_entries().order_by("timestamp", "pk")
    assert first.additional_data["query"] == {"search": patient.mrn, "ordering": "name"}
    assert first.additional_data["shown"] == [patient.pk]
    assert second.additional_data["query"] == {"flagged": "true", "patient": str(patient.pk)}
    flagged = Analysis.objects.filter(image__lesion__patient=patient, final_score__gte=0.3)
    assert sorted(second.additional_data["shown"]) == sorted(a.pk for a in flagged)


def test_a_refused_list_request_records_nothing(clinician, patient):
    assert token_client(clinician).get(f"{API}/patients/", {"no_such_filter": "1"}).status_code == 400
    assert not list_entries().exists()


def test_review_queue_and_follow_ups_are_recorded(client, clinician, patient, active_version):
    add_records(clinician, patient, active_version, lesions=2, images=1, review=False)
    lesion = patient.lesions.first()
    client.force_login(clinician)
    client.get(reverse("patients:review_queue"))
    services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=1)
    client.get(reverse("patients:follow_ups"), {"within": "60"})
    queue, follow_ups = list_entries().order_by("timestamp", "pk")
    assert queue.content_type == ContentType.objects.get_for_model(Lesion)
    assert queue.additional_data["list"] == "review queue"
    assert sorted(queue.additional_data["shown"]) == sorted(patient.lesions.values_list("pk", flat=True))
    assert follow_ups.content_type == ContentType.objects.get_for_model(LesionReview)
    assert follow_ups.additional_data["query"] == {"within": "60"}
    assert follow_ups.additional_data["shown"] == [LesionReview.objects.get(lesion=lesion).pk]
    assert follow_ups.additional_data["patients"] == [patient.pk]


def test_list_audit_is_one_insert_whatever_the_rows(clinician, care_team):
    PatientFactory.create_batch(40, care_team=care_team)
    with CaptureQueriesContext(connection) as ctx:
        services.record_list_access(user=clinician, model=Patient, listing="test", count=40,
                                    shown=Patient.objects.values_list("pk", flat=True))
    writes = [q["sql"] for q in ctx.captured_queries if not q["sql"].lstrip().upper().startswith("SELECT")]
    assert len(writes) == 1 and writes[0].startswith("INSERT INTO \"auditlog_logentry\"")


def test_list_audit_keeps_long_or_many_query_parameters_bounded(clinician):
    from django.http import QueryDict

    query = QueryDict(mutable=True)
    for i in range(50):
        query.setlist(f"p{i}", ["x" * 500, "y"])
    entry = services.record_list_access(user=clinician, model=Patient, listing="test", query=query, shown=[])
    params = entry.additional_data["query"]
    assert len(params) == services.LIST_QUERY_MAX_PARAMS
    assert params["p0"] == ["x" * services.LIST_QUERY_MAX_CHARS, "y"]


def test_list_audit_refuses_anonymous_users():
    from django.contrib.auth.models import AnonymousUser
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        services.record_list_access(user=AnonymousUser(), model=Patient, listing="test", shown=[])
    assert not list_entries().exists()


def test_visibility_rule_has_no_duplicates_for_a_member_of_several_teams(clinician, care_team):
    second = CareTeamFactory(members=[clinician])
    PatientFactory(care_team=care_team)
    PatientFactory(care_team=second)
    PatientFactory(care_team=CareTeamFactory())
    visible = Patient.objects.visible_to(clinician)
    assert visible.count() == 2 and len(list(visible)) == 2
    assert "DISTINCT" not in str(visible.query)
