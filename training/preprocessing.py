"""The ONE preprocessing definition, shared by training, evaluation and the inference worker.

``load_rgb`` decodes an image file to a ``size x size`` uint8 RGB array (JPEG draft mode so huge
photos are decoded at reduced resolution, EXIF orientation applied, squashed -- not cropped -- to a
square); ``to_batch`` turns such arrays into a normalised float32 NCHW channels_last tensor.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's BILINEAR resize is antialiased (a triangle filter scaled to the reduction); with
# reducing_gap it first does a cheap integer box reduction, then the filter over the last <=3x.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0


def load_rgb(source, size: int) -> np.ndarray:
    """Decode ``source`` (a path or a binary file object) to a uint8 array of shape (size, size, 3)."""
    with Image.open(source) as img:
        if img.format == "JPEG":
            # decode at the smallest 1/1, 1/2, 1/4, 1/8 scale that is still >= size in both axes
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive
        raise ValueError(f"decoded image has shape {arr.shape}, expected {(size, size, 3)}")
    return arr


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0


def to_batch(arrays) -> torch.Tensor:
    """Stack uint8 HxWx3 arrays into a normalised float32 NCHW tensor in channels_last memory."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 4:
        stacked = arrays
    else:
        stacked = np.stack(list(arrays), axis=0)
    if stacked.ndim != 4 or stacked.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 arrays, got shape {stacked.shape}")
    t = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2).float()
    t = (t - _MEAN) / _STD
    return t.contiguous(memory_format=torch.channels_last)


def describe(size) -> dict:
    """What the model card records about preprocessing (enough to reimplement it)."""
    return {
        "function": "training.preprocessing.load_rgb + to_batch",
        "input_size": int(size),
        "decode": "Pillow; JPEG draft mode (DCT scaling) to >= size; EXIF orientation applied; RGB",
        "resize": f"squash (no crop) to {int(size)}x{int(size)}, Pillow BILINEAR (antialiased), "
                  f"reducing_gap={REDUCING_GAP}",
        "scale": "pixel / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW float32, channels_last memory format",
    }
