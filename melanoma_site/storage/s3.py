"""Private media storage on an S3-compatible object store (AWS S3, MinIO, Ceph, ...).

Selected by ``STORAGE=s3`` (settings.py). Web, beat and workers on different machines then share
the media through the bucket, never through a local disk. Media stay private: objects are written
with the ``private`` canned ACL, and this storage has **no URLs** at all, so no public or presigned
(query-string) link can reach a client by accident. Every image, thumbnail and heatmap is streamed
by the web process after the visibility check and audit (``patients.media.serve_stored_file``).

A store that cannot be reached (or answers an error other than "no such key") raises
:class:`melanoma_site.storage.StorageUnavailable`; a missing key is ``FileNotFoundError`` as with
local files.
"""
from __future__ import annotations

import functools
import logging

from botocore.exceptions import BotoCoreError, ClientError
from storages.backends.s3 import S3Storage

from . import StorageUnavailable

log = logging.getLogger(__name__)


def _translated(method):
    @functools.wraps(method)
    def wrapper(self, name, *args, **kwargs):
        try:
            return method(self, name, *args, **kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise FileNotFoundError(f"File does not exist: {name}") from exc
            log.error("media store error on %s %s: %s", method.__name__, name, exc)
            raise StorageUnavailable(f"the media store refused {method.__name__.strip('_')}: {exc}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS, no credentials...
            log.error("media store unreachable on %s %s: %s", method.__name__, name, exc)
            raise StorageUnavailable(f"the media store is unreachable: {exc}") from exc

    return wrapper


class PrivateS3Storage(S3Storage):
    default_acl = "private"
    file_overwrite = False  # generated names never collide; never replace an object silently
    querystring_auth = True  # irrelevant (no URLs), but never unsigned if a subclass adds them

    @_translated
    def _open(self, name, mode="rb"):
        f = super()._open(name, mode)
        if "r" in mode:
            f.file  # noqa: B018 -- download now, so a store failure surfaces here, not mid-response
        return f

    _save = _translated(S3Storage._save)
    delete = _translated(S3Storage.delete)
    exists = _translated(S3Storage.exists)
    listdir = _translated(S3Storage.listdir)
    size = _translated(S3Storage.size)
    get_modified_time = _translated(S3Storage.get_modified_time)

    def url(self, name, parameters=None, expire=None, http_method=None):
        raise NotImplementedError(
            "private media have no URL: stream them through the access-checked views "
            "(patients.media.serve_stored_file)")
