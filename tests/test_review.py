"""The clinician's day: the flag rule, review decisions, the To-review queue, the worklist's score
column, follow-ups, the viewer and comparison pages, the REST API and admin for reviews."""
import datetime

import pytest
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from inference import scoring
from inference.models import Analysis, ModelVersion
from patients import selectors, services
from patients.models import LesionReview, add_months
from tests.factories import LesionFactory, PatientFactory
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db


def version(**kw):
    fields = dict(name="demo-v7", architecture="se_resnet50", input_size=64, sha256="b" * 64, weights_path="x.pt",
                  metrics={"roc_auc": 0.76, "roc_auc_ci95": [0.74, 0.78], "sensitivity": 0.9}, threshold=0.4,
                  validated=False, is_active=True)
    fields.update(kw)
    return ModelVersion.objects.create(**fields)


def scored(lesion, v, p, *, day=datetime.date(2025, 1, 1), seed=None, finished=None, final=None, source="image"):
    """An image of ``lesion`` taken on ``day`` with a finished analysis of probability ``p``."""
    image = make_image(lesion, seed=seed if seed is not None else int(p * 1000) + lesion.pk * 7 + day.toordinal())
    image.acquired_on = day
    image.save(update_fields=["acquired_on"])
    Analysis.objects.create(image=image, model_version=v, status="done", probability=p,
                            final_score=final if final is not None else p, final_score_source=source,
                            finished_at=finished or timezone.now())
    return image


@pytest.fixture
def v():
    return version()


@pytest.fixture
def on_team(client, clinician):
    client.force_login(clinician)
    return client


# --- the flag rule --------------------------------------------------------------------------------

def test_is_flagged_compares_the_score_shown_with_its_threshold(patient, v):
    image = make_image(LesionFactory(patient=patient))
    a = Analysis(image=image, model_version=v, status="done", probability=0.39, final_score=0.39,
                 final_score_source="image")
    assert not scoring.is_flagged(a)
    a.final_score = a.probability = 0.40
    assert scoring.is_flagged(a)  # at the threshold counts
    a.status = "running"
    assert not scoring.is_flagged(a)


def test_context_scores_share_the_versions_one_threshold(patient):
    v = version()
    a = Analysis(image=make_image(LesionFactory(patient=patient)), model_version=v, status="done",
                 probability=0.1, final_score=0.25, final_score_source="context")
    # one scale, one threshold (issue 10): a context score is compared with the version's threshold
    assert scoring.threshold_for(a) == v.threshold and scoring.is_flagged(a) == (0.25 >= v.threshold)


def test_a_lesions_current_result_is_its_latest_image(patient, v):
    lesion = LesionFactory(patient=patient)
    scored(lesion, v, 0.9, day=datetime.date(2024, 1, 1))
    latest = scored(lesion, v, 0.1, day=datetime.date(2025, 6, 1))
    result = scoring.lesion_results([lesion.pk])[lesion.pk]
    assert result.image_id == latest.pk and result.score == 0.1 and not result.flagged
    assert result.version == v


def test_only_the_active_versions_results_count(patient, v):
    lesion = LesionFactory(patient=patient)
    scored(lesion, v, 0.9)
    v.is_active = False
    v.save()
    assert scoring.lesion_results([lesion.pk]) == {}


# --- review decisions -----------------------------------------------------------------------------

def test_record_review_sets_the_due_date_and_snapshots_the_result(clinician, patient, v):
    lesion = LesionFactory(patient=patient)
    image = scored(lesion, v, 0.55)
    review = services.record_review(user=clinician, lesion=lesion, decision="monitor", note=" Recheck. ",
                                    follow_up_months=3)
    assert review.follow_up_due == add_months(timezone.localdate(), 3)
    assert review.note == "Recheck."
    assert review.result_snapshot["image"] == image.pk and review.result_snapshot["model_version"] == "demo-v7"
    assert review.result_snapshot["flagged"] is True and review.is_current


