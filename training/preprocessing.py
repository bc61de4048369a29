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
# Input normalisations by the name a model card records: "imagenet" (torchvision/pretrainedmodels
# statistics: the SE-ResNet50) and "tf-lite" (the EfficientNet-Lite ImageNet weights were trained
# on (x - 127.5) / 127.5, i.e. mean = std = 0.5 on the 0-1 scale).
NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "tf-lite": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

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


_STATS = {name: (torch.tensor(m, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                 torch.tensor(s, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
          for name, (m, s) in NORMALISATIONS.items()}


def normalisation_of(card_or_preprocessing: dict | None) -> str:
    """The normalisation name a model card (or its ``preprocessing`` entry) records; cards written
    before there was a choice used the ImageNet statistics."""
    d = card_or_preprocessing or {}
    d = d.get("preprocessing", d) if isinstance(d.get("preprocessing"), dict) else d
    name = d.get("normalisation", "imagenet")
    if name not in NORMALISATIONS:
        raise ValueError(f"unknown input normalisation {name!r}; expected one of {sorted(NORMALISATIONS)}")
    return name


def to_batch(arrays, normalisation: str = "imagenet") -> torch.Tensor:
    """Stack uint8 HxWx3 arrays into a normalised float32 NCHW tensor in channels_last memory."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 4:
        stacked = arrays
    else:
        stacked = np.stack(list(arrays), axis=0)
    if stacked.ndim != 4 or stacked.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 arrays, got shape {stacked.shape}")
    t = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2).float()
    mean, std = _STATS[normalisation]
    t = (t - mean) / std
    return t.contiguous(memory_format=torch.channels_last)


def describe(size, normalisation: str = "imagenet") -> dict:
    """What the model card records about preprocessing (enough to reimplement it)."""
    mean, std = NORMALISATIONS[normalisation]
    return {
        "function": "training.preprocessing.load_rgb + to_batch",
        "input_size": int(size),
        "decode": "Pillow; JPEG draft mode (DCT scaling) to >= size; EXIF orientation applied; RGB",
        "resize": f"squash (no crop) to {int(size)}x{int(size)}, Pillow BILINEAR (antialiased), "
                  f"reducing_gap={REDUCING_GAP}",
        "scale": "pixel / 255",
        "normalisation": normalisation,
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW float32, channels_last memory format",
    }
