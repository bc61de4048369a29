"""Private media: image files and thumbnails are streamed only to users who may see the patient.

Nothing in the media storage (MEDIA_ROOT, or the S3 bucket with STORAGE=s3) has a URL of its own;
the bytes are read through the storage API and streamed by the web process. These views (and the API's ``images/{id}/file/``
and ``/thumbnail/`` actions, which share :func:`serve_image`) look the image up through
``Patient.objects.visible_to(user)``: another clinician's image answers 404, exactly like an image
that does not exist. Every fetch is recorded in the audit trail as a "viewed" event.
"""
from __future__ import annotations

import logging

from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponseNotModified
from django.shortcuts import get_object_or_404
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_safe

from . import services
from .models import LesionImage
from .selectors import visible_images

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
# The browser may keep a private copy but must revalidate every use ("no-cache"), so each view is
# checked against visible_to() again (a 304 when unchanged: the ETag is the stored file's SHA-256).
CACHE_CONTROL = "private, no-cache"

FILE = "file"
THUMBNAIL = "thumbnail"


def get_visible_image(user, pk) -> LesionImage:
    """The image ``pk`` if its patient is visible to ``user``; Http404 otherwise (never 403)."""
    return get_object_or_404(visible_images(user), pk=pk)


def serve_image(request, image: LesionImage, kind: str = FILE, *, user=None):
    """Stream the stored file (or thumbnail) of an image the caller already looked up as visible."""
    if kind == THUMBNAIL:
        field, content_type, extension = image.thumbnail, "image/jpeg", "jpg"
        etag = f'"{image.sha256}-thumbnail"' if image.sha256 else None
    else:
        field = image.file
        content_type = CONTENT_TYPES.get(image.format, "application/octet-stream")
        extension = EXTENSIONS.get(image.format, "bin")
        etag = f'"{image.sha256}"' if image.sha256 else None
    filename = f"image-{image.pk}{'-thumbnail' if kind == THUMBNAIL else ''}.{extension}"
    return serve_stored_file(request, image=image, field=field, content_type=content_type, etag=etag,
                             filename=filename, user=user)


def serve_stored_file(request, *, image: LesionImage, field, content_type: str, etag: str | None,
                      filename: str, user=None):
    """Stream a private file that belongs to ``image`` (the image itself, its thumbnail, or a file
    derived from it by another app, such as an explanation heatmap), to a caller who already
    looked the image up through ``visible_images``. Recorded in the audit trail as a view of the
    image; the browser must revalidate every use."""
    user = user if user is not None else request.user
    if not field or not field.name:
        raise Http404("No file stored for this image.")
    services.record_access(user=user, obj=image)
    if etag and etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        response = HttpResponseNotModified()
    else:
        try:
            handle = field.storage.open(field.name, "rb")
        except FileNotFoundError:
            logger.error("stored file missing for image %s: %s", image.pk, field.name)
            raise Http404("The stored file is missing.") from None
        response = FileResponse(handle, content_type=content_type, as_attachment=False, filename=filename)
    if etag:
        response["ETag"] = etag
    response["Cache-Control"] = CACHE_CONTROL
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    patch_vary_headers(response, ("Cookie", "Authorization"))
    return response


@require_safe
@login_required
def image_file(request, pk):
    return serve_image(request, get_visible_image(request.user, pk), FILE)


@require_safe
@login_required
def image_thumbnail(request, pk):
    return serve_image(request, get_visible_image(request.user, pk), THUMBNAIL)
