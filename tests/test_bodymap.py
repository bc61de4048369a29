"""The body map: which ISIC site a point is, the clickable form map, dots coloured by flag."""
import pytest
from django.urls import reverse
from django.utils import timezone

from inference.models import Analysis, ModelVersion
from patients import bodymap
from patients.vocabulary import ANATOMIC_SITE_CHOICES
from tests.factories import LesionFactory
from tests.worker_utils import make_image

pytestmark = pytest.mark.django_db


def test_every_region_names_a_site_of_the_isic_vocabulary():
    sites = {value for value, _ in ANATOMIC_SITE_CHOICES}
    assert {r.site for r in bodymap.REGIONS} <= sites
    assert {r.view for r in bodymap.REGIONS} == {"front", "back"}


@pytest.mark.parametrize("x,y,expected", [
    (0.25, 0.08, ("Head and neck:Head:Face", "front")),
    (0.75, 0.08, ("Head and neck:Head:Scalp", "back")),
    (0.75, 0.23, ("Trunk:Posterior trunk:Upper back", "back")),
    (0.25, 0.35, ("Trunk:Anterior trunk:Anterior abdomen", "front")),
    (0.62, 0.41, ("Upper extremity:Forearm:Dorsal forearm", "back")),
    (0.79, 0.83, ("Lower extremity:Lower leg:Calf", "back")),
    (0.21, 0.83, ("Lower extremity:Lower leg:Shin", "front")),
    (0.02, 0.02, None),
    (None, 0.5, None),
])
def test_suggest_site(x, y, expected):
    assert bodymap.suggest_site(x, y) == expected


def test_lesion_form_renders_the_clickable_map_with_the_current_position(client, clinician, patient):
    client.force_login(clinician)
    lesion = LesionFactory(patient=patient, body_map_x=0.75, body_map_y=0.23)
    html = client.get(reverse("patients:lesion_edit", args=[lesion.pk])).content.decode()
    assert "data-body-map-input" in html and html.count('class="body-map-region"') == len(bodymap.REGIONS)
    assert 'data-site="Trunk:Posterior trunk:Upper back"' in html
    assert 'data-body-map-marker r="4.5" cx="150.0" cy="46.0"' in html
    assert 'data-searchable="sites"' in html and 'data-searchable="diagnoses"' in html
    assert "js/bodymap.js" in html and "js/pickers.js" in html


def test_patient_page_dots_are_coloured_by_flag_and_link_to_the_lesion(client, clinician, patient):
    v = ModelVersion.objects.create(name="v-map", architecture="se_resnet50", input_size=64, sha256="e" * 64,
                                    weights_path="x.pt", threshold=0.4, is_active=True)
    hot = LesionFactory(patient=patient, label="hot", body_map_x=0.25, body_map_y=0.25)
    cold = LesionFactory(patient=patient, label="cold", body_map_x=0.75, body_map_y=0.25)
    LesionFactory(patient=patient, label="unplaced")
    for lesion, p in ((hot, 0.8), (cold, 0.05)):
        Analysis.objects.create(image=make_image(lesion), model_version=v, status="done", probability=p,
                                final_score=p, final_score_source="image", finished_at=timezone.now())
    client.force_login(clinician)
    response = client.get(reverse("patients:patient_detail", args=[patient.pk]))
    dots = {d["lesion"]: d for d in response.context["body_map_dots"]}
    assert set(dots) == {hot.pk, cold.pk} and response.context["n_unplaced"] == 1
    assert dots[hot.pk]["flagged"] and dots[hot.pk]["level"] == "high" and dots[cold.pk]["level"] == "low"
    html = response.content.decode()
    assert 'class="body-map-dot dot-high dot-flagged" cx="50.0" cy="50.0"' in html
    assert "hot, 80% by model v-map (flagged)" in html
    assert f'href="{reverse("patients:lesion_detail", args=[hot.pk])}" class="body-map-link"' in html
    assert "2 of 3 lesions placed" in html
