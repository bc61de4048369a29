"""Image-quality warnings on upload (never a refusal) and the PDF report (text checked with pypdf)."""
import datetime
import io

import numpy as np
import pytest
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from django.utils import timezone
from PIL import Image, ImageFilter
from pypdf import PdfReader
from rest_framework.test import APIClient

from inference.models import Analysis, ModelVersion
from patients import services
from patients.uploads import assess_quality, process_upload
from tests.factories import LesionFactory, lesion_like_array, uploaded

pytestmark = pytest.mark.django_db


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def good_image(size=(640, 480), seed=3) -> Image.Image:
    return Image.fromarray(lesion_like_array(*size, seed=seed))


def codes(quality) -> list[str]:
    return [w["code"] for w in quality["warnings"]]


# --- quality --------------------------------------------------------------------------------------

def test_a_sharp_well_exposed_image_has_no_warnings():
    q = assess_quality(good_image())
    assert codes(q) == [] and q["short_side"] == 480 and q["sharpness"] > 10


def test_small_image_is_warned_about():
    q = assess_quality(good_image((180, 180)))
    assert codes(q) == ["small"] and "180×180 px" in q["warnings"][0]["message"]


def test_blurred_image_is_warned_about():
    q = assess_quality(good_image().filter(ImageFilter.GaussianBlur(4)))
    assert "blurred" in codes(q) and q["sharpness"] < 10


def test_under_and_over_exposed_images_are_warned_about():
    arr = lesion_like_array(640, 480, seed=4).astype(np.float32)
    dark = Image.fromarray((arr * 0.15).astype(np.uint8))
    bright = Image.fromarray(np.clip(arr * 1.8 + 60, 0, 255).astype(np.uint8))
    assert "underexposed" in codes(assess_quality(dark))
    assert "overexposed" in codes(assess_quality(bright))


def test_black_dermoscope_corners_are_not_under_exposure():
    arr = lesion_like_array(600, 600, seed=5)
    yy, xx = np.mgrid[0:600, 0:600]
    arr[(yy - 300) ** 2 + (xx - 300) ** 2 > 300 ** 2] = 0  # round field of view, black outside
    assert "underexposed" not in codes(assess_quality(Image.fromarray(arr)))


def test_quality_is_measured_on_upload_and_stored_with_the_image(clinician, patient):
    lesion = LesionFactory(patient=patient)
    data = jpeg(good_image().filter(ImageFilter.GaussianBlur(5)))
    assert "blurred" in codes(process_upload(data).quality)
    [outcome] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(data, "soft.jpg")],
                                       image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2))
    outcome.image.refresh_from_db()
    assert "blurred" in codes(outcome.image.quality)  # stored, not refused


def test_upload_page_warns_and_the_warning_stays_beside_the_image(client, clinician, patient):
    client.force_login(clinician)
    lesion = LesionFactory(patient=patient)
    small = jpeg(good_image((200, 150)))
    response = client.post(reverse("patients:image_upload", args=[lesion.pk]), {
        "files": [uploaded(small, "tiny.jpg")], "image_type": "dermoscopic", "acquired_on": "2025-01-02",
    }, follow=True)
    html = response.content.decode()
    assert "1 image uploaded" in html
    assert "check the image quality" in html and "tiny.jpg: small image (200×150 px" in html
    html = client.get(reverse("patients:lesion_detail", args=[lesion.pk])).content.decode()
    assert 'data-quality="small"' in html


def test_api_returns_the_quality(clinician, patient):
    api = APIClient()
    api.force_authenticate(clinician)
    lesion = LesionFactory(patient=patient)
    r = api.post(f"/api/v1/lesions/{lesion.pk}/images/", {
        "files": [uploaded(jpeg(good_image((220, 220))), "a.jpg")], "image_type": "dermoscopic",
        "acquired_on": "2025-01-02"}, format="multipart")
    assert r.status_code == 201, r.content
    assert [w["code"] for w in r.json()[0]["quality"]["warnings"]] == ["small"]


# --- PDF report -----------------------------------------------------------------------------------

@pytest.fixture
def recorded(clinician, patient):
    """A patient with one lesion, two visits scored by an unvalidated model, two reviews."""
    v = ModelVersion.objects.create(
        name="demo-v9", architecture="se_resnet50", input_size=64, sha256="c" * 64, weights_path="x.pt",
        metrics={"roc_auc": 0.76, "roc_auc_ci95": [0.741, 0.778], "sensitivity": 0.9, "specificity": 0.455,
                 "n": 3775, "n_melanoma": 613}, threshold=0.408, validated=False, is_active=True)
    lesion = LesionFactory(patient=patient, label="L7 left calf", anatomic_site="Lower extremity")
    outcomes = []
    for day, seed, p in ((datetime.date(2024, 3, 5), 11, 0.21), (datetime.date(2025, 2, 14), 12, 0.63)):
        [o] = services.upload_images(user=clinician, lesion=lesion, files=[uploaded(jpeg(good_image(seed=seed)))],
                                     image_type="dermoscopic", acquired_on=day)
        Analysis.objects.filter(image=o.image).delete()  # whatever the signal queued: set the result here
        Analysis.objects.create(image=o.image, model_version=v, status="done", probability=p, final_score=p,
                                final_score_source="image", finished_at=timezone.now())
        outcomes.append(o)
    services.record_review(user=clinician, lesion=lesion, decision="monitor", follow_up_months=3, note="Recheck")
    services.record_review(user=clinician, lesion=lesion, decision="excise", note="Grew since March")
    return {"lesion": lesion, "version": v}


def pdf_text(content: bytes) -> str:
    reader = PdfReader(io.BytesIO(content))
    return "\n".join(page.extract_text() for page in reader.pages)


def test_patient_report_pdf_has_identity_scores_model_and_decisions(client, clinician, patient, recorded):
    client.force_login(clinician)
    response = client.get(reverse("patients:patient_report", args=[patient.pk]))
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
    text = pdf_text(response.content)
    for expected in (patient.name, patient.mrn, "17 May 1970", "L7 left calf", "5 Mar 2024", "14 Feb 2025",
                     "21%", "63%", "demo-v9", "ROC-AUC 0.760 (95% CI 0.741–0.778)", "NOT VALIDATED FOR CLINICAL USE",
                     "Monitor (superseded)", "Excise", "Grew since March", "FLAGGED"):
        assert expected in text.replace("\n", " "), expected
    reader = PdfReader(io.BytesIO(response.content))
    assert sum(len(page.images) for page in reader.pages) == 2  # the two visits' thumbnails


def test_lesion_report_and_audit_entry(client, clinician, patient, recorded):
    client.force_login(clinician)
    lesion = recorded["lesion"]
    response = client.get(reverse("patients:lesion_report", args=[lesion.pk]))
    assert response.status_code == 200
    text = pdf_text(response.content)
    assert "Lesion report: L7 left calf" in text and "demo-v9" in text
    entry = LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(lesion), object_pk=str(lesion.pk),
                                    action=LogEntry.Action.ACCESS).latest("timestamp")
    assert entry.actor == clinician and entry.additional_data["report"] == "pdf"


def test_report_is_access_checked(client, other_clinician, other_team, patient, recorded):
    client.force_login(other_clinician)
    assert client.get(reverse("patients:patient_report", args=[patient.pk])).status_code == 404
    assert client.get(reverse("patients:lesion_report", args=[recorded["lesion"].pk])).status_code == 404
    with pytest.raises(PermissionDenied):
        services.build_report(user=other_clinician, patient=patient)
