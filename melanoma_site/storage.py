"""Private media storage on an S3-compatible object store (AWS S3, MinIO, Ceph, ...).

Selected by ``STORAGE=s3`` (settings.py). Web, beat and workers on different machines then share
the media through the bucket, never through a local disk. Media stay private: objects are written
with the ``private`` canned ACL, and this storage has **no URLs** at all, so no public or presigned
(query-string) link can reach a client by accident. Every image, thumbnail and heatmap is streamed
by the web process after the visibility check and audit (``patients.media.serve_stored_file``).
"""
from __future__ import annotations

from storages.backends.s3 import S3Storage


class PrivateS3Storage(S3Storage):
    default_acl = "private"
    file_overwrite = False  # generated names never collide; never replace an object silently
    querystring_auth = True  # irrelevant (no URLs), but never unsigned if a subclass adds them

    def url(self, name, parameters=None, expire=None, http_method=None):
        raise NotImplementedError(
            "private media have no URL: stream them through the access-checked views "
            "(patients.media.serve_stored_file)")