def test_a_later_review_supersedes_and_history_is_kept(clinician, patient):
    lesion = LesionFactory(patient=patient)
    first = services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=6)
    second = services.record_review(user=clinician, lesion=lesion, decision="excise", note="Changed shape")
    first.refresh_from_db()
    assert second.supersedes == first and not first.is_current and second.is_current
    assert list(LesionReview.objects.filter(lesion=lesion).current()) == [second]
    assert LesionReview.objects.filter(lesion=lesion).count() == 2


def test_reviews_cannot_be_edited(clinician, patient):
    review = services.record_review(user=clinician, lesion=LesionFactory(patient=patient), decision="reassure")
    review.note = "rewritten history"
    with pytest.raises(ValueError, match="append-only"):
        review.save()


@pytest.mark.parametrize("kwargs,field", [
    ({"decision": "biopsy-maybe"}, "decision"),
    ({"decision": "monitor", "follow_up_months": 0}, "follow_up_months"),
    ({"decision": "monitor", "follow_up_months": 61}, "follow_up_months"),
    ({"decision": "monitor", "follow_up_months": "soon"}, "follow_up_months"),
])
def test_bad_review_input_is_refused_and_nothing_is_stored(clinician, patient, kwargs, field):
    lesion = LesionFactory(patient=patient)
    with pytest.raises(ValidationError) as exc:
        services.record_review(user=clinician, lesion=lesion, **kwargs)
    assert field in exc.value.message_dict
    assert not LesionReview.objects.exists()


def test_another_teams_clinician_cannot_review(other_clinician, other_team, patient):
    with pytest.raises(PermissionDenied):
        services.record_review(user=other_clinician, lesion=LesionFactory(patient=patient), decision="refer")
    assert not LesionReview.objects.exists()


def test_reviews_are_in_the_audit_trail_with_the_actor(clinician, patient):
    review = services.record_review(user=clinician, lesion=LesionFactory(patient=patient), decision="refer")
    entry = LogEntry.objects.get(content_type=ContentType.objects.get_for_model(LesionReview),
                                 object_pk=str(review.pk), action=LogEntry.Action.CREATE)
    assert entry.actor == clinician and entry.changes_dict["decision"][1] == "refer"


def test_add_months_keeps_the_day_or_takes_the_months_last():
    assert add_months(datetime.date(2025, 1, 31), 1) == datetime.date(2025, 2, 28)
    assert add_months(datetime.date(2025, 11, 15), 3) == datetime.date(2026, 2, 15)


# --- the queue ------------------------------------------------------------------------------------

def test_queue_lists_unreviewed_lesions_flagged_first_then_by_score(clinician, patient, other_team, v):
    low, mid, high = (LesionFactory(patient=patient, label=n) for n in ("low", "mid", "high"))
    scored(low, v, 0.05)
    scored(mid, v, 0.30)
    scored(high, v, 0.45)
    flagged_other_patient = LesionFactory(patient=PatientFactory(care_team=patient.care_team), label="flag2")
    scored(flagged_other_patient, v, 0.41)
    foreign = LesionFactory(patient=PatientFactory(care_team=other_team), label="foreign")
    scored(foreign, v, 0.99)
    LesionFactory(patient=patient, label="no images")
    assert [l.label for l in selectors.review_queue(clinician)] == ["high", "flag2", "mid", "low"]


def test_a_review_clears_the_lesion_until_a_new_result_arrives(clinician, patient, v):
    lesion = LesionFactory(patient=patient)
    scored(lesion, v, 0.5, finished=timezone.now() - datetime.timedelta(hours=1))
    assert [l.pk for l in selectors.review_queue(clinician)] == [lesion.pk]
    services.record_review(user=clinician, lesion=lesion, decision="monitor")
    assert selectors.review_queue(clinician) == []
    scored(lesion, v, 0.6, day=datetime.date(2025, 7, 1), finished=timezone.now() + datetime.timedelta(seconds=1))
    [again] = selectors.review_queue(clinician)
    assert again.pk == lesion.pk and again.last_review.decision == "monitor" and again.result.score == 0.6


