"""OpenAPI 3 schema: generates without warnings, validates, documents the upload and file routes."""
import io

import pytest
import yaml
from django.core.management import call_command
from openapi_spec_validator import validate
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

PATHS = [
    "/api/v1/patients/", "/api/v1/patients/{id}/", "/api/v1/patients/{patient_pk}/lesions/",
    "/api/v1/lesions/", "/api/v1/lesions/{id}/", "/api/v1/lesions/{lesion_pk}/images/",
    "/api/v1/images/", "/api/v1/images/{id}/", "/api/v1/images/{id}/file/", "/api/v1/images/{id}/thumbnail/",
]


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    with django_db_blocker.unblock():
        out = io.StringIO()
        # --fail-on-warn: any warning (e.g. an under-specified field) fails the command.
        call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi", stdout=out)
    return yaml.safe_load(out.getvalue())


def test_schema_generates_without_warnings_and_validates(schema):
    validate(schema)
    assert schema["openapi"].startswith("3.")


def test_schema_lists_every_records_route(schema):
    assert set(PATHS) <= set(schema["paths"])
    assert set(schema["paths"]["/api/v1/patients/{id}/"]) >= {"get", "put", "patch", "delete"}
    assert set(schema["paths"]["/api/v1/images/{id}/"]) == {"get", "delete"}


def test_upload_is_documented_as_multipart_with_files(schema):
    for path in ("/api/v1/images/", "/api/v1/lesions/{lesion_pk}/images/"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]
        assert list(body) == ["multipart/form-data"]
        ref = body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
        props = schema["components"]["schemas"][ref]["properties"]
        assert props["files"]["items"]["format"] == "binary"
        assert {"image_type", "acquired_on"} <= set(props)
        assert {"201", "200", "400"} <= set(schema["paths"][path]["post"]["responses"])


def test_file_routes_answer_binary_images(schema):
    content = schema["paths"]["/api/v1/images/{id}/file/"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"image/jpeg", "image/png"}
    assert content["image/jpeg"]["schema"]["format"] == "binary"


def test_token_and_session_auth_are_documented(schema):
    assert {"tokenAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])


def test_schema_over_http_validates(staff):
    client = APIClient()
    client.force_authenticate(staff)
    response = client.get("/api/v1/schema/", {"format": "json"})
    assert response.status_code == 200
    validate(response.json())


def test_docs_page_uses_no_cdn(client, staff):
    client.force_login(staff)
    response = client.get("/api/v1/docs/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "cdn." not in html and "unpkg" not in html
