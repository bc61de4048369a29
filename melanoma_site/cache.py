"""The shared cache (API throttling counters) on Redis, tolerant of a Redis outage.

Redis is also the Celery broker; while it is down, clinical records must stay usable (uploads,
edits: the inference outbox keeps the work pending). A cache that cannot reach Redis answers like
an empty cache (``get`` gives the default, writes are dropped) after a short timeout and logs a
warning, instead of failing the request with a 500. Throttling therefore fails open for the
duration of an outage; login lockout (django-axes) is kept in the database and is unaffected.
"""
from __future__ import annotations

import logging
import time

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

log = logging.getLogger(__name__)

_last_warning = 0.0


def _unavailable(op: str, exc: Exception) -> None:
    global _last_warning
    now = time.monotonic()
    if now - _last_warning > 30:  # one line per 30 s during an outage, not one per request
        _last_warning = now
        log.warning("cache unavailable (%s: %s: %s): answering as an empty cache", op, type(exc).__name__, exc)


def _tolerant(name: str, fallback):
    method = getattr(RedisCacheClient, name)

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (self._lib.exceptions.ConnectionError, self._lib.exceptions.TimeoutError, OSError) as exc:
            _unavailable(name, exc)
            return fallback(*args, **kwargs) if callable(fallback) else fallback

    wrapper.__name__ = name
    return wrapper


class _TolerantClient(RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients: dict = {}

    def get_client(self, key=None, *, write=False):
        # One redis.Redis per connection pool: Django makes a new one (with its ~170 response
        # callbacks) for every cache operation, three per API request through the throttle and
        # the page cache. A client is thread-safe: each command borrows a pooled connection.
        pool = self._get_connection_pool(write)
        client = self._clients.get(id(pool))
        if client is None:
            client = self._clients[id(pool)] = self._client(connection_pool=pool)
        return client

    # add() is the page cache's "I build it" lock (patients.pagecache.get_or_build): during an
    # outage every request builds for itself rather than waiting for a value that cannot come.
    add = _tolerant("add", True)
    get = _tolerant("get", lambda key, default: default)
    set = _tolerant("set", None)
    touch = _tolerant("touch", False)
    delete = _tolerant("delete", False)
    get_many = _tolerant("get_many", lambda keys: {})
    has_key = _tolerant("has_key", False)
    incr = _tolerant("incr", lambda key, delta: delta)
    set_many = _tolerant("set_many", lambda data, timeout: [])
    delete_many = _tolerant("delete_many", None)
    clear = _tolerant("clear", False)


class TolerantRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = _TolerantClient