def test_queue_page_names_the_model_version_and_links_to_review(on_team, patient, v):
    lesion = LesionFactory(patient=patient, label="L-queue")
    scored(lesion, v, 0.62)
    html = on_team.get(reverse("patients:review_queue")).content.decode()
    assert "L-queue" in html and "62%" in html and "model demo-v7" in html and "Flagged" in html
    assert "not validated" in html
    assert reverse("patients:lesion_detail", args=[lesion.pk]) + "#review" in html


def test_empty_queue_says_so(on_team):
    assert "Nothing to review" in on_team.get(reverse("patients:review_queue")).content.decode()


def test_worklist_shows_top_score_flag_and_unreviewed_count(on_team, clinician, patient, v):
    a, b = LesionFactory(patient=patient), LesionFactory(patient=patient)
    scored(a, v, 0.2)
    scored(b, v, 0.48)
    services.record_review(user=clinician, lesion=a, decision="reassure")
    response = on_team.get(reverse("patients:worklist"))
    [p] = response.context["page"].object_list
    assert p.top_result.score == 0.48 and p.flagged and p.n_unreviewed == 1
    html = response.content.decode()
    assert "48%" in html and "model demo-v7" in html and "1 new" in html


# --- review form on the lesion page ---------------------------------------------------------------

def test_lesion_page_records_a_review(on_team, patient, v):
    lesion = LesionFactory(patient=patient)
    scored(lesion, v, 0.5)
    html = on_team.get(reverse("patients:lesion_detail", args=[lesion.pk])).content.decode()
    assert "New result to review" in html and "Record review" in html
    response = on_team.post(reverse("patients:review_create", args=[lesion.pk]),
                            {"decision": "monitor", "note": "Dermoscopy in 3 months", "follow_up_months": "3"},
                            follow=True)
    review = LesionReview.objects.get()
    assert review.follow_up_months == 3
    html = response.content.decode()
    assert "Review recorded: Monitor" in html and "Follow-up due" in html and "New result to review" not in html


