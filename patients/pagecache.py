"""Rendered HTML of the clinical pages (and the rows of the API lists), cached under the change
stamps of what it shows.

A key names everything the fragment depends on: the patient (id and creation time, so a recreated
database never meets an old entry), its change stamp and the global stamp (``patients.stamps``),
the day (ages), the build (a hash of the templates and code, so a deploy never serves old markup) and
whatever else the caller passes (e.g. the "2 hours ago" text of a worklist row). A change to the
records changes a stamp, so the key changes: entries are never invalidated, only left to expire.
That also makes a per-process cache (LocMemCache, the embedded default) as correct as a shared
one (Redis).

Not used inside a transaction (tests, ATOMIC_REQUESTS): the transaction's own changes are stamped
only when it commits. Not used either where the database keeps no stamps, or with
``PAGE_CACHE_SECONDS=0``. What is cached is markup shared by every member of the care team: no
CSRF token, no user name, no messages (those stay in the page around it). Reading a page is
audited before its fragments are looked up, cached or not.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from django.conf import settings
from django.core.cache import caches
from django.db import connection
from django.utils import timezone, translation

from . import stamps

_build: str | None = None


CODE_PACKAGES = ("patients", "inference", "melanoma_site")  # their Python decides what lists show


def build_id() -> str:
    """A hash of this process' markup and code: every template, the Python of the apps that make
    pages and API rows, and the static files' manifest. A deploy never meets an entry of the last."""
    global _build
    if _build is None:
        h = hashlib.sha256()
        base = Path(settings.BASE_DIR)
        roots = [(Path(d), "*.html") for t in settings.TEMPLATES for d in t.get("DIRS", [])]
        roots += [(base / package, "*.py") for package in CODE_PACKAGES]
        for root, pattern in roots:
            for path in sorted(root.rglob(pattern)):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        manifest = Path(settings.STATIC_ROOT or "") / "staticfiles.json"
        if settings.STATIC_ROOT and manifest.is_file():
            h.update(manifest.read_bytes())
        _build = h.hexdigest()[:12]
    return _build


def usable() -> bool:
    return (settings.PAGE_CACHE_SECONDS > 0 and stamps.enabled()
            and not connection.in_atomic_block)


def patient_key(kind: str, patient, *extra) -> str:
    """The key of a fragment about ``patient`` (annotated by ``stamps.with_stamps``)."""
    created = patient.created_at.timestamp() if patient.created_at else ""
    parts = [kind, build_id(), patient.pk, created, patient.stamp, patient.global_stamp, *extra]
    raw = ":".join(str(p) for p in parts)
    return "page:" + hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def list_key(request, listing: str) -> str | None:
    """The key of an API list page for ``request``: the visible patients with their stamps and
    creation times (who sees what, and what changed: a patient that joins or leaves the user's
    teams changes it too), the global stamp, the list and its full query, the scheme and host (the
    rows' absolute URLs), the time zone and language. None when the cache is not used here, the
    user sees no patient, or more than PAGE_CACHE_MAX_PATIENTS (the key would cost more than it
    saves)."""
    if not usable():
        return None
    from .selectors import visible_patients

    limit = settings.PAGE_CACHE_MAX_PATIENTS
    rows = list(stamps.with_stamps(visible_patients(request.user).select_related(None))
                .order_by("pk").values_list("pk", "stamp", "global_stamp", "created_at")[:limit + 1])
    if not rows or len(rows) > limit:
        return None
    h = hashlib.blake2b(digest_size=16)
    for part in ("api", build_id(), listing, request.get_full_path(), request.build_absolute_uri("/"),
                 timezone.get_current_timezone_name(), translation.get_language(), rows[0][2]):
        h.update(f"{part}\x1f".encode())
    # with each patient's creation time: a recreated database never meets an old entry
    h.update(",".join(f"{pk}:{stamp}:{created.timestamp()}" for pk, stamp, _, created in rows).encode())
    return "list:" + h.hexdigest()


def get_or_build(key, build):
    """The value cached under ``key``, or ``build()``'s, cached -- built by ONE request at a time.

    A change to the records changes the keys of every list that shows them, and the requests in
    flight at that moment all miss together: without this, each of twenty clients on the analyses
    list would build the same 372 KB page (11 ms, against 6.5 ms for a hit, in process). At
    bench/web.py's load the difference was within the machine's noise (a worker commits a few times
    a second); it bounds the cost of a burst of commits to one build per key. The first to miss
    builds (it holds a short lock entry in the cache, ``cache.add`` being atomic there); the others
    wait up to ``PAGE_CACHE_BUILD_WAIT`` seconds for its value, polling, and build it
    themselves only if it has not come by then (the builder died, or is much slower than that). The
    key names the stamps read before building, so a value found under it is never older than what
    the waiting request would have built."""
    if not key or not usable():
        return build()
    cache = caches[settings.PAGE_CACHE_ALIAS]
    value = cache.get(key)
    if value is not None:
        return value
    wait = settings.PAGE_CACHE_BUILD_WAIT
    lock = key + ":building" if wait > 0 else None
    if lock is not None and not cache.add(lock, 1, timeout=max(1, int(wait * 4))):
        lock = None  # another request builds it: wait for its value
        deadline, pause = time.monotonic() + wait, 0.002
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.02)
            value = cache.get(key)
            if value is not None:
                return value
    try:
        value = build()
        cache.set(key, value, timeout=settings.PAGE_CACHE_SECONDS)
        return value
    finally:
        if lock is not None:
            cache.delete(lock)


def get_many(keys) -> dict:
    if not usable():
        return {}
    return caches[settings.PAGE_CACHE_ALIAS].get_many(list(keys))


def set_many(values: dict) -> None:
    if values and usable():
        caches[settings.PAGE_CACHE_ALIAS].set_many(values, timeout=settings.PAGE_CACHE_SECONDS)
