"""The documented production topology (deploy/compose.yaml, deploy/.env.example) is coherent with the
settings: it parses, every app setting it uses is one settings.py reads, the app processes share no
volume (media live in the object store; each worker has its own models folder), the two workers
consume the two queues the settings route to, and the example configuration loads.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
APP_IMAGE = "melanoma-records:latest"


def settings_env_names() -> set[str]:
    source = (ROOT / "melanoma_site" / "settings.py").read_text()
    return set(re.findall(r'\benv(?:\.[a-z_]+)?\(\s*"([A-Z0-9_]+)"', source))


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolated(node) -> set[str]:
    """Names used as ${NAME} (or ${NAME:?...}) anywhere in a compose node ($$ is a literal $)."""
    text = json.dumps(node).replace("$$", "")
    return set(re.findall(r"\$\{([A-Z0-9_]+)", text))


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def app_services(compose):
    return {name: s for name, s in compose["services"].items() if s.get("image") == APP_IMAGE}


def test_compose_has_web_beat_two_workers_and_the_shared_services(compose, app_services):
    assert {"db", "redis", "minio", "bucket"} <= set(compose["services"])
    assert {"web", "beat", "worker-analyses", "worker-context", "migrate"} == set(app_services)
    assert "gunicorn" in app_services["web"]["command"]
    assert app_services["beat"]["command"][:4] == ["celery", "-A", "melanoma_site", "beat"]
    for service in app_services.values():
        assert service["env_file"] == ".env"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_app_services_use_only_settings_that_settings_py_reads(app_services):
    known = settings_env_names()
    for name, service in app_services.items():
        used = set(service.get("environment") or {}) | interpolated(service)
        assert used <= known, (name, used - known)


def test_env_example_names_only_settings_or_shared_service_variables(compose, app_services):
    known = settings_env_names()
    shared = set().union(*(interpolated(s) for n, s in compose["services"].items() if n not in app_services))
    unknown = set(env_example()) - known - shared
    assert not unknown, f"not read by settings.py nor used by a shared service: {unknown}"
    # Whatever compose interpolates must be defined in the example.
    assert interpolated(compose) <= set(env_example())


def test_app_processes_share_no_volume_and_workers_keep_models_local(compose, app_services):
    mounts = {}
    for name, service in app_services.items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            assert target == "/models", (name, volume)  # the only local state: the models folder
            assert source not in mounts.values(), f"{name} shares {source}"
            mounts[name] = source
    assert set(mounts) == {"worker-analyses", "worker-context"}
    assert "MODEL_ROOT=/models" in (DEPLOY / "Dockerfile").read_text().replace(" \\\n", " ")
    for shared in ("db", "redis", "minio"):  # their data volumes are theirs alone
        own = {v.split(":")[0] for v in compose["services"][shared].get("volumes") or []}
        assert not own & set(mounts.values())


def test_the_two_workers_consume_the_two_queues_the_settings_route_to(app_services):
    env = env_example()
    commands = {name: " ".join(app_services[name]["command"]) for name in ("worker-analyses", "worker-context")}
    assert f"-Q {env['ANALYSIS_QUEUE']} " in commands["worker-analyses"]
    assert f"-Q {env['CELERY_QUEUE']} " in commands["worker-context"]
    assert env["ANALYSIS_QUEUE"] != env["CELERY_QUEUE"]
    for command in commands.values():  # each worker machine fills its own models folder first
        assert "install_model" in command and "--skip-if-installed" in command and "--activate" not in command


def test_the_example_configuration_loads_with_s3_media_and_two_queues(tmp_path):
    code = ("import json, melanoma_site.settings as s; from melanoma_site.celery import route_task; "
            "print(json.dumps([s.STORAGES['default']['BACKEND'], s.DEBUG, "
            "route_task('inference.tasks.analyze_image', (), {}, {}), "
            "route_task('inference.tasks.compute_heatmap', (), {}, {}), s.CELERY_TASK_DEFAULT_QUEUE]))")
    env = {k: v for k, v in os.environ.items() if k not in env_example()}
    env.update(env_example(), VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="melanoma_site.settings")
    out = subprocess.run([sys.executable, "-c", "import django; django.setup(); " + code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, debug, analyses, heatmaps, default = json.loads(out.stdout.strip().splitlines()[-1])
    assert backend == "melanoma_site.storage.s3.PrivateS3Storage" and debug is False
    assert analyses == {"queue": "analyses"} and heatmaps is None and default == "context"
