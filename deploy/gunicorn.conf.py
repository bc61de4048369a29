"""gunicorn configuration of the web tier: ``gunicorn melanoma_site.wsgi -c deploy/gunicorn.conf.py``.

Used by run.sh, the production compose file and bench/web.py. Every value can be set from the
environment. Chosen by measurement on 2 cores (bench/web.py; README "Performance"):

- one worker process per core (``WEB_WORKERS``, default: the CPUs this process may use), so the
  pages' Python work runs in parallel on every core; more processes than cores only add switches;
- ``gthread`` workers with a few threads each (``WEB_THREADS``, default 4): a thread waiting on
  PostgreSQL or a slow client leaves the core to another request of the same process;
- the application is loaded once before forking (``preload_app``): workers start in a fraction of
  a second and share the imported code; database connections are opened after the fork, one per
  thread, and kept (``CONN_MAX_AGE`` in the settings);
- no keep-alive by default (``WEB_KEEPALIVE``, seconds; 0: a connection per request): a kept-alive
  connection stays with the worker process that accepted it, and when the clients' connections
  happened to land on one process (it accepted first), that one process -- one core, its GIL --
  served them all while the other idled: bench/web.py runs came out either fine or at half speed
  with the same code. A connection per request lets whichever process is free accept the next
  one (on loopback or behind a proxy on the same host a connection costs a fraction of a
  millisecond; the browser's keep-alive ends at the proxy);
- workers are recycled after ``WEB_MAX_REQUESTS`` requests (with jitter) to bound memory growth;
  loading the application also warms it (``melanoma_site/warm.py``: every view imported, templates
  compiled), so a recycled worker's first request took 30-60 ms instead of 75-350 ms; with recycles
  every few seconds (``WEB_MAX_REQUESTS=400``) p99 went from 340-480 ms to 160-230 ms;
- the objects of the preloaded application are frozen out of the garbage collector before the
  fork (``gc.freeze``; ``WEB_GC_FREEZE=false``: off): its full collections no longer walk the
  hundreds of thousands of objects every request leaves alone (collections were about 2 ms of a
  large API list's request in process; under gunicorn the difference was within the machine's
  noise), and forked workers share those pages instead of copying them when it would touch them.
"""
import gc
import os

bind = os.environ.get("WEB_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS") or len(os.sched_getaffinity(0)))
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
preload_app = True
keepalive = int(os.environ.get("WEB_KEEPALIVE", "0"))
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
graceful_timeout = 30
max_requests = int(os.environ.get("WEB_MAX_REQUESTS", "5000"))
max_requests_jitter = max_requests // 10
# The heartbeat file on a RAM disk where there is one (a disk write per beat otherwise).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# Access log: "-" (stdout) or a path; off by default (one write per request).
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "info")


def pre_fork(server, worker):
    if os.environ.get("WEB_GC_FREEZE", "true").lower() not in ("0", "false", "no"):
        gc.freeze()
