import io

import numpy as np
import torch
from PIL import Image

from training.preprocessing import IMAGENET_MEAN, IMAGENET_STD, describe, load_rgb, to_batch


def test_load_rgb_path_and_fileobj(tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((50, 80, 3)) * 255).astype("uint8"))
    p = tmp_path / "a.jpg"
    img.save(p)
    a = load_rgb(str(p), 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    with open(p, "rb") as f:
        b = load_rgb(f, 32)
    assert np.array_equal(a, b)


def test_exif_orientation_and_modes(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255  # left half white
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: the white half ends up on top
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_rgb(str(p), 40).astype(float)
    assert out[:20].mean() > 200 and out[20:].mean() < 50
    gray = tmp_path / "g.png"
    Image.new("LA", (30, 20), (128, 255)).save(gray)
    assert load_rgb(str(gray), 16).shape == (16, 16, 3)


def test_large_jpeg_uses_draft(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 100, 50)).save(big, quality=80)
    with Image.open(big) as im:
        im.draft("RGB", (96, 96))
        assert im.size == (500, 375)  # decoded at 1/8 scale
    a = load_rgb(str(big), 96)
    assert a.shape == (96, 96, 3) and abs(int(a[..., 0].mean()) - 200) < 4


def test_to_batch():
    a = np.full((8, 8, 3), 255, np.uint8)
    b = np.zeros((8, 8, 3), np.uint8)
    t = to_batch([a, b])
    assert t.shape == (2, 3, 8, 8) and t.dtype == torch.float32
    assert t.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    assert torch.allclose(t[1, :, 0, 0], torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    d = describe(96)
    assert d["input_size"] == 96 and d["mean"] == list(IMAGENET_MEAN)
