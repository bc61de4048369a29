"""Start and stop a real Celery worker process for tests (no eager mode), and small helpers.

The worker runs ``celery -A melanoma_site worker -B`` in its own process group, on its own queue
(env CELERY_QUEUE, so parallel test runs on one Redis do not collide), against pytest-django's test
database (DATABASE_URL built from ``connection.settings_dict``), with the test's MEDIA_ROOT and
MODEL_ROOT.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from django.core.files.base import ContentFile

ROOT = Path(__file__).resolve().parent.parent
CELERY = Path(sys.executable).with_name("celery")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_redis() -> str:
    """The Redis URL, after checking the server answers; skip (fail in CI) when there is none."""
    url = os.environ.get("REDIS_URL", "")
    problem = None
    if not url:
        problem = "REDIS_URL is not set"
    else:
        try:
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except Exception as exc:  # noqa: BLE001
            problem = f"Redis at {url} does not answer: {exc}"
    if problem:
        if in_ci():
            pytest.fail(f"{problem} (CI=true: the worker tests need Redis)")
        pytest.skip(problem)
    return url


def database_url(settings_dict) -> str:
    """A DATABASE_URL for the database this test process really uses (pytest-django's test_ name)."""
    engine = settings_dict["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    if "postgresql" not in engine:
        raise RuntimeError(f"unsupported engine for the worker: {engine}")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"


def unique_queue(prefix="melanoma-test") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def use_queue(queue: str):
    """Point this process's task messages at ``queue``; returns a function that restores the old one."""
    from melanoma_site.celery import app

    old = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    return lambda: setattr(app.conf, "task_default_queue", old)


def purge_queue(queue: str) -> None:
    url = os.environ.get("REDIS_URL", "")
    if not url:
        return
    try:
        import redis

        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = [*r.keys(f"{queue}*"), *r.keys(f"_kombu.binding*.{queue}*")]
        if keys:
            r.delete(*keys)
        # Messages a SIGKILLed test worker held unacked would be restored to this queue in an hour.
        for tag, payload in r.hscan_iter("unacked"):
            if queue.encode() in payload:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)
    except Exception:  # noqa: BLE001
        pass


def queue_length(queue: str) -> int:
    import redis

    return int(redis.Redis.from_url(os.environ["REDIS_URL"]).llen(queue))


class Worker:
    """A real ``celery worker`` subprocess (prefork, concurrency 1, with beat for the sweeper)."""

    def __init__(self, *, queue: str, database: str, media_root, model_root, workdir, env=None,
                 beat: bool = True):
        self.queue = queue
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.beat = beat
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
            "DATABASE_URL": database,
            "CELERY_QUEUE": queue,
            "MEDIA_ROOT": str(media_root),
            "MODEL_ROOT": str(model_root),
            "VAR_DIR": str(self.workdir / "var"),
            "WORKER_THREADS": "1",
            # The runtime probe at the first load of a version stays short in tests.
            "ANALYSIS_RUNTIME_BUDGET_S": "8",
            "ANALYSIS_STALE_SECONDS": "300",
            "ANALYSIS_SWEEP_INTERVAL": "60",
            "PYTHONUNBUFFERED": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Worker":
        cmd = [str(CELERY), "-A", "melanoma_site", "worker", "-Q", self.queue, "--concurrency", "1",
               "--pool", "prefork", "--loglevel", "INFO", "-n", f"{self.queue}-{uuid.uuid4().hex[:4]}@%h",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if self.beat:
            cmd += ["-B", "--schedule-filename", str(self.workdir / f"beat-{uuid.uuid4().hex[:6]}")]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if b" ready." in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process, pool child and beat): no warm shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._close()

    def _close(self):
        log = getattr(self, "_log", None)
        if log and not log.closed:
            log.close()


def wait_for(predicate, *, timeout: float = 60, interval: float = 0.25, message="condition", worker=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    extra = f"\nworker log:\n{worker.log_tail()}" if worker else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {message}{extra}")


# ---------------------------------------------------------------------- images and checkpoints

def jpeg_bytes(seed=0, width=200, height=160) -> bytes:
    from PIL import Image

    from tests.factories import lesion_like_array

    buf = io.BytesIO()
    Image.fromarray(lesion_like_array(width, height, seed)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image(lesion, *, seed=0, data: bytes | None = None, user=None):
    """A stored LesionImage created directly (no upload pipeline, no signal): for unit tests."""
    from patients.models import LesionImage

    data = data if data is not None else jpeg_bytes(seed)
    digest = hashlib.sha256(data).hexdigest()
    img = LesionImage(lesion=lesion, sha256=digest, upload_sha256=digest, width=200, height=160,
                      size_bytes=len(data), format="JPEG", original_format="JPEG",
                      acquired_on=datetime.date(2025, 1, 1), uploaded_by=user)
    img.file.save(f"{digest[:12]}.jpg", ContentFile(data), save=False)
    img.thumbnail.save("t.jpg", ContentFile(data), save=False)
    img.save()
    return img


def tiny_checkpoint(path, *, input_size=64, card_extra=None, seed=0) -> Path:
    """A random-weight MelanomaNet checkpoint in our format (pretrained=None), input 64 px."""
    import torch

    from training.network import MelanomaNet, save_checkpoint
    from training.preprocessing import describe

    torch.manual_seed(seed)
    model = MelanomaNet("se_resnet50", pretrained_weights=None).eval()
    with torch.no_grad():  # spread the random model's scores (they all sit at ~0.5 otherwise)
        model.head.weight.mul_(100.0)
    card = {
        "architecture": "se_resnet50", "input_size": input_size, "preprocessing": describe(input_size),
        "metrics": {"roc_auc": 0.81, "roc_auc_ci": [0.77, 0.85], "pauc_80": 0.1},
        "threshold": 0.4, "validated": False, "intended_use": "tests only",
        **(card_extra or {}),
    }
    save_checkpoint(str(path), model, card, fp16=True)
    return Path(path)




def tiny_ensemble(path, *, seed=0) -> Path:
    """A random-weight two-member ensemble bundle: EfficientNet-Lite0 at 48 px (embedding member)
    and SE-ResNet50 at 32 px, with a logistic combiner."""
    import torch

    from training.ensemble import Member, save_ensemble
    from training.network import MelanomaNet
    from training.preprocessing import describe

    torch.manual_seed(seed)
    members = []
    for name, size, norm in (("efficientnet_lite0", 48, "tf-lite"), ("se_resnet50", 32, "imagenet")):
        net = MelanomaNet(name).eval()
        with torch.no_grad():
            net.head.weight.mul_(100.0)
        members.append(Member(name, net, {"architecture": name, "input_size": size, "tta": name == "se_resnet50",
                                          "preprocessing": describe(size, norm)}))
    card = {"architecture": "ensemble: efficientnet_lite0 + se_resnet50", "input_size": 48, "threshold": 0.3,
            "metrics": {"roc_auc": 0.9, "roc_auc_ci95": [0.88, 0.92]}, "validated": False,
            "members": [{"name": m.name, "input_size": m.input_size} for m in members]}
    save_ensemble(str(path), members, weights=[0.8, 0.3], bias=-0.5, embedding_member=0, card=card)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One tiny random checkpoint per test session (shared by every module that imports this)."""
    path = tmp_path_factory.getbasetemp() / "tiny-se_resnet50-64.pt"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tiny_checkpoint(tmp)
        tmp.replace(path)
    return path


def worker_runtimes(version) -> list[str]:
    """The runtime per member the worker chose and recorded for ``version`` (ModelVersion.runtime)."""
    version.refresh_from_db(fields=["runtime"])
    return [m["chosen"] for m in version.runtime["latest"]["members"]]


def register_version(checkpoint: Path, *, active=True, name=None, **extra):
    """A ModelVersion pointing at ``checkpoint`` without the (slow) validation run: for tests."""
    from inference.models import ModelVersion

    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    fields = dict(name=name or f"tiny-{sha[:8]}", architecture="se_resnet50", input_size=64, sha256=sha,
                  weights_path=str(Path(checkpoint).resolve()),
                  card={"input_size": 64, "validated": False}, metrics={"roc_auc": 0.81, "roc_auc_ci": [0.77, 0.85]},
                  threshold=0.4, validated=False, is_active=active)
    fields.update(extra)
    return ModelVersion.objects.create(**fields)
