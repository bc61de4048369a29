"""Web-tier benchmark: requests/s and latency percentiles of the pages and API lists, with gunicorn on
PostgreSQL, idle and while a real Celery worker analyses a burst of uploads. Loopback only, bounded.

What it does, in one run (about a minute and a half with the defaults):

1. creates a separate PostgreSQL database (``--database-url``, default: ``DATABASE_URL``'s server with
   the database ``<name>_webbench``; dropped at the end), migrates it, installs the bundled model
   version (``models/demo-v2``) and seeds ``--patients`` patients (3 lesions, 2 images each, every
   image analysed, some lesions reviewed) for one care team;
2. starts gunicorn with the production configuration (``deploy/gunicorn.conf.py``, DEBUG off, static
   files collected) on a free loopback port;
3. logs ``--clients`` clinicians in through the login page (each client keeps its session cookie)
   and gives as many API clients a token each (the per-user API throttle stays on, its rate raised
   so that it never refuses them);
4. for each endpoint (worklist, patient page, API lists of patients, lesions, images, analyses)
   requests every distinct URL once (the steady state of a clinic open for a while: the pages'
   rendered-HTML cache holds them; ``--cold`` skips this), runs the clients in a closed loop for
   ``--seconds`` after a short warm-up, and prints requests/s,
   p50/p95/p99 latency, the server's CPU time per request (gunicorn processes, from /proc, with
   the workers they reaped) and how many gunicorn workers were recycled during the window;
5. starts a real Celery worker (``--no-busy`` skips this phase), uploads ``--uploads`` images
   through the API and keeps it fed while the same measurements run again; prints how many
   analyses the worker finished meanwhile and how much CPU it took;
6. prints busy/idle ratios, the issue's target (>= 100 requests/s, p95 < 300 ms) beside each
   figure, and the SQL queries one request makes (Django's test client in this process).

``--save FILE`` writes the figures as JSON; ``--compare FILE`` prints this run beside a saved one
(e.g. a run of the code before a change) as ratios.

    .venv/bin/python bench/web.py [--seconds 3] [--clients 20] [--patients 60] [--no-busy]

Needs PostgreSQL (and Redis for the busy phase: ``REDIS_URL``, default ``redis://127.0.0.1:6379/0``;
without a reachable Redis the worker uses the embedded file-system broker). Sends traffic to
127.0.0.1 only. The client runs in this process (threads + http.client), on the same cores as the
server: read the server-CPU column and the ratios, not only the absolute requests/s.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TARGET_RPS, TARGET_P95_MS = 100.0, 300.0
PASSWORD = "bench-" + secrets.token_urlsafe(12)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_database_url() -> str:
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        return url
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(base)
        name = parts.path.lstrip("/") or "melanoma"
        return urlunsplit(parts._replace(path=f"/{name}_webbench"))
    return "postgres://postgres@127.0.0.1:5432/melanoma_webbench"


def redis_url() -> str:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return url
    except Exception as exc:  # noqa: BLE001
        log(f"Redis at {url} does not answer ({exc}): the worker uses the embedded file-system broker")
        return ""


def recreate_database(url: str, *, drop_only=False) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise SystemExit(f"unsupported database name {name!r}")
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            conn.execute(f'CREATE DATABASE "{name}"')


def process_group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of a process group, from /proc: its live processes' own time
    plus the time of the children they have reaped (a gunicorn worker recycled after
    ``max_requests`` leaves the live set; its time moves to the master's children's time, so
    nothing is lost or counted twice)."""
    return sum(_group_stats(pgid).values()) / CLOCK_TICKS


