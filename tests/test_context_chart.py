"""The patient-context partial (templates/inference/_patient_context.html) and its template tags."""
import re

import numpy as np
import pytest
from django.template import Context, Template
from django.template.loader import render_to_string
from django.urls import NoReverseMatch, include, path, reverse

from inference.context import rescore_patient
from inference.models import Analysis
from tests.factories import LesionFactory, PatientFactory
from tests.test_context_rescore import (DIM, UD_MODEL, add_image, bundled_context_model, make_version,
                                        similar_patient)


def _lesion_stub(request, pk):  # pragma: no cover - only its URL is reversed
    raise NotImplementedError


urlpatterns = [path("patients/", include(([path("lesions/<int:pk>/", _lesion_stub, name="lesion_detail")], "patients")))]


@pytest.fixture(autouse=True)
def _lesion_url(settings):
    """Use the app's URLconf when it has patients:lesion_detail; else this module's stand-in."""
    try:
        reverse("patients:lesion_detail", args=[1])
    except (NoReverseMatch, ImportError, AttributeError):
        settings.ROOT_URLCONF = __name__


def render(patient):
    return render_to_string("inference/_patient_context.html", {"patient": patient})


def svg_points(html):
    return re.findall(r"<circle ", html)


@pytest.mark.django_db
def test_no_lesions_and_no_model():
    patient = PatientFactory()
    html = render(patient)
    assert "No model version installed" in html and "<svg" not in html
    make_version(None, is_active=True)
    html = render(patient)
    assert "Context model: none — image probability only" in html
    assert "No lesions recorded" in html and "Not validated for clinical use" in html


@pytest.mark.django_db
def test_one_lesion_without_context_model():
    version = make_version(None, is_active=True)
    patient = PatientFactory()
    lesion = LesionFactory(patient=patient, label="Left shoulder")
    a = add_image(lesion, version, 0.42, np.ones(DIM))
    LesionFactory(patient=patient, label="Not yet analysed")
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    html = render(patient)
    assert "Context model: none — image probability only" in html
    assert len(svg_points(html)) == 1
    assert reverse("patients:lesion_detail", args=[lesion.pk]) in html
    assert "Left shoulder" in html and "42.0%" in html and "(image)" in html
    assert "No analysed image yet." in html  # the second lesion is in the table only
    assert 'role="img"' in html and "<title" in html and "<desc" in html
    assert "threshold 30.0%" in html  # the version's threshold without a context model
    a.refresh_from_db()
    assert a.final_score_source == "image"


@pytest.mark.django_db
def test_several_lesions_with_context_model_outlier_stands_out():
    version = make_version(UD_MODEL, is_active=True, validated=True)
    patient, analyses, odd = similar_patient(version)
    # an older image of the odd lesion: only the latest image is plotted
    add_image(odd.image.lesion, version, 0.1, np.ones(DIM), day=2)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    html = render(patient)
    assert len(svg_points(html)) == 6
    assert "Context model: an adjustment of the image score" in html and "Not validated" not in html
    assert "threshold 30.0%" in html and "threshold 20.0%" not in html  # ONE threshold: the version's
    for a in analyses + [odd]:
        assert reverse("patients:lesion_detail", args=[a.image.lesion_id]) in html
    # the odd lesion is drawn last (on top), large, with the outlier ring
    circles = re.findall(r'<circle cx="([\d.]+)" cy="[\d.]+" r="(\d+)"[^>]*stroke="([^"]+)"', html)
    xs = [float(c[0]) for c in circles]
    assert circles[-1][2] == "#ef6c00" and int(circles[-1][1]) == 10 and xs[-1] == max(xs)
    assert "(outlier)" in html and "odd" in html


@pytest.mark.django_db
def test_context_breakdown_tag_and_filter():
    version = make_version(UD_MODEL)
    patient, _, odd = similar_patient(version, n=3)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    odd = Analysis.objects.get(pk=odd.pk)
    html = Template("{% load context_chart %}{% context_breakdown a %}|{{ a|context_threshold }}|"
                    "{% for r in a.context_features|context_rows %}{{ r.label }}={{ r.value }};{% endfor %}"
                    ).render(Context({"a": odd}))
    assert "<table" in html and "image + patient context" in html
    assert "Ugly-duckling distance" in html and "=1 of 4 (1 = most unlike)" in html
    assert "Images of this patient" not in html
    assert "Sex=female;" in html and "Site (ISIC 2020 general)=lower extremity;" in html
    assert "Age when the lesion was first photographed=53 years;" in html
    assert "|0.3|" in html  # the version's threshold
    empty = Template("{% load context_chart %}{% context_breakdown a %}").render(Context({"a": None}))
    assert "not computed yet" in empty


@pytest.mark.django_db
def test_exported_model_is_named_simulated_patients_on_the_page(tmp_path):
    from tests.training.test_context_model import write_isic_like
    from training import context_model as cm

    meta = write_isic_like(tmp_path / "meta.csv", n_patients=100)
    cm.main(["--synthetic", "600", "--skip-metadata", "--seeds", "0", "--folds", "3", "--threshold", "0.3",
             "--isic-metadata", str(meta), "--out", str(tmp_path)])
    import json

    model = json.loads((tmp_path / "context_model.json").read_text())
    version = make_version(model, is_active=True)
    patient, _, _ = similar_patient(version, n=3)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    assert set(Analysis.objects.values_list("final_score_source", flat=True)) == {"context"}
    html = render(patient)
    assert "trained on simulated patients" in html and "with context vs" in html
    assert "Not validated for clinical use" in html
    assert "assumed within-patient resemblance" not in html  # this one was trained without the assumption


@pytest.mark.django_db
def test_bundled_context_model_names_its_assumed_resemblance_on_the_page():
    version = make_version(bundled_context_model(), is_active=True)
    patient, _, _ = similar_patient(version, n=3)
    rescore_patient(patient_id=patient.pk, model_version_id=version.pk)
    html = render(patient)
    assert "trained on simulated patients with an assumed within-patient resemblance of 0.5" in html
    assert "Not validated for clinical use" in html


def test_outlier_rule_lives_in_scoring_and_needs_three_lesions_and_a_clear_gap():
    from inference.scoring import is_outlier

    assert is_outlier(0.5, [0.1, 0.12, 0.5])
    assert not is_outlier(0.12, [0.1, 0.12, 0.5])  # not the farthest
    assert not is_outlier(0.5, [0.1, 0.5])  # fewer than three distances
    assert not is_outlier(0.14, [0.1, 0.12, 0.14])  # farthest, but not 1.5 x the median
    assert not is_outlier(None, [0.1, 0.12, 0.5])
