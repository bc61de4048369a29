"""The one validation path for uploaded images (pages, API and the demo seed all come through here).

What a file *is* is decided by decoding it with Pillow, never by its name or Content-Type. Accepted:
JPEG, PNG, TIFF and BMP that Pillow decodes completely as a single frame within the size and pixel
limits. Everything else is refused with an :class:`UploadRejected` whose message says why.

What is stored is a re-encoded copy: orientation applied, converted to 8-bit sRGB (alpha flattened on
white) and rebuilt from bare pixels, so no metadata survives (EXIF, GPS, maker notes, XMP, ICC
profiles, comments, PNG text chunks). JPEG sources are stored as JPEG (quality 95), lossless sources
(PNG, TIFF, BMP) as PNG.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
ACCEPTED_DESCRIPTION = "JPEG, PNG, TIFF or BMP"
# MPO is how Pillow opens camera JPEGs that carry an extra preview/depth picture (Multi-Picture
# Format). The primary picture is an ordinary JPEG; only that one is kept.
JPEG_FAMILY = ("JPEG", "MPO")
JPEG_QUALITY = 95
THUMBNAIL_QUALITY = 85

# Magic numbers, used only to word the refusal of a file Pillow did not accept (never to accept one).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
_REFUSED_FORMATS = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_DOCUMENTS = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive or office document"),
    (b"\x7fELF", "a program"),
    (b"MZ", "a program"),
)


class UploadRejected(ValidationError):
    """An uploaded file that is not stored; the message says why.

    Raised with a plain message for one file (``process_upload``) or with a dict mapping each
    refused file's client name to its reasons (``services.upload_images``; see ``message_dict``).
    """


@dataclass(frozen=True)
class ProcessedUpload:
    content: bytes  # the re-encoded image to store
    extension: str  # "jpg" or "png"
    format: str  # stored format: "JPEG" or "PNG"
    original_format: str  # what the upload was decoded as: JPEG, PNG, TIFF, BMP
    width: int
    height: int
    thumbnail: bytes  # JPEG, at most THUMBNAIL_SIZE px on the long side
    upload_sha256: str  # of the bytes as uploaded
    sha256: str  # of ``content``
    quality: dict = None  # assess_quality(): measurements and warnings (never a reason to refuse)

    @property
    def size_bytes(self) -> int:
        return len(self.content)


def human_size(n: int) -> str:
    """31.2 MB, 512 KB, 900 bytes (1 MB = 1024 * 1024 bytes)."""
    if n >= 1024 * 1024:
        return f"{_trim(n / (1024 * 1024))} MB"
    if n >= 1024:
        return f"{_trim(n / 1024)} KB"
    return f"{n} byte{'s' if n != 1 else ''}"


def _trim(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _megapixels(n: int) -> str:
    """64, 61.4, 0.077 (small caps, as in tests, keep two significant digits)."""
    return _trim(n / 1_000_000) if n >= 1_000_000 else f"{n / 1_000_000:.2g}"


def _reject(message: str, code: str) -> UploadRejected:
    return UploadRejected(message, code=code)


def read_upload(file, *, max_bytes: int | None = None) -> bytes:
    """All bytes of an uploaded file, refusing an empty one or one over the size limit.

    The declared size is checked before anything is read, and reading stops as soon as the limit
    is passed, so an oversized upload is never held in memory whole.
    """
    limit = settings.UPLOAD_MAX_BYTES if max_bytes is None else max_bytes
    too_large = "file is {size}; the limit is {limit}"
    declared = getattr(file, "size", None)
    if isinstance(declared, int) and declared > limit:
        raise _reject(too_large.format(size=human_size(declared), limit=human_size(limit)), "too_large")
    if isinstance(file, (bytes, bytearray, memoryview)):
        data = bytes(file)
    else:
        if hasattr(file, "seek"):
            try:
                file.seek(0)
            except (OSError, ValueError):
                pass
        chunks = file.chunks() if hasattr(file, "chunks") else iter(lambda: file.read(1024 * 1024), b"")
        buf = bytearray()
        for chunk in chunks:
            buf += chunk
            if len(buf) > limit:
                break
        data = bytes(buf)
    if len(data) > limit:
        if isinstance(declared, int) and declared >= len(data):
            raise _reject(too_large.format(size=human_size(declared), limit=human_size(limit)), "too_large")
        # Size unknown and reading stopped early: the true size is not known, only that it is too big.
        raise _reject(f"file is larger than the limit of {human_size(limit)}", "too_large")
    if not data:
        raise _reject("file is empty", "empty")
    return data


def _sniff_refusal(data: bytes) -> UploadRejected:
    """Why a file Pillow would not open is refused, in words (the bytes decide, not the name)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return _reject(f"truncated or corrupt image (the file starts like a {name} but does not "
                           "decode)", "corrupt")
    for magic, name in _REFUSED_FORMATS:
        if data.startswith(magic):
            return _reject(f"{name} images are not accepted; upload {ACCEPTED_DESCRIPTION}", "format")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _reject(f"WebP images are not accepted; upload {ACCEPTED_DESCRIPTION}", "format")
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"heif"):
        return _reject(f"HEIC/AVIF images are not accepted; upload {ACCEPTED_DESCRIPTION}", "format")
    for magic, what in _DOCUMENTS:
        if data.startswith(magic):
            return _reject(f"not an image (this is {what})", "not_image")
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head or (head.startswith(b"<?xml") and b"svg" in head):
        return _reject("not an image: SVG (vector graphics) files are not accepted; upload "
                       f"{ACCEPTED_DESCRIPTION}", "svg")
    if head.startswith(b"<") and (b"<html" in head or b"<!doctype html" in head or b"<script" in head):
        return _reject("not an image (this is an HTML document)", "html")
    return _reject(f"not an image (or not a format we accept: {ACCEPTED_DESCRIPTION})", "not_image")


