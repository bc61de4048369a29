"""The upload validation path: every refusal (bad files made here), re-encoding, metadata removal."""
import hashlib
import io
import struct
import zlib

import pytest
from PIL import ExifTags, Image, ImageCms, PngImagePlugin

from patients import uploads
from patients.uploads import ProcessedUpload, UploadRejected, process_upload
from tests.factories import image_bytes, uploaded


# --- making files -------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A real PNG header announcing width x height pixels, with (almost) no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


def frames(fmt: str, n=3, **kwargs) -> bytes:
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue", "white")[:n]]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], **kwargs)


def two_colour(width=40, height=20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    return img


def rejected(data, **kwargs) -> UploadRejected:
    with pytest.raises(UploadRejected) as e:
        process_upload(uploaded(data, **kwargs))
    return e.value


def stored_image(p: ProcessedUpload) -> Image.Image:
    img = Image.open(io.BytesIO(p.content))
    img.load()
    return img


def near(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


# --- refusals -----------------------------------------------------------------------------------

def test_empty_file_is_refused():
    assert rejected(b"").messages == ["file is empty"]


@pytest.mark.parametrize("data", [b"Just some clinical notes.\n", b"\x00\x01\x02\x03" * 50, b"GIF"])
def test_text_and_random_bytes_are_not_images(data):
    assert rejected(data, name="photo.jpg").messages[0].startswith("not an image")


def test_html_is_refused_even_named_jpg():
    e = rejected(b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>", name="x.jpg")
    assert e.messages[0].startswith("not an image") and "HTML" in e.messages[0]


@pytest.mark.parametrize("data", [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
])
def test_svg_is_refused(data):
    e = rejected(data, name="lesion.png", content_type="image/png")
    assert "SVG" in e.messages[0] and e.messages[0].startswith("not an image")


def test_pdf_is_refused():
    assert "PDF" in rejected(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", name="scan.jpg").messages[0]


def test_truncated_jpeg_is_refused():
    data = image_bytes("JPEG", width=400, height=300)
    assert rejected(data[: len(data) // 2]).messages[0].startswith("truncated or corrupt image")


def test_jpeg_with_only_a_header_is_refused():
    assert rejected(image_bytes("JPEG")[:200]).messages[0].startswith("truncated or corrupt image")


def test_corrupt_png_data_is_refused():
    data = bytearray(image_bytes("PNG", width=64, height=64))
    idat = data.index(b"IDAT")
    for i in range(idat + 20, idat + 60):
        data[i] ^= 0xFF
    assert rejected(bytes(data), name="a.png").messages[0].startswith("truncated or corrupt image")


def test_png_with_a_bad_header_checksum_is_refused():
    data = bytearray(image_bytes("PNG", width=64, height=64))
    data[29] ^= 0xFF  # inside the IHDR CRC
    assert rejected(bytes(data), name="a.png").messages[0].startswith("truncated or corrupt image")


def test_truncated_png_is_refused():
    data = image_bytes("PNG", width=200, height=200)
    assert rejected(data[: len(data) - 500], name="a.png").messages[0].startswith("truncated or corrupt image")


def test_pixel_cap_from_settings_refuses_a_decompression_bomb(settings):
    settings.UPLOAD_MAX_PIXELS = 50_000
    e = rejected(image_bytes("PNG", width=320, height=240), name="a.png")
    assert e.messages == ["image has 0.077 megapixels; the limit is 0.05"]
    assert e.code == "too_many_pixels"


def test_header_only_large_png_is_refused_from_its_header_before_decoding():
    # 8000 x 8000 = 64 MP: under Pillow's own limit, over the 50 MP default. The file holds no real
    # pixel data, so the refusal can only come from the size in the header (decoding would say corrupt).
    assert rejected(header_only_png(8000, 8000), name="big.png").messages == [
        "image has 64 megapixels; the limit is 50"]


def test_header_only_png_over_pillows_own_limit_is_a_bomb_too():
    # 20000 x 20000 = 400 MP: Pillow's DecompressionBombError at open.
    assert "megapixels" in rejected(header_only_png(20000, 20000), name="bomb.png").messages[0]


def test_pillow_decompression_bomb_warning_is_an_error(monkeypatch):
    # Between Pillow's limit and twice that, Pillow only warns; the warning must refuse the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    monkeypatch.setattr(uploads, "_pixel_limit", lambda: 10**9)  # our own cap out of the way
    e = rejected(image_bytes("PNG", width=320, height=240), name="a.png")
    assert "megapixels" in e.messages[0] and e.code == "too_many_pixels"


def test_file_over_the_size_limit_is_refused(settings):
    settings.UPLOAD_MAX_BYTES = 1000
    e = rejected(image_bytes("PNG", width=100, height=100), name="a.png")
    assert e.code == "too_large"
    assert e.messages[0].startswith("file is ") and e.messages[0].endswith("; the limit is 1000 bytes")


def test_size_limit_message_in_megabytes(settings):
    settings.UPLOAD_MAX_BYTES = 30 * 1024 * 1024

    class Declared:
        size = int(31.2 * 1024 * 1024)
        name = "huge.tif"

        def read(self, *args):
            raise AssertionError("an oversized upload must not be read")

        chunks = read

    with pytest.raises(UploadRejected) as e:
        process_upload(Declared())
    assert e.value.messages == ["file is 31.2 MB; the limit is 30 MB"]


def test_size_limit_is_enforced_while_reading_when_the_size_is_unknown(settings):
    settings.UPLOAD_MAX_BYTES = 1000
    stream = io.BytesIO(b"\xff\xd8\xff" + b"\x00" * 5_000_000)
    with pytest.raises(UploadRejected) as e:
        process_upload(stream)
    assert e.value.messages == ["file is larger than the limit of 1000 bytes"]
    assert stream.tell() <= 1024 * 1024  # stopped after the first chunk past the limit


@pytest.mark.parametrize("data", [frames("GIF"), encode(Image.new("P", (8, 8)), "GIF")],
                         ids=["animated GIF", "static GIF"])
def test_gif_is_refused_as_a_format(data):
    e = rejected(data, name="a.jpg", content_type="image/jpeg")
    assert e.messages[0].startswith("GIF images are not accepted") and e.code == "format"


def test_webp_is_refused():
    assert rejected(encode(Image.new("RGB", (8, 8)), "WEBP")).messages[0].startswith("WebP images are not accepted")


def test_animated_png_is_refused():
    e = rejected(frames("PNG"), name="a.png")
    assert e.messages[0].startswith("animated or multi-frame images are not accepted") and "3 frames" in e.messages[0]


def test_multi_page_tiff_is_refused():
    e = rejected(frames("TIFF", n=2), name="scan.tif")
    assert e.messages[0].startswith("animated or multi-frame images are not accepted")


def test_the_name_and_content_type_decide_nothing():
    png = image_bytes("PNG", width=50, height=40)
    p = process_upload(uploaded(png, name="photo.jpg", content_type="image/jpeg"))
    assert (p.original_format, p.format, p.extension) == ("PNG", "PNG", "png")
    p = process_upload(uploaded(image_bytes("JPEG"), name="page.html", content_type="text/html"))
    assert p.format == "JPEG"


# --- accepted formats and re-encoding -------------------------------------------------------------

@pytest.mark.parametrize("fmt, stored", [("JPEG", "JPEG"), ("PNG", "PNG"), ("TIFF", "PNG"), ("BMP", "PNG")])
def test_accepted_formats_are_re_encoded(fmt, stored):
    data = image_bytes(fmt, width=120, height=80)
    p = process_upload(uploaded(data, name=f"x.{fmt.lower()}"))
    assert (p.original_format, p.format, p.width, p.height) == (fmt, stored, 120, 80)
    img = stored_image(p)
    assert img.format == stored and img.mode == "RGB" and img.size == (120, 80)
    assert p.extension == {"JPEG": "jpg", "PNG": "png"}[stored]
    assert p.upload_sha256 == hashlib.sha256(data).hexdigest()
    assert p.sha256 == hashlib.sha256(p.content).hexdigest()
    thumb = Image.open(io.BytesIO(p.thumbnail))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256


def test_lossless_sources_keep_their_pixels():
    source = Image.open(io.BytesIO(image_bytes("PNG", width=64, height=48))).convert("RGB")
    p = process_upload(uploaded(encode(source, "TIFF", compression="tiff_lzw"), name="x.tif"))
    assert stored_image(p).tobytes() == source.tobytes()


def test_jpeg_is_stored_at_quality_95():
    p = process_upload(uploaded(image_bytes("JPEG", width=64, height=48)))
    # Pillow estimates quality from the quantisation tables; 95 gives luminance DC table entry 2.
    img = stored_image(p)
    assert img.quantization[0][0] <= 3


def test_thumbnail_size_comes_from_settings(settings):
    settings.THUMBNAIL_SIZE = 64
    p = process_upload(uploaded(image_bytes("JPEG", width=640, height=480)))
    assert Image.open(io.BytesIO(p.thumbnail)).size == (64, 48)


def test_mpo_camera_jpeg_keeps_only_the_primary_picture():
    first, second = two_colour(), Image.new("RGB", (40, 20), "green")
    p = process_upload(uploaded(encode(first, "MPO", save_all=True, append_images=[second])))
    assert p.original_format == "JPEG" and p.format == "JPEG"
    assert near(stored_image(p).getpixel((5, 10)), (255, 0, 0))


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    img = Image.new("I;16", (4, 2))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32896)
    img.putpixel((2, 0), 0)
    p = process_upload(uploaded(encode(img, "PNG"), name="x.png"))
    out = stored_image(p)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert abs(out.getpixel((1, 0))[0] - 128) <= 1
    assert out.getpixel((2, 0)) == (0, 0, 0)


def test_sixteen_bit_tiff_is_accepted():
    img = Image.new("I;16", (8, 8), 40000)
    p = process_upload(uploaded(encode(img, "TIFF"), name="x.tif"))
    assert p.original_format == "TIFF" and abs(stored_image(p).getpixel((0, 0))[0] - 156) <= 1


def test_cmyk_jpeg_becomes_rgb():
    p = process_upload(uploaded(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")))
    out = stored_image(p)
    assert out.mode == "RGB" and near(out.getpixel((8, 8)), (255, 0, 0), tol=60)


def test_transparent_png_is_flattened_on_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = stored_image(process_upload(uploaded(encode(img, "PNG"), name="x.png")))
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_png_with_transparency_is_flattened_on_white():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 200, 50, 50] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = stored_image(process_upload(uploaded(encode(img, "PNG", transparency=0), name="x.png")))
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (200, 50, 50)


def test_greyscale_and_bilevel_images_become_rgb():
    for mode in ("L", "1", "LA"):
        out = stored_image(process_upload(uploaded(encode(Image.new(mode, (8, 8)), "PNG"), name="x.png")))
        assert out.mode == "RGB"


# --- metadata -----------------------------------------------------------------------------------

def exif_with_everything() -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    exif[ExifTags.Base.Make] = "AcmeScope"
    exif[ExifTags.Base.Model] = "DermaCam 3000"
    exif[ExifTags.Base.ImageDescription] = "Jane Doe MRN 12345"
    inner = exif.get_ifd(ExifTags.IFD.Exif)
    inner[ExifTags.Base.MakerNote] = b"ACME-SECRET-MAKERNOTE"
    inner[ExifTags.Base.UserComment] = b"ASCII\x00\x00\x00secret user comment"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 36.0)
    return exif


SECRETS = [b"AcmeScope", b"DermaCam", b"Jane Doe", b"ACME-SECRET", b"secret", b"Exif", b"xmpmeta",
           b"ICC_PROFILE", b"GPS"]


def test_exif_gps_maker_notes_comments_and_xmp_are_gone_and_orientation_applied():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(two_colour(40, 20), "JPEG", quality=95, exif=exif_with_everything(),
                  comment=b"secret comment", xmp=b"<x:xmpmeta>secret xmp</x:xmpmeta>", icc_profile=icc)
    source = Image.open(io.BytesIO(data))  # the test file really carries all of it
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert source.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] == b"ACME-SECRET-MAKERNOTE"
    assert {"exif", "comment", "xmp", "icc_profile"} <= set(source.info)

    p = process_upload(uploaded(data, name="IMG_0001.JPG"))
    out = stored_image(p)
    assert not out.getexif()
    assert not {"exif", "comment", "xmp", "icc_profile"} & set(out.info)
    for secret in SECRETS:
        assert secret not in p.content, secret
        assert secret not in p.thumbnail, secret
    # Orientation 6 applied: 40x20 (left red, right blue) becomes 20x40 with red on top.
    assert (p.width, p.height) == (20, 40) == out.size
    assert near(out.getpixel((10, 5)), (255, 0, 0)) and near(out.getpixel((10, 35)), (0, 0, 255))
    thumb = Image.open(io.BytesIO(p.thumbnail))
    assert thumb.size[1] > thumb.size[0] and not thumb.getexif()


@pytest.mark.parametrize("orientation, top_left_colour, size", [
    (1, (255, 0, 0), (40, 20)),  # as stored
    (3, (0, 0, 255), (40, 20)),  # rotated 180: blue now on the left
    (8, (0, 0, 255), (20, 40)),  # rotated 90 counter-clockwise: blue (right half) on top
])
def test_other_orientations_are_applied(orientation, top_left_colour, size):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    out = stored_image(process_upload(uploaded(encode(two_colour(), "JPEG", quality=95, exif=exif))))
    assert out.size == size and near(out.getpixel((2, 2)), top_left_colour)


def test_png_text_chunks_exif_and_icc_are_gone():
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Dr Secret")
    info.add_text("Comment", "Jane Doe MRN 12345", zip=True)
    info.add_itxt("Description", "secret international text", lang="en", tkey="Beschreibung")
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "AcmeScope"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(two_colour(), "PNG", pnginfo=info, exif=exif, icc_profile=icc)
    assert {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP"} <= set(png_chunk_types(data))

    p = process_upload(uploaded(data, name="scan.png"))
    assert set(png_chunk_types(p.content)) <= {b"IHDR", b"IDAT", b"IEND"}
    for secret in (b"Secret", b"Jane Doe", b"AcmeScope", b"international"):
        assert secret not in p.content
    assert stored_image(p).tobytes() == two_colour().tobytes()


def test_tiff_tags_are_gone():
    data = encode(two_colour(), "TIFF", tiffinfo={270: "Jane Doe MRN 12345", 315: "Dr Secret"})
    p = process_upload(uploaded(data, name="scan.tif"))
    assert p.format == "PNG" and b"Jane Doe" not in p.content and b"Dr Secret" not in p.content


def test_process_upload_accepts_bytes_and_plain_streams():
    data = image_bytes("JPEG")
    assert process_upload(data).upload_sha256 == process_upload(io.BytesIO(data)).upload_sha256


def test_refuses_to_run_with_truncated_images_allowed(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        process_upload(image_bytes("JPEG"))
