"""Where a web request's time goes: the pages and API lists of bench/web.py, in this process, one
request at a time, split into SQL, template rendering, API serialization and JSON, the session and
user look-up, the audit write and the rest (Django, middleware, the view's own Python).

    .venv/bin/python bench/web_profile.py [--patients 60] [--requests 40] [--only worklist] [--top 25]

Seeds the same PostgreSQL database as bench/web.py (``<name>_webprof``, dropped at the end), logs
one clinician in (a session cookie) and gives one API client a token, then for each endpoint
prints: milliseconds of wall time per request (single-threaded here, so close to its CPU time),
queries per request and their share, and the split above. ``--top N`` also prints the N functions
with the most own time over all requests of each endpoint (cProfile). No network: Django's test
client calls the WSGI handler directly (gunicorn's own share is in bench/web.py's server CPU).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import web as webbench  # noqa: E402  (bench/web.py: seeding, database helpers)


class Split:
    """Accumulates seconds spent inside the wrapped callables (outermost call only)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.depth: dict[str, int] = {}

    def wrap(self, owner, attr: str, label: str):
        original = getattr(owner, attr)
        split = self

        def timed(*args, **kwargs):
            depth = split.depth.get(label, 0)
            split.depth[label] = depth + 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                split.depth[label] = depth
                if depth == 0:
                    split.totals[label] = split.totals.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)
        return original


