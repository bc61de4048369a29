"""Private media: the image and thumbnail views check visibility, send safe headers, never leak."""
import datetime

import pytest
from django.urls import reverse
from rest_framework.authtoken.models import Token

from patients import services
from tests.factories import LesionFactory, image_bytes, uploaded

pytestmark = pytest.mark.django_db



def store(user, lesion, data, name="IMG_secret_name.jpg"):
    [outcome] = services.upload_images(user=user, lesion=lesion, files=[uploaded(data, name=name)],
                                       image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2))
    return outcome.image


@pytest.fixture
def image(clinician, patient):
    return store(clinician, LesionFactory(patient=patient), image_bytes(seed=3))


def login_as(client, role, clinician, other_clinician, staff):
    if role == "on_team":
        client.force_login(clinician)
    elif role == "off_team":
        client.force_login(other_clinician)
    elif role == "staff":
        client.force_login(staff)
    elif role == "token":  # pages (media included) are for browser sessions; a token is no login there
        token, _ = Token.objects.get_or_create(user=clinician)
        client.defaults["HTTP_AUTHORIZATION"] = f"Token {token.key}"


@pytest.mark.parametrize("view", ["patients:image_file", "patients:image_thumbnail"])
@pytest.mark.parametrize("role, expected", [
    ("on_team", 200), ("off_team", 404), ("staff", 200), ("anonymous", 302), ("token", 302),
])
def test_media_access_matrix(client, clinician, other_clinician, other_team, staff, image, view, role, expected):
    login_as(client, role, clinician, other_clinician, staff)
    url = reverse(view, args=[image.pk])
    response = client.get(url)
    assert response.status_code == expected
    if expected == 302:
        assert response["Location"].startswith(reverse("login")) and "next=" in response["Location"]
    if expected == 200:
        body = b"".join(response.streaming_content)
        assert body[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("view", ["patients:image_file", "patients:image_thumbnail"])
def test_foreign_image_answers_like_a_missing_one(client, other_clinician, other_team, image, view):
    client.force_login(other_clinician)
    foreign = client.get(reverse(view, args=[image.pk]))
    missing = client.get(reverse(view, args=[image.pk + 1000]))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.content == missing.content


def test_file_headers(client, clinician, image):
    client.force_login(clinician)
    response = client.get(reverse("patients:image_file", args=[image.pk]))
    assert response["Content-Type"] == "image/jpeg"
    assert "private" in response["Cache-Control"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Disposition"] == f'inline; filename="image-{image.pk}.jpg"'
    assert "secret_name" not in response["Content-Disposition"]
    assert int(response["Content-Length"]) == image.size_bytes
    assert response["ETag"] == f'"{image.sha256}"'


def test_png_is_served_as_png_and_thumbnail_as_jpeg(client, clinician, patient):
    image = store(clinician, LesionFactory(patient=patient), image_bytes("PNG", seed=8), name="scan.png")
    client.force_login(clinician)
    response = client.get(reverse("patients:image_file", args=[image.pk]))
    assert response["Content-Type"] == "image/png"
    assert b"".join(response.streaming_content)[:8] == b"\x89PNG\r\n\x1a\n"
    thumb = client.get(reverse("patients:image_thumbnail", args=[image.pk]))
    assert thumb["Content-Type"] == "image/jpeg"
    assert thumb["Content-Disposition"] == f'inline; filename="image-{image.pk}-thumbnail.jpg"'


def test_conditional_get_answers_304_after_checking_access(client, clinician, other_clinician, other_team, image):
    client.force_login(clinician)
    url = reverse("patients:image_file", args=[image.pk])
    response = client.get(url, HTTP_IF_NONE_MATCH=f'"{image.sha256}"')
    assert response.status_code == 304 and response["Cache-Control"] == "private, no-cache"
    thumb_url = reverse("patients:image_thumbnail", args=[image.pk])
    etag = client.get(thumb_url)["ETag"]
    assert client.get(thumb_url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    client.force_login(other_clinician)
    assert client.get(url, HTTP_IF_NONE_MATCH=f'"{image.sha256}"').status_code == 404


def test_only_get_and_head(client, clinician, image):
    client.force_login(clinician)
    url = reverse("patients:image_file", args=[image.pk])
    assert client.head(url).status_code == 200
    assert client.post(url).status_code == 405
    assert client.delete(url).status_code == 405


def test_missing_stored_file_is_404(client, clinician, image):
    image.file.storage.delete(image.file.name)
    client.force_login(clinician)
    assert client.get(reverse("patients:image_file", args=[image.pk])).status_code == 404


def test_inactive_user_sees_nothing(client, clinician, image):
    client.force_login(clinician)
    clinician.is_active = False
    clinician.save()
    response = client.get(reverse("patients:image_file", args=[image.pk]))
    assert response.status_code in (302, 404)


def test_media_folder_has_no_url(client, clinician, image, settings):
    client.force_login(clinician)
    for prefix in (settings.MEDIA_URL, "/media/"):
        assert client.get(f"{prefix}{image.file.name}").status_code == 404


def test_api_media_answers_json_errors_for_foreign_images(other_clinician, other_team, image):
    from rest_framework.test import APIClient

    token, _ = Token.objects.get_or_create(user=other_clinician)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    for kind in ("file", "thumbnail"):
        response = api.get(f"/api/v1/images/{image.pk}/{kind}/", HTTP_ACCEPT="image/*")
        assert response.status_code == 404
