"""Worker liveness: leases, heartbeats, and handing back the claims of workers that died.

Every worker (its main process) holds a ``WorkerLease`` named ``"<node name> pid <main pid>"``;
the claims its pool processes take are stamped with that name (``claim_name``). The main process
writes a heartbeat every WORKER_HEARTBEAT_SECONDS from a daemon thread. A lease is dead when

- it was closed (the worker shut down), or
- it is on this host and its process is gone (or the pid now belongs to a younger process), or
- its heartbeat is older than WORKER_LEASE_SECONDS (a worker on another machine).

When a worker becomes ready it hands back (``claims.release_claims_of_workers``) the analyses
claimed by dead workers and sends them at once, so after a ``kill -9`` and a restart the work
resumes within seconds instead of waiting ANALYSIS_STALE_SECONDS; the sweeper does the same on
every sweep (a dead worker on another machine that is never restarted). ``attempts`` is kept:
an image that kills every worker still ends failed after ANALYSIS_MAX_ATTEMPTS.

No torch here (the web process and beat import this module through the app config).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

from celery import signals
from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Q
from django.utils import timezone

log = logging.getLogger(__name__)

_main_pid: int | None = None  # in a prefork child: the worker's main process (set after fork)
_lease_name: str | None = None  # in the main process, once its lease is written
_stop = threading.Event()


def _heartbeat_seconds() -> float:
    return float(getattr(settings, "WORKER_HEARTBEAT_SECONDS", 5))


def _lease_seconds() -> float:
    return float(getattr(settings, "WORKER_LEASE_SECONDS", 60))


def lease_name(nodename: str, pid: int) -> str:
    return f"{nodename} pid {pid}"[:200]


def claim_name(task) -> str:
    """The name a task's claims are stamped with: its worker's lease (or the host name when the task
    body runs outside a worker, e.g. called directly)."""
    nodename = getattr(task.request, "hostname", None)
    if not nodename:
        return socket.gethostname()
    return lease_name(nodename, _main_pid or os.getpid())


# --- is a process still there? -------------------------------------------------------------------

def _process_start_epoch(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat; fields[0] is field 3
        with open("/proc/stat", "rb") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith(b"btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _process_alive(pid: int, started_at) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: cannot tell more
    started = _process_start_epoch(pid)
    # The pid was reused by a process started after the lease (more than a few seconds later).
    return started is None or started <= started_at.timestamp() + 30


def dead_worker_names(*, exclude: str | None = None) -> list[str]:
    """Names of leases whose worker no longer exists (see the module docstring)."""
    from .models import WorkerLease

    now = timezone.now()
    host = socket.gethostname()
    dead = []
    expired = now - timedelta(seconds=_lease_seconds())
    for lease in WorkerLease.objects.exclude(name=exclude or ""):
        if lease.stopped_at is not None or lease.heartbeat_at < expired:
            dead.append(lease.name)
        elif lease.hostname == host and not _process_alive(lease.pid, lease.started_at):
            dead.append(lease.name)
    return dead


def reclaim_dead_claims(*, exclude: str | None = None, send: bool = True) -> list[int]:
    """Hand back (queued again, attempts kept) the analyses claimed by dead workers and send them;
    forget leases that are dead and hold nothing. Returns the analysis ids."""
    from .models import Analysis, WorkerLease
    from .services import claims, outbox

    dead = dead_worker_names(exclude=exclude)
    if not dead:
        return []
    ids = claims.release_claims_of_workers(workers=dead)
    if ids:
        log.warning("handed back %d analyses claimed by workers that no longer exist (%s)", len(ids),
                    ", ".join(sorted(dead))[:500])
        if send:
            outbox.send_analyses(ids)
    held = set(Analysis.objects.filter(status=Analysis.Status.RUNNING, worker__in=dead)
               .values_list("worker", flat=True))
    WorkerLease.objects.filter(name__in=[d for d in dead if d not in held]).filter(
        Q(stopped_at__isnull=False) | Q(heartbeat_at__lt=timezone.now() - timedelta(days=1))
        | Q(hostname=socket.gethostname())).delete()
    return ids


# --- the worker's hooks ----------------------------------------------------------------------------

def _beat() -> None:
    from .models import WorkerLease

    interval = _heartbeat_seconds()
    while not _stop.wait(interval):
        try:
            close_old_connections()
            now = timezone.now()
            if not WorkerLease.objects.filter(name=_lease_name).update(heartbeat_at=now):
                # The row went (deleted by hand, a test database flushed): write it again.
                WorkerLease.objects.update_or_create(name=_lease_name, defaults=dict(
                    hostname=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now,
                    stopped_at=None))
        except Exception:  # noqa: BLE001 -- the database may be back at the next beat
            log.warning("worker heartbeat failed", exc_info=True)
            try:
                connection.close()
            except Exception:  # noqa: BLE001
                pass
    connection.close()


def start_lease(nodename: str) -> str:
    """Write this worker's lease, start its heartbeat and hand back the claims of dead workers."""
    global _lease_name
    from .models import WorkerLease

    now = timezone.now()
    name = lease_name(nodename, os.getpid())
    WorkerLease.objects.update_or_create(name=name, defaults=dict(
        hostname=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now, stopped_at=None))
    _lease_name = name
    _stop.clear()
    threading.Thread(target=_beat, name="worker-lease-heartbeat", daemon=True).start()
    t0 = time.monotonic()
    ids = reclaim_dead_claims(exclude=name)
    log.info("worker lease %s; %d analyses of dead workers handed back in %.0f ms", name, len(ids),
             (time.monotonic() - t0) * 1000)
    return name


def stop_lease() -> None:
    from .models import WorkerLease

    _stop.set()
    if _lease_name:
        try:
            WorkerLease.objects.filter(name=_lease_name).update(stopped_at=timezone.now())
        except Exception:  # noqa: BLE001
            log.warning("could not close the worker lease", exc_info=True)


@signals.worker_init.connect(dispatch_uid="inference.workers.priority")
def _lower_priority(**kwargs):
    """The worker runs at a lower CPU priority than the web tier (WORKER_NICE, default 10): on a
    machine shared by both, a clinician's page waits for no model, while the analyses take every
    cycle the pages leave (on an idle machine they run at full speed). Set in the main process
    before the pool forks, so every child inherits it."""
    nice = int(getattr(settings, "WORKER_NICE", 0))
    if nice > 0:
        try:
            now = os.nice(0)
            if now < nice:
                os.nice(nice - now)
            log.info("worker CPU priority: nice %d", os.nice(0))
        except OSError as exc:  # not permitted (a container without the capability): keep going
            log.warning("could not lower the worker's CPU priority: %s", exc)


@signals.worker_process_init.connect(dispatch_uid="inference.workers.child")
def _on_child_start(**kwargs):
    global _main_pid
    _main_pid = os.getppid()


@signals.worker_ready.connect(dispatch_uid="inference.workers.ready")
def _on_worker_ready(sender=None, **kwargs):
    nodename = getattr(sender, "hostname", None) or getattr(getattr(sender, "controller", None), "hostname", None)
    try:
        start_lease(nodename or f"celery@{socket.gethostname()}")
    except Exception:  # noqa: BLE001 -- never keep a worker from starting; the sweeper covers the rest
        log.exception("could not start the worker lease")
    finally:
        close_old_connections()


@signals.worker_shutdown.connect(dispatch_uid="inference.workers.shutdown")
def _on_worker_shutdown(**kwargs):
    stop_lease()
