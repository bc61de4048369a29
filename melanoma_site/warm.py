"""Work every web process would otherwise do on its first request, done once before it serves.

Under gunicorn the application is loaded in the master and forked (``preload_app``); each worker,
at its start and again whenever it is recycled (``WEB_MAX_REQUESTS``), paid on its first requests
for importing every view module, the API's renderers and filters, compiling the templates and
hashing the build for the page cache: 75-350 ms for its first request (the worklist, 6-9 ms once
warm), 5-20 ms more for the first use of each other page. Warmed, the first request took 30-60 ms
(its database connection and session are still its own).
Done here, at import of the WSGI application, the master does it once and every fork inherits it.

Nothing here connects to the database or the cache: connections must not cross a fork.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def warm_web() -> float:
    """Import the URLconf (every view), compile the site's templates, load the static files'
    manifest, resolve DRF's settings, make the cache clients and hash the page cache's build.
    Returns the seconds taken."""
    t0 = time.perf_counter()
    from django.template import TemplateDoesNotExist, TemplateSyntaxError, engines
    from django.urls import get_resolver

    get_resolver().reverse_dict  # noqa: B018 -- imports every urls and views module, builds reverse()
    for engine in engines.all():
        for folder in getattr(engine, "dirs", []) or []:
            root = Path(folder)
            for path in sorted(root.rglob("*.html")):
                try:
                    engine.get_template(str(path.relative_to(root)))
                except (TemplateDoesNotExist, TemplateSyntaxError):  # a broken template fails its page, not the boot
                    log.exception("template %s could not be compiled", path)
    from django.contrib.staticfiles.storage import staticfiles_storage

    staticfiles_storage.base_url  # noqa: B018 -- makes the storage: reads the hashed names' manifest
    from rest_framework.settings import IMPORT_STRINGS, api_settings

    for name in IMPORT_STRINGS:  # the classes and functions DRF imports on first use
        if not name.startswith("TEST_"):
            getattr(api_settings, name)
    from django.conf import settings
    from django.core.cache import caches

    for alias in settings.CACHES:
        getattr(caches[alias], "_cache", None)  # Redis: makes the client (imports redis); connects on first use
    from patients import pagecache

    pagecache.build_id()
    from django.db import connections

    connections.close_all()  # none should be open; a connection shared with forked workers would be corrupted
    seconds = time.perf_counter() - t0
    log.info("web process warmed in %.0f ms", seconds * 1000)
    return seconds
