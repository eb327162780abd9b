"""Joint image + mask augmentation (albumentations 2).

Geometric transforms move image and mask together (mask with nearest-neighbour, so it stays
binary and aligned); photometric transforms touch the image only. Everything is mild on
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


def _transforms(strength: str, square: bool) -> list[A.BasicTransform]:
    geo: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if square:  # a 90° turn of a non-square image would change its shape
        geo.append(A.RandomRotate90(p=0.5))
    if strength == "light":
        return [*geo, A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
    return [
        *geo,
        A.Affine(
            scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), shear=(-3, 3),
            interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101, p=0.5,
        ),
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
                                      mask_interpolation=cv2.INTER_NEAREST)

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or mask.dtype != np.uint8:
            raise ValueError(f"augment expects uint8 image and mask, got {image.dtype} and {mask.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
        if not pipes:
            return image, mask
        h, w = mask.shape
        out = pipes[h == w](image=image, mask=mask)
        return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])

    return augment
