"""Rendered HTML of the clinical pages, cached under the change stamps of what it shows.

A key names everything the fragment depends on: the patient (id and creation time, so a recreated
database never meets an old entry), its change stamp and the global stamp (``patients.stamps``),
the day (ages), the build (a hash of the templates, so a deploy never serves old markup) and
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
from pathlib import Path

from django.conf import settings
from django.core.cache import caches
from django.db import connection

from . import stamps

_build: str | None = None


def build_id() -> str:
    """A hash of every template file (this process' markup) and the static files' manifest."""
    global _build
    if _build is None:
        h = hashlib.sha256()
        for root in [Path(d) for t in settings.TEMPLATES for d in t.get("DIRS", [])]:
            for path in sorted(root.rglob("*.html")):
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


def get_many(keys) -> dict:
    if not usable():
        return {}
    return caches[settings.PAGE_CACHE_ALIAS].get_many(list(keys))


def set_many(values: dict) -> None:
    if values and usable():
        caches[settings.PAGE_CACHE_ALIAS].set_many(values, timeout=settings.PAGE_CACHE_SECONDS)
