"""Training-time augmentation (albumentations 2.x) over cached uint8 HxWx3 arrays."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import albumentations as A  # noqa: E402


def train_transform(size: int, strength: float = 1.0) -> A.Compose:
    """Flips/transposes/90-degree rotations (dermoscopy has no canonical orientation),
    shift-scale-rotate, brightness/contrast, hue/saturation, blur or noise, coarse dropout.
    ``strength`` scales the photometric/geometric ranges (1.0 = the defaults below)."""
    s = float(strength)
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Transpose(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(translate_percent=(-0.0625 * s, 0.0625 * s), scale=(1 - 0.1 * s, 1 + 0.1 * s),
                 rotate=(-45 * s, 45 * s), interpolation=cv2.INTER_LINEAR,
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s, p=0.5),
        A.HueSaturationValue(hue_shift_limit=int(10 * s), sat_shift_limit=int(20 * s),
                             val_shift_limit=int(10 * s), p=0.5),
        A.OneOf([
            A.GaussianBlur(blur_limit=(3, 5), p=1.0),
            A.GaussNoise(std_range=(0.02, 0.06 * s), p=1.0),
        ], p=0.3),
        # sources differ in resolution (84 px to full-size dermoscopy): show the network sharp
        # images at lower resolutions too, so "blurry" is not a cue for "which source"
        A.Downscale(scale_range=(0.35, 0.9), p=0.25 * min(s, 1.0)),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                        hole_width_range=(0.05, 0.15), fill=0, p=0.3),
    ])


def describe(size: int, strength: float = 1.0) -> list[str]:
    """A readable list of the augmentations, for the model card."""
    return [repr(t).split("(")[0] for t in train_transform(size, strength).transforms]
