"""The web process does its one-off work (imports of every view, templates, DRF settings, the cache
client, the page cache's build hash) when the WSGI application is loaded, not on its first request:
under gunicorn the master loads it once and every worker -- recycled ones too -- starts warm
(melanoma_site/warm.py; bench/web.py with a low WEB_MAX_REQUESTS shows the difference)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, sys
import melanoma_site.wsgi  # what gunicorn's master imports (preload_app)
from django.db import connections
from django.template import engines
loaders = engines["django"].engine.template_loaders
cached = [t for loader in loaders for t in getattr(loader, "get_template_cache", {})]
state = {"open_connections": [a for a in connections if connections[a].connection is not None],
         "templates": sorted(cached)}
if os.environ.get("REQUEST") == "1":
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from django.test import RequestFactory
    token = Token.objects.create(user=get_user_model().objects.create_user("dr", password="x")).key
    connections.close_all()
    before = set(sys.modules)
    for path in ("/api/v1/analyses/", "/api/v1/patients/"):
        environ = RequestFactory().get(path, HTTP_AUTHORIZATION=f"Token {token}", HTTP_ACCEPT="application/json").environ
        status = []
        b"".join(melanoma_site.wsgi.application(environ, lambda s, h, e=None: status.append(s)))
        assert status[0].startswith("200"), status
    state["imported_by_requests"] = sorted(set(sys.modules) - before)
state["views_imported"] = "patients.views" in sys.modules and "inference.api.views" in sys.modules
print(json.dumps(state))
"""


def run_app(tmp_path, **env):
    full = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "VAR_DIR": str(tmp_path / "var"),
            "REDIS_URL": "", "NO_ALBUMENTATIONS_UPDATE": "1", "LOG_LEVEL": "WARNING", "DEBUG": "false",
            "SECRET_KEY": "k" * 50, "ALLOWED_HOSTS": "testserver", **env}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_the_wsgi_application_imports_the_views_and_compiles_the_templates(tmp_path):
    warm = run_app(tmp_path)
    assert warm["views_imported"]
    assert "patients/worklist.html" in warm["templates"] and "patients/_patient_detail_content.html" in warm["templates"]
    assert warm["open_connections"] == []  # nothing a forked worker could share


def test_without_warming_the_first_request_would_do_it(tmp_path):
    cold = run_app(tmp_path, WEB_WARM="false")
    assert not cold["views_imported"] and cold["templates"] == []


@pytest.mark.slow
def test_the_first_api_requests_import_none_of_the_applications_modules(tmp_path):
    warm = run_app(tmp_path, REQUEST="1")
    ours = ("patients", "inference", "melanoma_site", "rest_framework", "django_filters", "drf_spectacular",
            "django.template", "django.urls")
    late = [m for m in warm["imported_by_requests"] if m.split(".")[0] in ours or m.startswith(ours)]
    assert late == [], late