def _pixel_limit() -> int:
    limit = settings.UPLOAD_MAX_PIXELS
    if Image.MAX_IMAGE_PIXELS:  # Pillow's own bomb limit, whose warning we treat as an error
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    return limit


def _bomb(pixels: int | None, limit: int) -> UploadRejected:
    if pixels:
        return _reject(f"image has {_megapixels(pixels)} megapixels; the limit is {_megapixels(limit)}",
                       "too_many_pixels")
    return _reject(f"image has more than {_megapixels(limit)} megapixels (possible decompression bomb)",
                   "too_many_pixels")


def _pixels_from_bomb_message(exc: Exception) -> int | None:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return int(m.group(1)) if m else None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float greyscale scaled, CMYK/palette converted, alpha flattened on white.

    An embedded ICC profile is used to convert the colours to sRGB and then dropped.
    """
    icc = img.info.get("icc_profile")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit greyscale (PNG/TIFF). Pillow's own conversion clips at 255; scale instead.
        img = img.convert("I") if mode != "I" else img
        lo, hi = img.getextrema()
        full = 65535 if hi <= 65535 else hi
        scale = 1.0 if hi <= 255 else 255 / full
        img = img.point(lambda v: v * scale).convert("L")
        mode = "L"
    elif mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 if hi <= 1.0 else 1.0
        img = img.point(lambda v: v * scale).convert("L")
        mode = "L"

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        icc = icc if mode == "RGBA" else None
        mode = "RGB"

    if icc and mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                img, src, ImageCms.createProfile("sRGB"), outputMode="RGB",
                renderingIntent=ImageCms.Intent.PERCEPTUAL)
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            logger.info("ICC profile not usable; converting colours without it")
    return img if img.mode == "RGB" else img.convert("RGB")


def _bare(img: Image.Image) -> Image.Image:
    """A new image from the pixels alone: no info dict, EXIF, ICC, XMP, comments or text chunks."""
    return Image.frombytes("RGB", img.size, img.tobytes())


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))


def decode(data: bytes) -> tuple[Image.Image, str]:
    """Decode the bytes completely as one accepted image; (RGB image, original format)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # never set by this project; refuse to run half-blind
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False for uploads")
    limit = _pixel_limit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # 1. Identify from the header only, and check the pixel count before decoding anything.
            try:
                img = _open(data)
            except UnidentifiedImageError:
                raise _sniff_refusal(data) from None
            original_format = img.format or "?"
            width, height = img.size
            if width < 1 or height < 1:
                raise _reject("truncated or corrupt image (it has no pixels)", "corrupt")
            if width * height > limit:
                raise _bomb(width * height, limit)
            frames = getattr(img, "n_frames", 1)
            if original_format not in JPEG_FAMILY and (frames > 1 or getattr(img, "is_animated", False)):
                raise _reject("animated or multi-frame images are not accepted "
                              f"(this {original_format} has {frames} frames)", "multi_frame")
            # 2. Structural check (PNG chunk CRCs up to IEND), then decode every pixel.
            _open(data).verify()
            img = _open(data)
            if original_format == "MPO":
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except UploadRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(_pixels_from_bomb_message(exc), limit) from None
        except MemoryError:
            raise _reject("image is too large to decode", "too_many_pixels") from None
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            logger.info("upload refused as corrupt: %s: %s", type(exc).__name__, exc)
            raise _reject("truncated or corrupt image", "corrupt") from None
    try:
        rgb = _to_rgb(img)
    except Exception as exc:
        logger.info("upload refused, colour mode %s: %s: %s", img.mode, type(exc).__name__, exc)
        raise _reject(f"unsupported colour format ({img.mode}); export the image as 8-bit RGB",
                      "colour_mode") from None
    return rgb, "JPEG" if original_format == "MPO" else original_format