def _group_stats(pgid: int) -> dict[int, int]:
    """{pid: CPU ticks of it and its reaped children} of a process group's live processes."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, cutime 16, cstime 17
        if int(fields[2]) == pgid:
            out[int(entry)] = sum(int(x) for x in fields[11:15])
    return out


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------------------------- HTTP client

class Client:
    """One keep-alive HTTP/1.1 connection to the server, with cookies or a token header."""

    def __init__(self, port: int, headers: dict | None = None):
        self.port = port
        self.headers = dict(headers or {})
        self.cookies: dict[str, str] = {}
        self.conn = None

    def _connect(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        hdrs = {**self.headers, **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                # The server closed an idle keep-alive connection: open a new one (GETs only retried).
                self.close()
                if attempt or method != "GET":
                    raise
        for header in resp.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return resp.status, resp, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def login(port: int, username: str) -> Client:
    c = Client(port)
    status, _, page = c.request("GET", "/accounts/login/")
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    if status != 200 or not token:
        raise SystemExit(f"login page answered {status}")
    body = urlencode({"username": username, "password": PASSWORD,
                      "csrfmiddlewaretoken": token.group(1).decode(), "next": "/patients/"}).encode()
    status, resp, _ = c.request("POST", "/accounts/login/", body,
                                {"Content-Type": "application/x-www-form-urlencoded"})
    if status != 302 or "sessionid" not in c.cookies:
        raise SystemExit(f"login of {username} failed: {status}")
    return c


def multipart(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for field, name, data in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                   f'Content-Type: image/jpeg\r\n\r\n'.encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def run_load(clients: list[Client], next_path, *, seconds: float, warmup: float, server_pgid: int) -> dict:
    """Every client in a closed loop (request, wait, repeat): ``warmup`` seconds unmeasured, then
    the requests started in the next ``seconds``; each client finishes the request it has in flight
    (so slow endpoints are measured too). Requests/s = measured requests / time until the last ended."""
    start_at = time.perf_counter() + 0.05
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    results: list[list[float]] = [[] for _ in clients]
    ends = [measure_from] * len(clients)
    errors = [0] * len(clients)

    def worker(i: int):
        c = clients[i]
        n = i
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            path = next_path(n)
            n += len(clients)
            try:
                status, _, _ = c.request("GET", path)
            except Exception:  # noqa: BLE001 -- counted as an error
                status = 0
                c.close()
            t1 = time.perf_counter()
            if t0 >= measure_from:
                results[i].append(t1 - t0)
                ends[i] = t1
                if status != 200:
                    errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    while time.perf_counter() < measure_from:
        time.sleep(0.002)
    before = _group_stats(server_pgid)
    for t in threads:
        t.join()
    after = _group_stats(server_pgid)
    lat = sorted(x for r in results for x in r)
    n = len(lat)
    # The server's CPU from the start of the measured window to the end of the last request: a
    # little of the warm-up's requests still in flight is counted too.
    return {
        "requests": n, "errors": sum(errors), "rps": n / (max(ends) - measure_from) if n else 0.0,
        "p50_ms": percentile(lat, 50) * 1000, "p95_ms": percentile(lat, 95) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "server_cpu_ms": (sum(after.values()) - sum(before.values())) * 1000 / CLOCK_TICKS / n if n else float("nan"),
        # gunicorn workers started during the window (recycled after max_requests): each one's
        # first requests, and the moments with one process fewer, are in these percentiles
        "workers_started": len(after.keys() - before.keys()),
    }


# ------------------------------------------------------------------------------------- seeding

def seed(n_patients: int, *, n_users: int, lesions_per_patient=3, images_per_lesion=2) -> dict:
    """Patients of one care team with lesions, images (one small file on disk shared by every row:
    the lists never read it), a finished analysis by the active version per image and reviews on a
    third of the lesions. Bulk inserts: no audit entries, seconds for hundreds of rows."""
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.core.files.storage import default_storage
    from django.core.files.base import ContentFile
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from inference.models import Analysis, ModelVersion
    from patients.demo import lesion_image
    from patients.models import CareTeam, Lesion, LesionImage, LesionReview, Patient

    User = get_user_model()
    users = []
    hashed = None
    for i in range(n_users):
        u = User(username=f"bench.dr{i:03d}", first_name="Bench", last_name=f"Clinician {i}")
        if hashed is None:
            u.set_password(PASSWORD)
            hashed = u.password
        u.password = hashed  # one hash for all (PBKDF2 is slow by design); each logs in normally
        users.append(u)
    User.objects.bulk_create(users)
    users = list(User.objects.filter(username__startswith="bench.dr").order_by("username"))
    team = CareTeam.objects.create(name="Bench dermatology")
    team.members.add(*users)
    other = CareTeam.objects.create(name="Bench other team")  # patients nobody here may see
    tokens = [Token.objects.create(user=u).key for u in users]

    version = ModelVersion.objects.get(is_active=True)
    jpeg = lesion_image(seed=1, size=128)
    file_name = default_storage.save("images/bench.jpg", ContentFile(jpeg))
    thumb_name = default_storage.save("thumbnails/bench.jpg", ContentFile(jpeg))
    sites = ["Trunk:Posterior trunk", "Upper extremity:Shoulder", "Lower extremity:Thigh", "Head & neck:Face", ""]
    today = datetime.date.today()
    rng = np.random.default_rng(0)
    now = timezone.now()

    patients = [Patient(mrn=f"BENCH-{i:05d}", name=f"Patient {i:05d} Benchmark",
                        birth_date=datetime.date(1940 + i % 60, 1 + i % 12, 1 + i % 28),
                        sex=["female", "male"][i % 2], care_team=team if i % 10 else other,
                        ) for i in range(n_patients + n_patients // 9)]
    Patient.objects.bulk_create(patients)
    lesions = [Lesion(patient=p, label=f"L{j + 1}", anatomic_site=sites[(p.pk + j) % len(sites)],
                      body_map_x=0.3 + 0.1 * j, body_map_y=0.4)
               for p in patients for j in range(lesions_per_patient)]
    Lesion.objects.bulk_create(lesions)
    images = []
    for lesion in lesions:
        for k in range(images_per_lesion):
            digest = secrets.token_hex(32)
            images.append(LesionImage(
                lesion=lesion, file=file_name, thumbnail=thumb_name, sha256=digest, upload_sha256=digest,
                width=128, height=128, size_bytes=len(jpeg), format="JPEG", original_format="JPEG",
                acquired_on=today - datetime.timedelta(days=200 * (images_per_lesion - k)),
                uploaded_by=users[0], quality={"warnings": []}))
    LesionImage.objects.bulk_create(images)
    dim = 1280
    analyses = []
    for image in images:
        p = float(rng.beta(1, 12))
        analyses.append(Analysis(
            image=image, model_version=version, status=Analysis.Status.DONE, probability=p,
            final_score=min(1.0, p * 1.1), final_score_source="context",
            context_features={"ugly_duckling": float(rng.random()), "age": 50.0},
            context_explanation={"direction": "up", "reason": "ugly duckling"},
            embedding=rng.random(dim, dtype=np.float32).tobytes(), attempts=1,
            timings={"inference_ms": 100}, enqueued_at=now, started_at=now, finished_at=now,
            context_updated_at=now, member_probabilities={"efficientnet_lite0": p, "se_resnet50": p}))
    Analysis.objects.bulk_create(analyses)
    reviews = [LesionReview(lesion=lesion, decision="monitor", note="bench", reviewed_by=users[0],
                            follow_up_months=6, follow_up_due=today + datetime.timedelta(days=30),
                            result_snapshot={})
               for lesion in lesions[::3]]
    LesionReview.objects.bulk_create(reviews)
    from django.db import connection

    with connection.cursor() as cursor:  # planner statistics, as a database in use has them
        cursor.execute("ANALYZE")
    visible = [p.pk for p in patients if p.care_team_id == team.pk]
    return {"users": [u.username for u in users], "tokens": tokens, "patients": visible,
            "lesions": [l.pk for l in lesions if l.patient.care_team_id == team.pk],
            "images": len(images), "analyses": len(analyses), "version": version.pk}


def query_counts(endpoints: dict, username: str, token: str) -> dict:
    """SQL queries of one request to each endpoint (Django's test client, in this process)."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client as DjangoClient
    from django.test.utils import CaptureQueriesContext

    page = DjangoClient()
    page.force_login(get_user_model().objects.get(username=username))
    api = DjangoClient(HTTP_AUTHORIZATION=f"Token {token}")
    out = {}
    for name, (kind, path_of) in endpoints.items():
        client = page if kind == "page" else api
        client.get(path_of(0))  # first request of a kind fills caches (content types, ...)
        with CaptureQueriesContext(connection) as ctx:
            resp = client.get(path_of(1))
        out[name] = len(ctx.captured_queries) if resp.status_code == 200 else f"HTTP {resp.status_code}"
    return out


# ---------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=default_database_url(),
                    help="PostgreSQL database to create, seed and drop (default: %(default)s)")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per endpoint and phase")
    ap.add_argument("--warmup", type=float, default=0.7, help="unmeasured seconds before each measurement")
    ap.add_argument("--uploads", type=int, default=20, help="images uploaded at the start of the busy phase")
    ap.add_argument("--no-busy", action="store_true", help="skip the phase with a busy worker")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up pass over every URL: measure first visits (the page cache empty)")
    ap.add_argument("--worker-timeout", type=float, default=300,
                    help="seconds the worker may take to load the model and analyse a first upload")
    ap.add_argument("--gunicorn-config", default=str(ROOT / "deploy" / "gunicorn.conf.py"),
                    help="gunicorn configuration file (default: %(default)s; when missing: "
                         "--workers 2 --threads 4, the earlier run.sh flags)")
    ap.add_argument("--gunicorn-args", default="", help="extra gunicorn arguments, e.g. '--workers 3'")
    ap.add_argument("--only", default="", help="comma-separated endpoint names to measure")
    ap.add_argument("--save", help="write the figures as JSON to this file")
    ap.add_argument("--compare", help="a JSON file from an earlier --save: print this run beside it")
    ap.add_argument("--keep", action="store_true",
                    help="keep the database and the temporary folder (logs, media) at the end")
    args = ap.parse_args()

    db_url = args.database_url
    if not db_url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("bench/web.py measures gunicorn on PostgreSQL: give a postgres:// --database-url")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="webbench-"))
    queue = f"webbench-{uuid.uuid4().hex[:8]}"
    broker = redis_url()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "melanoma_site.settings",
        "DATABASE_URL": db_url, "REDIS_URL": broker, "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(40), "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "VAR_DIR": str(tmp / "var"), "MEDIA_ROOT": str(tmp / "media"), "MODEL_ROOT": str(tmp / "models"),
        "CELERY_QUEUE": queue, "LOG_LEVEL": "WARNING", "NO_ALBUMENTATIONS_UPDATE": "1",
        # The per-user API throttle stays on (its cache round trip is part of each request's cost)
        # but high enough never to refuse the bench's clients.
        "API_THROTTLE_USER": "1000000/minute",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    procs: list[subprocess.Popen] = []

    def stop_all():
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        from django.db import connections

        connections.close_all()
        if args.keep:
            log(f"kept the database and {tmp} (gunicorn.log, worker.log)")
            return
        try:
            recreate_database(db_url, drop_only=True)
        except Exception as exc:  # noqa: BLE001
            log(f"could not drop the bench database: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        return _run(args, env, tmp, queue, broker, procs, t_start)
    finally:
        stop_all()


def _run(args, env, tmp, queue, broker, procs, t_start) -> int:
    py = sys.executable
    log(f"database {urlsplit(args.database_url).path.lstrip('/')} (recreated), broker "
        f"{'Redis' if broker else 'file system'}, {os.cpu_count()} CPUs")
    recreate_database(args.database_url)
    subprocess.run([py, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([py, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([py, "manage.py", "install_model", str(ROOT / "models" / "demo-v2" / "model.pt"),
                    "--name", "demo-v2-ensemble", "--activate"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    import django

    django.setup()
    t0 = time.perf_counter()
    data = seed(args.patients, n_users=args.clients)
    log(f"seeded {len(data['patients'])} visible patients ({args.patients // 9} more of another team), "
        f"{data['images']} images, {data['analyses']} analyses in {time.perf_counter() - t0:.1f}s")

    patients = data["patients"]
    endpoints = {
        "worklist": ("page", lambda n: "/patients/"),
        "patient page": ("page", lambda n: f"/patients/{patients[n % len(patients)]}/"),
        "api patients": ("api", lambda n: "/api/v1/patients/"),
        "api lesions": ("api", lambda n: "/api/v1/lesions/"),
        "api images": ("api", lambda n: "/api/v1/images/"),
        "api analyses": ("api", lambda n: "/api/v1/analyses/"),
    }
    if args.only:
        wanted = [x.strip() for x in args.only.split(",")]
        endpoints = {k: v for k, v in endpoints.items() if k in wanted}
    queries = query_counts(endpoints, data["users"][0], data["tokens"][0])

    port = free_port()
    conf = Path(args.gunicorn_config)
    gargs = ["-c", str(conf)] if conf.exists() else ["--workers", "2", "--threads", "4"]
    gargs += args.gunicorn_args.split() if args.gunicorn_args else []
    gunicorn_cmd = [str(BIN / "gunicorn"), "melanoma_site.wsgi", *gargs, "--bind", f"127.0.0.1:{port}"]
    glog = open(tmp / "gunicorn.log", "wb")
    server = subprocess.Popen(gunicorn_cmd, cwd=ROOT, env=env, stdout=glog, stderr=subprocess.STDOUT,
                              start_new_session=True)
    procs.append(server)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start:\n{(tmp / 'gunicorn.log').read_text()[-3000:]}")
            time.sleep(0.2)
    log(f"gunicorn: {' '.join(gunicorn_cmd[1:])}")

    t0 = time.perf_counter()
    users = data["users"]
    page_clients: list[Client] = [None] * args.clients
    login_threads = []
    for i in range(args.clients):
        def do(i=i):
            page_clients[i] = login(port, users[i % len(users)])
        login_threads.append(threading.Thread(target=do))
        login_threads[-1].start()
    for t in login_threads:
        t.join()
    if any(c is None for c in page_clients):
        raise SystemExit("a login failed")
    api_clients = [Client(port, {"Authorization": f"Token {data['tokens'][i]}", "Accept": "application/json"})
                   for i in range(args.clients)]
    log(f"{args.clients} clinicians logged in (session cookies) in {time.perf_counter() - t0:.1f}s; "
        f"{args.clients} API clients, each with its own token")
    # Each endpoint answers 200 before anything is measured.
    for name, (kind, path_of) in endpoints.items():
        status, _, body = (page_clients if kind == "page" else api_clients)[0].request("GET", path_of(0))
        if status != 200:
            raise SystemExit(f"{name} answered {status}: {body[:300]!r}")

    def measure(phase: str) -> dict:
        out = {}
        for name, (kind, path_of) in endpoints.items():
            clients = page_clients if kind == "page" else api_clients
            if not args.cold:
                # Steady state: every distinct URL of the endpoint once before the clock starts, so
                # the pages' rendered-HTML cache (patients.pagecache) holds what a clinic that has
                # been open a while holds; --cold measures the first visits instead.
                for path in dict.fromkeys(path_of(n) for n in range(len(patients))):
                    clients[0].request("GET", path)
            r = run_load(clients, path_of, seconds=args.seconds, warmup=args.warmup, server_pgid=server.pid)
            out[name] = r
            log(f"{phase:5s} {name:13s} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.0f} ms  p95 {r['p95_ms']:6.0f} ms"
                f"  p99 {r['p99_ms']:6.0f} ms  server CPU {r['server_cpu_ms']:5.1f} ms/req"
                + (f"  ({r['workers_started']} worker(s) recycled)" if r["workers_started"] else "")
                + (f"  ERRORS {r['errors']}" if r["errors"] else ""))
        return out

    results = {"idle": measure("idle")}
    busy_info = {}
    if not args.no_busy:
        results["busy"], busy_info = busy_phase(args, env, tmp, queue, procs, port, data, measure)

    print_report(args, results, queries, busy_info, data, gunicorn_cmd, time.perf_counter() - t_start)
    if args.save:
        Path(args.save).write_text(json.dumps({"results": results, "queries": queries, "busy": busy_info,
                                               "gunicorn": gunicorn_cmd[1:], "args": vars(args)}, indent=2))
    return 0


def busy_phase(args, env, tmp, queue, procs, port, data, measure):
    """Start a real worker, upload a burst of images through the API, keep the worker fed while
    measuring, and report what the worker did meanwhile."""
    from django.db import connection

    from inference.models import Analysis
    from patients.demo import lesion_image

    wlog_path = tmp / "worker.log"
    wlog = open(wlog_path, "wb")
    t0 = time.perf_counter()
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "melanoma_site", "worker", "-Q", queue, "--concurrency", "1",
         "--pool", "prefork", "--loglevel", "INFO", "-n", f"{queue}@%h",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        # The runtime probe at the worker's start is bounded lower than in production: this bench
        # measures the web tier beside a busy worker, not the runtime choice (bench/inference.py).
        cwd=ROOT, env={**env, "LOG_LEVEL": "INFO", "ANALYSIS_RUNTIME_BUDGET_S": "8"}, stdout=wlog,
        stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(worker)
    deadline = time.monotonic() + 180
    while b" ready." not in wlog_path.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{wlog_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    log(f"worker ready in {time.perf_counter() - t0:.1f}s")

    uploader = Client(port, {"Authorization": f"Token {data['tokens'][0]}", "Accept": "application/json"})
    lesions = data["lesions"]
    stop = threading.Event()
    state = {"uploads": 0, "failed": 0, "seed": 1000}

    def upload(n: int):
        for _ in range(n):
            state["seed"] += 1
            body, ctype = multipart({"lesion": lesions[state["seed"] % len(lesions)], "image_type": "dermoscopic",
                                     "acquired_on": datetime.date.today().isoformat()},
                                    [("files", f"bench{state['seed']}.jpg", lesion_image(seed=state["seed"], size=384))])
            uploader.close()  # a fresh connection: the server may have closed an idle keep-alive one
            status, _, _ = uploader.request("POST", "/api/v1/images/", body, {"Content-Type": ctype})
            state["uploads" if status in (200, 201) else "failed"] += 1

    def pending() -> int:
        return Analysis.objects.filter(status__in=[Analysis.Status.QUEUED, Analysis.Status.RUNNING]).count()

    # The worker loads and probes the model in its pool process after "ready": wait for a first
    # analysis, so that the phase measures the pages beside a worker analysing, not loading.
    done_before = Analysis.objects.filter(status=Analysis.Status.DONE).count()
    upload(1)
    deadline = time.monotonic() + args.worker_timeout
    while Analysis.objects.filter(status=Analysis.Status.DONE).count() == done_before:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker analysed nothing in {args.worker_timeout} s:\n"
                             f"{wlog_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.25)
    t_warm = time.perf_counter() - t0
    log(f"worker warm (first upload analysed) {t_warm:.1f}s after its start")
    done_before = Analysis.objects.filter(status=Analysis.Status.DONE).count()
    state["uploads"] = state["failed"] = 0
    upload(args.uploads)
    log(f"uploaded {state['uploads']} images ({state['failed']} refused); {pending()} analyses pending")

    def feeder():
        # Keep the worker busy for the whole phase: top the queue up when it runs low.
        try:
            while not stop.wait(0.5):
                if pending() < 4 and state["uploads"] < args.uploads * 10:
                    upload(4)
        finally:
            connection.close()

    feed = threading.Thread(target=feeder, daemon=True)
    cpu0, t1 = process_group_cpu(worker.pid), time.perf_counter()
    feed.start()
    results = measure("busy")
    stop.set()
    feed.join()
    cpu1, t2 = process_group_cpu(worker.pid), time.perf_counter()
    done = Analysis.objects.filter(status=Analysis.Status.DONE).count() - done_before
    info = {"worker_warm_s": round(t_warm, 1), "uploads": state["uploads"], "uploads_refused": state["failed"],
            "analyses_done": done, "pending_at_end": pending(), "phase_s": round(t2 - t1, 1),
            "worker_cores": round((cpu1 - cpu0) / (t2 - t1), 2)}
    if not done:
        print(f"the worker finished no analysis; its log ends:\n{wlog_path.read_text(errors='replace')[-3000:]}")
    log(f"worker during the busy phase: {done} analyses done, {info['pending_at_end']} pending, "
        f"{info['worker_cores']} cores busy on average")
    return results, info


def print_report(args, results, queries, busy_info, data, gunicorn_cmd, elapsed):
    idle, busy = results["idle"], results.get("busy")
    print()
    print(f"Web tier, {args.clients} concurrent clients, {len(data['patients'])} patients "
          f"({data['images']} images), {os.cpu_count()} CPUs, {args.seconds:g} s per measurement")
    print(f"gunicorn {' '.join(gunicorn_cmd[2:])}")
    print(f"target: >= {TARGET_RPS:.0f} req/s and p95 < {TARGET_P95_MS:.0f} ms, idle and with the worker busy")
    head = f"{'endpoint':14s} {'queries':>7s} | {'idle req/s':>10s} {'p50':>6s} {'p95':>6s} {'p99':>6s} {'cpu/req':>7s}"
    if busy:
        head += f" | {'busy req/s':>10s} {'p50':>6s} {'p95':>6s} {'p99':>6s} | {'busy/idle':>9s}"
    print(head + " | target")
    for name, r in idle.items():
        line = (f"{name:14s} {str(queries.get(name, '')):>7s} | {r['rps']:10.1f} {r['p50_ms']:6.0f} {r['p95_ms']:6.0f}"
                f" {r['p99_ms']:6.0f} {r['server_cpu_ms']:5.1f}ms")
        ok = r["rps"] >= TARGET_RPS and r["p95_ms"] < TARGET_P95_MS and not r["errors"]
        if busy:
            b = busy[name]
            line += (f" | {b['rps']:10.1f} {b['p50_ms']:6.0f} {b['p95_ms']:6.0f} {b['p99_ms']:6.0f} |"
                     f" {b['rps'] / r['rps'] if r['rps'] else float('nan'):8.2f}x")
            ok = ok and b["rps"] >= TARGET_RPS and b["p95_ms"] < TARGET_P95_MS and not b["errors"]
        errors = r["errors"] + (busy[name]["errors"] if busy else 0)
        print(line + f" | {'met' if ok else 'MISSED'}" + (f" ({errors} errors)" if errors else ""))
    cpu = [r["server_cpu_ms"] for r in idle.values()]
    print(f"server CPU per request (idle): {min(cpu):.1f}-{max(cpu):.1f} ms, i.e. at most "
          f"{os.cpu_count() * 1000 / max(cpu):.0f}-{os.cpu_count() * 1000 / min(cpu):.0f} req/s on "
          f"{os.cpu_count()} idle cores for the server alone (the client shares them here)")
    if busy_info:
        print(f"busy phase: the worker (warm {busy_info['worker_warm_s']} s after its start) finished "
              f"{busy_info['analyses_done']} analyses of {busy_info['uploads']} uploads "
              f"({busy_info['pending_at_end']} still pending), using {busy_info['worker_cores']} cores on average")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        print(f"\ncompared with {args.compare} (after/before; req/s up is better, p95 down is better):")
        for phase in results:
            for name, r in results[phase].items():
                b = before.get("results", {}).get(phase, {}).get(name)
                if not b:
                    continue
                print(f"  {phase:4s} {name:14s} req/s {b['rps']:7.1f} -> {r['rps']:7.1f} ({r['rps'] / b['rps']:5.2f}x)"
                      f"   p95 {b['p95_ms']:6.0f} -> {r['p95_ms']:6.0f} ms ({b['p95_ms'] / r['p95_ms']:5.2f}x faster)"
                      f"   cpu/req {b['server_cpu_ms']:5.1f} -> {r['server_cpu_ms']:5.1f} ms"
                      f"   queries {before.get('queries', {}).get(name, '?')} -> {queries.get(name, '?')}")
    print(f"\n(total {elapsed:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
