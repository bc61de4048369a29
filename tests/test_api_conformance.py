"""The REST API does exactly what its OpenAPI schema says: schemathesis against a live test server.

Every operation of /api/v1/schema/ is fuzzed with every schemathesis check enabled (status codes,
content types, response schemas and headers, schema-valid requests accepted, schema-violating ones
rejected, undocumented methods answer 405 with Allow, auth is not ignored, deleted records are gone,
created ones readable, and one clinician cannot read another care team's records), in all phases
(examples, coverage, fuzzing, stateful sequences). Bounded: at most MAX_EXAMPLES cases per operation
and phase and MAX_SECONDS for the whole run. Any violation fails the test with schemathesis' report.

The one configured expectation: a schema-valid request may be refused with 422 (a rule the schema
cannot express: an id you cannot see inside a body, a date in the future, bytes that are not an
image); 400 stays reserved for requests that do not match the schema (melanoma_site.api).
"""
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from django.core.signals import request_started
from rest_framework.authtoken.models import Token

from inference.models import Analysis, ModelVersion
from patients import services
from tests.factories import CareTeamFactory, PatientFactory, UserFactory, image_bytes, uploaded

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MAX_EXAMPLES = int(os.environ.get("API_CONFORMANCE_EXAMPLES", "8"))
MAX_SECONDS = int(os.environ.get("API_CONFORMANCE_SECONDS", "60"))
SEED = os.environ.get("API_CONFORMANCE_SEED", "20261202")

CONFIG = """
# 422: a schema-valid request refused by a rule the schema cannot express (see the module docstring).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

# Error feedback (a generation heuristic, not a check) reads 4xx bodies as DRF's field: [messages];
# this API's envelope (code, detail, errors) makes it invent an `errors` body field.
[phases.fuzzing.error-feedback]
enabled = false

# The lesion operations carry the ISIC vocabularies (206 anatomic sites, 418 diagnoses): the coverage
# phase would send one request per value. There it runs its negative cases (wrong types, values
# outside the enums, missing fields, undocumented methods); fuzzing samples the valid values.
[[operations]]
include-path-regex = "lesions"
phases.coverage.generation.mode = "negative"
"""


def _seed_world():
    """Two clinicians on two care teams, each with a patient, lesions, stored images and analyses."""
    version = ModelVersion.objects.create(
        name="conformance", architecture="se_resnet50", input_size=64, sha256="c" * 64, weights_path="x.pt",
        metrics={"roc_auc": 0.8}, threshold=0.4, validated=False, is_active=False,
        context_model=None,
    )
    tokens = {}
    for n, name in enumerate(("clinician_a", "clinician_b")):
        user = UserFactory(username=name)
        team = CareTeamFactory(members=[user])
        patient = PatientFactory(care_team=team)
        for k in range(2):
            lesion = services.create_lesion(user=user, patient=patient, label=f"L{k + 1}",
                                            anatomic_site="Trunk:Posterior trunk")
            outcomes = services.upload_images(
                user=user, lesion=lesion, files=[uploaded(image_bytes(seed=10 * n + k), f"{k}.jpg")],
                image_type="dermoscopic", acquired_on=datetime.date(2025, 1, 2 + k))
            for outcome in outcomes:
                score = 0.2 + 0.3 * k + 0.1 * n
                analysis = Analysis(image=outcome.image, model_version=version, status="done", probability=score,
                                    final_score=score, final_score_source="image", timings={"inference_ms": 5.0},
                                    finished_at=datetime.datetime(2025, 1, 3, tzinfo=datetime.UTC))
                analysis.set_embedding([0.1] * 8)
                analysis.save()
        tokens[name] = Token.objects.create(user=user).key
    return tokens


def test_the_api_does_exactly_what_its_schema_says(live_server, tmp_path, capsys):
    tokens = _seed_world()
    headers = {"Authorization": f"Token {tokens['clinician_a']}"}
    request = urllib.request.Request(f"{live_server.url}/api/v1/schema/?format=json", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        schema = json.load(response)
    operations = sum(1 for item in schema["paths"].values() for method in item if method in
                     ("get", "put", "post", "patch", "delete"))
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "auth.json").write_text(json.dumps({"auth": [
        {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Token {key}"}]}
        for name, key in tokens.items()
    ]}))
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    report = tmp_path / "report.json"

    served = []
    counter = lambda **kwargs: served.append(1)  # noqa: E731 -- requests the live server answered
    request_started.connect(counter, weak=False)
    started = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"),
             "run", str(tmp_path / "schema.json"), "--url", live_server.url,
             "--auth-wfc", str(tmp_path / "auth.json"), "--checks", "all", "--phases",
             "examples,coverage,fuzzing,stateful", "--max-examples", str(MAX_EXAMPLES),
             "--max-time", str(MAX_SECONDS), "--max-response-time", "30", "--seed", SEED, "--workers", "1", "--generation-database", "none",
             "--request-timeout", "30", "--report", "json", "--report-json-path", str(report), "--no-color"],
            capture_output=True, text=True, timeout=MAX_SECONDS + 120, cwd=tmp_path,
        )
    finally:
        request_started.disconnect(counter)
    elapsed = time.monotonic() - started
    summary = json.loads(report.read_text()) if report.exists() else {}
    if os.environ.get("API_CONFORMANCE_LOG"):  # keep schemathesis' own report for a closer look
        with open(os.environ["API_CONFORMANCE_LOG"], "w") as log:
            log.write(run.stdout + run.stderr + json.dumps(summary, indent=1))
    with capsys.disabled():
        print(f"\nAPI conformance: {summary.get('operations', {}).get('tested')} of {operations} operations, "
              f"{summary.get('test_cases', {}).get('generated')} test cases, {len(served)} requests, "
              f"{elapsed:.0f} s, {len(summary.get('failures', []))} failure kinds")
    assert run.returncode == 0 and not summary.get("failures") and not summary.get("errors"), \
        run.stdout[-20000:] + run.stderr[-5000:]
    assert summary["operations"]["tested"] == summary["operations"]["total"] == operations
    assert not summary["operations"]["errored"]
