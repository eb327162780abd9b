"""Joint image + mask augmentation (albumentations 2).

Geometric transforms move image and mask together; photometric transforms touch the image only.
The mask is warped SOFT (float, linear interpolation) and binarised afterwards (`binarise`): with
nearest-neighbour a rotated or shrunk 1 px crack broke into dots and a single-pixel defect could
vanish (issue 15). Flips and 90° turns are exact. Everything is mild on
purpose: a blowhole of 10-30 pixels must still be there after augmentation, so there is no
strong blur, no downscaling beyond 10 % and no cutout. Shapes never change: RandomRotate90
is used only for square inputs, and Affine reflects at the border instead of growing the image.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import cv2
import numpy as np

# albumentations phones PyPI at import to look for updates; a line PC has no business doing that.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
STRENGTHS = ("none", "light", "default")
# a warped label pixel keeps >= ~0.2 of its weight in some output pixel (bilinear, scale >= 0.9,
# any rotation), so this keeps every label pixel while ignoring interpolation round-off
MASK_LOW = 0.05
MASK_FULL = 0.95  # a pixel this covered marks the inside of a defect: its faint neighbours are its outline


def binarise(soft: np.ndarray) -> np.ndarray:
    """Warped soft mask -> uint8 0/1 without losing thin or tiny defects, nor growing large ones.

    A pixel is defect if >= half covered, or if it is covered at all (> MASK_LOW) and has no nearly
    fully covered neighbour: the faint pixels of a warped 1 px line or single pixel are all there
    is of it and are kept, while the faint rim next to the solid inside of a blob is dropped, so a
    blob's outline does not grow by a pixel at every warp (that would bias the IoU).
    """
    soft = np.asarray(soft, dtype=np.float32)
    near_full = cv2.dilate(soft, np.ones((3, 3), np.uint8)) >= MASK_FULL
    return ((soft >= 0.5) | ((soft > MASK_LOW) & ~near_full)).astype(np.uint8)


def affine(p: float = 0.5, mask_interpolation: int = cv2.INTER_LINEAR) -> A.Affine:
    """The default strength's affine warp (scripts/label_counts.py replays it with either mask mode)."""
    return A.Affine(
        scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), shear=(-3, 3),
        interpolation=cv2.INTER_LINEAR, mask_interpolation=mask_interpolation,
        border_mode=cv2.BORDER_REFLECT_101, p=p,
    )


def _transforms(strength: str, square: bool) -> list[A.BasicTransform]:
    geo: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if square:  # a 90° turn of a non-square image would change its shape
        geo.append(A.RandomRotate90(p=0.5))
    if strength == "light":
        return [*geo, A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
    return [
        *geo,
        affine(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.6),
        A.RandomGamma(gamma_limit=(85, 115), p=0.3),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.3),  # fraction of 255: about 1-5 grey levels
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.6), p=0.1),  # slight defocus only
    ]


def build_augmentation(strength: str = "default", seed: int | None = None) -> Augment:
    """Return aug(image, mask) -> (image, mask) for uint8 HxW / HxWx3 images and {0,1} masks.

    With a seed the sequence of results is reproducible (two augmenters built with the same
    seed give the same outputs call after call). "none" returns the inputs unchanged.
    """
    if strength not in STRENGTHS:
        raise ValueError(f"augmentation strength must be one of {STRENGTHS}, got {strength!r}")
    pipes: dict[bool, A.Compose] = {}
    if strength != "none":
        for square in (True, False):
            pipes[square] = A.Compose(_transforms(strength, square), seed=seed,
                                      mask_interpolation=cv2.INTER_LINEAR)

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or mask.dtype != np.uint8:
            raise ValueError(f"augment expects uint8 image and mask, got {image.dtype} and {mask.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
        if not pipes:
            return image, mask
        h, w = mask.shape
        out = pipes[h == w](image=image, mask=mask.astype(np.float32))
        return np.ascontiguousarray(out["image"]), binarise(out["mask"])

    return augment