@contextmanager
def sql_timer(split: Split):
    from django.db import connection

    counter = {"n": 0}

    def wrapper(execute, sql, params, many, context):
        counter["n"] += 1
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            split.totals["sql"] = split.totals.get("sql", 0.0) + time.perf_counter() - t0

    with connection.execute_wrapper(wrapper):
        yield counter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--requests", type=int, default=40, help="measured requests per endpoint")
    ap.add_argument("--only", default="")
    ap.add_argument("--top", type=int, default=0, help="print the N functions with most own time")
    ap.add_argument("--cold", action="store_true",
                    help="do not request every URL once before measuring (measure rendering, not the page cache)")
    ap.add_argument("--sql", action="store_true", help="print each query of one request and its time")
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()

    base = args.database_url or webbench.default_database_url()
    parts = urlsplit(base)
    db_url = urlunsplit(parts._replace(path=parts.path.rstrip("/").removesuffix("_webbench") + "_webprof"))
    tmp = Path(tempfile.mkdtemp(prefix="webprof-"))
    env = {
        "DJANGO_SETTINGS_MODULE": "melanoma_site.settings", "DATABASE_URL": db_url,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(40), "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "VAR_DIR": str(tmp / "var"), "MEDIA_ROOT": str(tmp / "media"), "MODEL_ROOT": str(tmp / "models"),
        "LOG_LEVEL": "WARNING", "NO_ALBUMENTATIONS_UPDATE": "1", "API_THROTTLE_USER": "1000000/minute",
    }
    os.environ.update(env)
    try:
        webbench.recreate_database(db_url)
        py = sys.executable
        subprocess.run([py, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, check=True)
        subprocess.run([py, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True)
        subprocess.run([py, "manage.py", "install_model", str(ROOT / "models" / "demo-v2" / "model.pt"),
                        "--name", "demo-v2-ensemble", "--activate"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        import django

        django.setup()
        data = webbench.seed(args.patients, n_users=2)
        return profile(args, data)
    finally:
        from django.db import connections

        connections.close_all()
        webbench.recreate_database(db_url, drop_only=True)
        shutil.rmtree(tmp, ignore_errors=True)


def profile(args, data) -> int:
    from django.template.base import Template
    from django.test import Client

    split = Split()
    split.wrap(Template, "render", "templates")
    from django.contrib.sessions.backends import db as session_db

    split.wrap(session_db.SessionStore, "load", "session")
    from django.contrib.auth import middleware as auth_mw

    split.wrap(auth_mw, "get_user", "user")
    from patients import services

    split.wrap(services, "record_list_access", "audit")
    split.wrap(services, "record_access", "audit")
    try:
        from rest_framework import serializers as drf_serializers
        from rest_framework.renderers import JSONRenderer

        split.wrap(drf_serializers.ListSerializer, "to_representation", "serializers")
        split.wrap(JSONRenderer, "render", "json")
        from rest_framework.authentication import TokenAuthentication

        split.wrap(TokenAuthentication, "authenticate", "user")
    except ImportError:
        pass

    page = Client()
    status = page.post("/accounts/login/", {"username": data["users"][0], "password": webbench.PASSWORD})
    if status.status_code != 302:
        raise SystemExit(f"login failed: {status.status_code}")
    api = Client(HTTP_AUTHORIZATION=f"Token {data['tokens'][0]}", HTTP_ACCEPT="application/json")
    patients = data["patients"]
    endpoints = {
        # floors: the fixed cost of an authenticated, audited list with nothing to show
        "page floor": (page, lambda n: "/patients/?q=no-such-patient"),
        "api floor": (api, lambda n: "/api/v1/patients/?search=no-such-patient"),
        "worklist": (page, lambda n: "/patients/"),
        "patient page": (page, lambda n: f"/patients/{patients[n % len(patients)]}/"),
        "api patients": (api, lambda n: "/api/v1/patients/"),
        "api lesions": (api, lambda n: "/api/v1/lesions/"),
        "api images": (api, lambda n: "/api/v1/images/"),
        "api analyses": (api, lambda n: "/api/v1/analyses/"),
    }
    if args.only:
        wanted = [x.strip() for x in args.only.split(",")]
        endpoints = {k: v for k, v in endpoints.items() if k in wanted}
    labels = ["sql", "templates", "serializers", "json", "session", "user", "audit"]
    print(f"{'endpoint':14s} {'ms/req':>7s} {'queries':>7s} {'bytes':>8s} | "
          + " ".join(f"{x:>11s}" for x in labels) + f" | {'rest':>6s}")
    for name, (client, path_of) in endpoints.items():
        # warm-up: compiled templates, and every distinct URL once (the pages' rendered-HTML cache,
        # patients.pagecache, then answers as it does in a running clinic; --cold skips that)
        for n in range(5 if args.cold else max(5, len(patients))):
            resp = client.get(path_of(n))
            assert resp.status_code == 200, (name, resp.status_code)
        split.totals.clear()
        t0 = time.perf_counter()
        with sql_timer(split) as queries:
            for n in range(args.requests):
                resp = client.get(path_of(n))
        wall = (time.perf_counter() - t0) / args.requests
        per = {k: v / args.requests for k, v in split.totals.items()}
        covered = sum(per.get(k, 0.0) for k in ("sql", "templates", "serializers", "json", "session", "user"))
        # SQL inside the session/user/audit look-ups is counted under "sql" too: "rest" is what is
        # left after SQL, templates, serializers and JSON (nested time counted once, roughly).
        rest = wall - per.get("sql", 0) - per.get("templates", 0) - per.get("serializers", 0) - per.get("json", 0)
        del covered
        print(f"{name:14s} {wall * 1000:7.1f} {queries['n'] / args.requests:7.1f} {len(resp.content):8d} | "
              + " ".join(f"{per.get(x, 0.0) * 1000:8.1f} ms" for x in labels) + f" | {rest * 1000:6.1f}")
        if args.sql:
            from django.db import connection
            from django.test.utils import CaptureQueriesContext

            with CaptureQueriesContext(connection) as ctx:
                client.get(path_of(1))
            for q in ctx.captured_queries:
                print(f"    {float(q['time']) * 1000:6.2f} ms  {q['sql'][:400]}")
        if args.top:
            prof = cProfile.Profile()
            prof.enable()
            for n in range(args.requests):
                client.get(path_of(n))
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            print(out.getvalue().split("\n", 6)[-1])
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("cumulative").print_stats(args.top * 2)
            print(out.getvalue().split("\n", 6)[-1])
    print("(sql includes the queries of the session, user and audit steps; 'rest' = total - sql - "
          "templates - serializers - json: middleware, URL resolving, the views' Python, the test client)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
