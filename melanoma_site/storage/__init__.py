"""Media storage helpers. The S3-compatible backend is ``melanoma_site.storage.s3.PrivateS3Storage``
(STORAGE=s3); this module imports no cloud library, so the web process, beat and tasks may import it."""
from __future__ import annotations


class StorageUnavailable(OSError):
    """The media store could not be reached or refused to work (network, credentials, 5xx).

    Not a property of the file: a request answers 503 (try again; nothing was stored), a worker
    gives its claim back for another try instead of failing the analysis."""


RETRY_AFTER_SECONDS = 30


class StorageUnavailableMiddleware:
    """A request that failed because the media store is unavailable answers 503 with Retry-After
    (in the API's error format under /api/), not a 500: the client may simply try again. Uploads
    store nothing in that case (their transaction rolls back; files written before are removed)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, StorageUnavailable):
            return None
        from django.http import HttpResponse, JsonResponse

        from melanoma_site.api import API_PREFIX, error_body

        detail = "The media store is unavailable; try again shortly."
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            detail += " Nothing was stored."
        if request.path.startswith(API_PREFIX):
            response = JsonResponse(error_body("unavailable", detail), status=503)
        else:
            response = HttpResponse(detail, status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
