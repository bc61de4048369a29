"""Generated demo data: dermoscopy-like images made here (no real patient data) for a first run."""
import io

import numpy as np
from PIL import Image, ImageFilter


def _smooth_noise(rng, shape, scale):
    small = rng.random((max(2, shape[0] // scale), max(2, shape[1] // scale)))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def lesion_image(*, seed: int, size: int = 512, atypical: bool = False) -> bytes:
    """A dermoscopy-like JPEG: skin background, vignette, a pigmented lesion with a wobbly border.

    ``atypical`` lesions are larger, more asymmetric and multi-coloured (blue-grey and dark brown
    areas), the look the "ugly duckling" sign is about.
    """
    rng = np.random.default_rng(seed)
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([226, 178, 152], np.float32) * (0.92 + 0.08 * rng.random())
    img = np.empty((h, w, 3), np.float32)
    img[...] = skin
    img *= (0.9 + 0.1 * _smooth_noise(rng, (h, w), 16))[..., None]

    cx, cy = w * (0.45 + 0.1 * rng.random()), h * (0.45 + 0.1 * rng.random())
    radius = size * (0.26 if atypical else 0.17) * (0.85 + 0.3 * rng.random())
    angle = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(xx - cx, yy - cy)
    wobble = 1.0
    for k, amp in ((2, 0.10), (3, 0.08), (5, 0.05), (9, 0.03)):
        wobble = wobble + amp * (2.5 if atypical else 1.0) * np.sin(k * angle + rng.random() * 6.28)
    edge = radius * wobble
    inside = np.clip((edge - dist) / (size * (0.01 if atypical else 0.03)), 0, 1)

    base = np.array([120, 78, 55], np.float32) if not atypical else np.array([70, 45, 40], np.float32)
    lesion = np.empty_like(img)
    lesion[...] = base * (0.85 + 0.3 * _smooth_noise(rng, (h, w), 24))[..., None]
    if atypical:
        blue = _smooth_noise(rng, (h, w), 40) > 0.6
        lesion[blue] = lesion[blue] * 0.4 + np.array([95, 105, 130], np.float32) * 0.6
        dark = _smooth_noise(rng, (h, w), 30) > 0.7
        lesion[dark] *= 0.55
    # A faint pigment network.
    net = (np.sin(xx / 5.0 + rng.random() * 6) * np.sin(yy / 5.0)) > 0.6
    lesion[net] *= 0.85
    img = img * (1 - inside[..., None]) + lesion * inside[..., None]

    vignette = 1 - 0.35 * (np.hypot(xx - w / 2, yy - h / 2) / (0.72 * w)) ** 4
    img *= np.clip(vignette, 0, 1)[..., None]
    img += rng.normal(0, 3, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=92)
    return buf.getvalue()