# --- image quality: warnings only, never a refusal --------------------------------------------------

QUALITY_VERSION = 1
MIN_SHORT_SIDE = 400  # px; smaller images are accepted with a warning
BLUR_ANALYSIS_SIDE = 512  # the sharpness is measured on a copy at most this large (scale-independent)
MIN_SHARPNESS = 10.0  # variance of the Laplacian of the grey image below this: blurred
DARK_MEAN, BRIGHT_MEAN = 45.0, 215.0  # mean grey level (0..255) outside these: under/over-exposed
CLIPPED_FRACTION = 0.25  # or this share of the centre crushed to black / blown to white


def _laplacian_variance(grey):
    """Variance of the 4-neighbour Laplacian of a 2-D float array (a standard focus measure)."""
    import numpy as np

    g = np.asarray(grey, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = (g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1]) - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def assess_quality(img: Image.Image) -> dict:
    """Measure size, sharpness and exposure of an RGB image and word a warning for each problem.

    Returns ``{"version", "short_side", "sharpness", "brightness", "dark_fraction",
    "bright_fraction", "warnings": [{"code", "message"}, ...]}``. Uploads are never refused for
    quality: a clinician may have no better picture. Pillow and numpy only (no torch here).
    """
    import numpy as np

    width, height = img.size
    short = min(width, height)
    grey = img.convert("L")
    probe = grey.copy()
    probe.thumbnail((BLUR_ANALYSIS_SIDE, BLUR_ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    sharpness = _laplacian_variance(probe)
    # Exposure is judged on the central half (width and height), where the lesion is: dermoscopes
    # leave black corners outside the round field of view, which are not under-exposure.
    pw, ph = probe.size
    pixels = np.asarray(probe, dtype=np.uint8)[ph // 4: ph - ph // 4 or ph, pw // 4: pw - pw // 4 or pw]
    brightness = float(pixels.mean())
    dark = float((pixels <= 10).mean())
    bright = float((pixels >= 245).mean())
    warnings_: list[dict] = []
    if short < MIN_SHORT_SIDE:
        warnings_.append({"code": "small", "message": (
            f"small image ({width}×{height} px; at least {MIN_SHORT_SIDE} px on the short side is "
            "recommended)")})
    if sharpness < MIN_SHARPNESS:
        warnings_.append({"code": "blurred", "message": (
            f"looks blurred (sharpness {sharpness:.0f}; below {MIN_SHARPNESS:.0f} is usually out of focus "
            "or motion-blurred)")})
    if brightness < DARK_MEAN or dark > CLIPPED_FRACTION:
        warnings_.append({"code": "underexposed", "message": (
            f"looks under-exposed (mean brightness {brightness / 2.55:.0f}%, {dark:.0%} of pixels black)")})
    elif brightness > BRIGHT_MEAN or bright > CLIPPED_FRACTION:
        warnings_.append({"code": "overexposed", "message": (
            f"looks over-exposed (mean brightness {brightness / 2.55:.0f}%, {bright:.0%} of pixels white)")})
    return {
        "version": QUALITY_VERSION, "short_side": short, "sharpness": round(sharpness, 1),
        "brightness": round(brightness, 1), "dark_fraction": round(dark, 4), "bright_fraction": round(bright, 4),
        "warnings": warnings_,
    }


def process_upload(file) -> ProcessedUpload:
    """Validate one uploaded file and return the re-encoded copy to store; raise UploadRejected.

    ``file`` is a Django ``UploadedFile``/``File``, any binary file object, or bytes.
    """
    data = read_upload(file)
    img, original_format = decode(data)
    clean = _bare(img)
    if original_format == "JPEG":
        content = _encode(clean, "JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
        fmt, extension = "JPEG", "jpg"
    else:
        content = _encode(clean, "PNG", compress_level=6)
        fmt, extension = "PNG", "png"
    size = int(settings.THUMBNAIL_SIZE)
    thumb = clean.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    thumbnail = _encode(thumb, "JPEG", quality=THUMBNAIL_QUALITY)
    return ProcessedUpload(
        content=content,
        extension=extension,
        format=fmt,
        original_format=original_format,
        width=clean.width,
        height=clean.height,
        thumbnail=thumbnail,
        upload_sha256=hashlib.sha256(data).hexdigest(),
        sha256=hashlib.sha256(content).hexdigest(),
        quality=assess_quality(clean),
    )