def test_lesion_page_shows_review_errors(on_team, patient):
    lesion = LesionFactory(patient=patient)
    response = on_team.post(reverse("patients:review_create", args=[lesion.pk]), {"decision": "nope"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert not LesionReview.objects.exists()


def test_off_team_cannot_post_a_review(client, other_clinician, other_team, patient):
    client.force_login(other_clinician)
    lesion = LesionFactory(patient=patient)
    assert client.post(reverse("patients:review_create", args=[lesion.pk]), {"decision": "refer"}).status_code == 404
    assert not LesionReview.objects.exists()


# --- follow-ups -----------------------------------------------------------------------------------

def test_follow_ups_list_due_reviews_in_force_most_overdue_first(clinician, patient, other_team):
    today = timezone.localdate()
    overdue, soon, later, superseded = (LesionFactory(patient=patient, label=n) for n in
                                        ("overdue", "soon", "later", "superseded"))
    r = services.record_review(user=clinician, lesion=overdue, decision="monitor", follow_up_months=1)
    LesionReview.objects.filter(pk=r.pk).update(follow_up_due=today - datetime.timedelta(days=5))
    r = services.record_review(user=clinician, lesion=soon, decision="monitor", follow_up_months=1)
    LesionReview.objects.filter(pk=r.pk).update(follow_up_due=today + datetime.timedelta(days=10))
    services.record_review(user=clinician, lesion=later, decision="monitor", follow_up_months=12)
    r = services.record_review(user=clinician, lesion=superseded, decision="monitor", follow_up_months=1)
    LesionReview.objects.filter(pk=r.pk).update(follow_up_due=today - datetime.timedelta(days=1))
    services.record_review(user=clinician, lesion=superseded, decision="reassure")
    assert [r.lesion.label for r in selectors.follow_ups_due(clinician)] == ["overdue", "soon"]
    assert [r.lesion.label for r in selectors.follow_ups_due(clinician, within_days=0)] == ["overdue"]
    assert list(selectors.follow_ups_due(other_team.members.get())) == []


def test_follow_ups_page(on_team, clinician, patient):
    lesion = LesionFactory(patient=patient, label="L-follow")
    r = services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=3)
    LesionReview.objects.filter(pk=r.pk).update(follow_up_due=timezone.localdate() - datetime.timedelta(days=2))
    html = on_team.get(reverse("patients:follow_ups")).content.decode()
    assert "L-follow" in html and "2 days overdue" in html and "Monitor" in html


# --- viewer and comparison ------------------------------------------------------------------------

def test_viewer_links_earlier_and_later_images_and_back(on_team, patient, v):
    lesion = LesionFactory(patient=patient)
    a = scored(lesion, v, 0.2, day=datetime.date(2024, 1, 10))
    b = scored(lesion, v, 0.3, day=datetime.date(2024, 7, 10))
    c = scored(lesion, v, 0.5, day=datetime.date(2025, 1, 10))
    html = on_team.get(reverse("patients:image_viewer", args=[b.pk])).content.decode()
    assert reverse("patients:image_viewer", args=[a.pk]) in html and reverse("patients:image_viewer", args=[c.pk]) in html
    assert "data-key-left" in html and "data-key-right" in html and "data-key-escape" in html
    assert reverse("patients:image_file", args=[b.pk]) in html and "model demo-v7" in html
    assert "js/viewer.js" in html and "<script>" not in html


def test_compare_shows_dates_time_between_and_score_change(on_team, patient, v):
    lesion = LesionFactory(patient=patient)
    a = scored(lesion, v, 0.20, day=datetime.date(2024, 1, 10))
    scored(lesion, v, 0.25, day=datetime.date(2024, 7, 10))
    c = scored(lesion, v, 0.47, day=datetime.date(2025, 3, 10))
    response = on_team.get(reverse("patients:lesion_compare", args=[lesion.pk]))  # default: first and last
    html = response.content.decode()
    assert response.context["first"] == a and response.context["second"] == c
    assert "10 Jan 2024" in html and "10 Mar 2025" in html
    assert "1 year 2 months (425 days)" in html
    assert "20% → 47%" in html and "+27 points" in html and "demo-v7" in html
    # Chosen in the wrong order: still earlier on the left.
    response = on_team.get(reverse("patients:lesion_compare", args=[lesion.pk]), {"a": c.pk, "b": a.pk})
    assert response.context["first"] == a


def test_compare_ignores_images_of_other_lesions(on_team, patient, other_team, v):
    lesion = LesionFactory(patient=patient)
    a = scored(lesion, v, 0.2, day=datetime.date(2024, 1, 10))
    b = scored(lesion, v, 0.3, day=datetime.date(2024, 2, 10))
    foreign = scored(LesionFactory(patient=PatientFactory(care_team=other_team)), v, 0.9)
    response = on_team.get(reverse("patients:lesion_compare", args=[lesion.pk]), {"a": foreign.pk})
    assert response.context["first"] == a and response.context["second"] == b
    assert reverse("patients:image_file", args=[foreign.pk]) not in response.content.decode()


def test_lesion_page_links_next_and_previous_lesion(on_team, patient):
    a = LesionFactory(patient=patient, label="A", anatomic_site="Trunk:Posterior trunk")
    b = LesionFactory(patient=patient, label="B", anatomic_site="Trunk:Posterior trunk")
    html = on_team.get(reverse("patients:lesion_detail", args=[b.pk])).content.decode()
    assert f'href="{reverse("patients:lesion_detail", args=[a.pk])}" rel="prev" data-key-prev' in html
    assert "data-key-next" not in html


# --- REST API -------------------------------------------------------------------------------------

@pytest.fixture
def api(clinician):
    c = APIClient()
    c.force_authenticate(clinician)
    return c


def test_api_creates_and_lists_reviews(api, patient, v):
    lesion = LesionFactory(patient=patient)
    scored(lesion, v, 0.5)
    r = api.post("/api/v1/reviews/", {"lesion": lesion.pk, "decision": "monitor", "follow_up_months": 6},
                 format="json")
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["follow_up_due"] == add_months(timezone.localdate(), 6).isoformat()
    assert body["in_force"] is True and body["result_snapshot"]["model_version"] == "demo-v7"
    r2 = api.post("/api/v1/reviews/", {"lesion": lesion.pk, "decision": "excise"}, format="json")
    assert r2.json()["supersedes"] == body["id"]
    listed = api.get("/api/v1/reviews/", {"lesion": lesion.pk}).json()["results"]
    assert [x["decision"] for x in listed] == ["excise", "monitor"]
    assert [x["in_force"] for x in listed] == [True, False]
    assert [x["decision"] for x in api.get("/api/v1/reviews/", {"in_force": "true"}).json()["results"]] == ["excise"]


def test_api_reviews_are_visibility_checked_and_append_only(api, patient, other_team, clinician):
    foreign = LesionFactory(patient=PatientFactory(care_team=other_team))
    r = api.post("/api/v1/reviews/", {"lesion": foreign.pk, "decision": "refer"}, format="json")
    # one error format (issue 14): another team's lesion reads like an unknown one, a rule refusal
    assert r.status_code == 422 and "lesion" in r.json()["errors"]
    review = services.record_review(user=other_team.members.get(), lesion=foreign, decision="refer")
    assert api.get(f"/api/v1/reviews/{review.pk}/").status_code == 404
    assert api.get("/api/v1/reviews/").json()["count"] == 0
    mine = services.record_review(user=clinician, lesion=LesionFactory(patient=patient), decision="refer")
    assert api.patch(f"/api/v1/reviews/{mine.pk}/", {"note": "x"}, format="json").status_code == 405
    assert api.delete(f"/api/v1/reviews/{mine.pk}/").status_code == 405
    bad = api.post("/api/v1/reviews/", {"lesion": mine.lesion_id, "decision": "monitor", "follow_up_months": 0},
                   format="json")
    assert bad.status_code == 400 and "follow_up_months" in bad.json()["errors"]


def test_schema_documents_reviews(api):
    schema = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    assert "/api/v1/reviews/" in schema["paths"] and "post" in schema["paths"]["/api/v1/reviews/"]
    assert "patch" not in schema["paths"].get("/api/v1/reviews/{id}/", {})
    assert "quality" in schema["components"]["schemas"]["LesionImage"]["properties"]


# --- admin ----------------------------------------------------------------------------------------

def test_admin_shows_review_history_read_only(client, staff, clinician, patient):
    lesion = LesionFactory(patient=patient)
    first = services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=3)
    services.record_review(user=clinician, lesion=lesion, decision="excise")
    client.force_login(staff)
    html = client.get(reverse("admin:patients_lesionreview_changelist")).content.decode()
    assert "Monitor" in html and "Excise" in html
    assert reverse("admin:patients_lesionreview_add") not in html
    page = client.get(reverse("admin:patients_lesionreview_change", args=[first.pk]))
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    assert client.post(reverse("admin:patients_lesionreview_change", args=[first.pk]), {"note": "x"}).status_code == 403
    assert client.get(reverse("admin:patients_lesion_change", args=[lesion.pk])).status_code == 200


# --- small things ---------------------------------------------------------------------------------

def test_favicon_is_served(client):
    from django.contrib.staticfiles import finders
    from PIL import Image

    response = client.get("/favicon.ico")
    assert response.status_code == 302 and response["Location"] == "/static/favicon.ico"
    with Image.open(finders.find("favicon.ico")) as icon:
        assert icon.format == "ICO"
    assert finders.find("favicon.svg")


def test_logged_out_api_docs_go_to_the_login_page(client, clinician):
    response = client.get("/api/v1/docs/")
    assert response.status_code == 302 and response["Location"].startswith(reverse("login") + "?next=")
    client.force_login(clinician)
    assert client.get("/api/v1/docs/").status_code == 200


def test_pages_load_the_keyboard_shortcuts(on_team, patient):
    html = on_team.get(reverse("patients:worklist")).content.decode()
    assert "js/keys.js" in html and "data-search-shortcut" in html
