"""Image-quality signal per frame: sharpness and exposure, cheap enough for every part.

A lens that gets dirty or loses focus, or a lamp that fades, changes the frames long before the
fail rate shows it; the station page and drift alarms watch these numbers. The frame is first
subsampled to at most QUALITY_SIDE pixels on its long side (a strided view, then an area
resize), so the cost is well under a millisecond whatever the camera size.

- sharpness: variance of the Laplacian of the downscaled grey (colour: green) frame (higher = sharper). It is
  comparable between frames of one station and camera, not across cameras.
- mean: mean grey level (0-255); clipped: share of pixels at 0 or 255 (under/over-exposed).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

QUALITY_SIDE = 256


def _grey_small(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    step = max(1, max(h, w) // (QUALITY_SIDE * 2))  # strided view first: no pass over a 5 MP frame
    img = image[::step, ::step]
    if img.ndim == 3:  # green: the channel closest to luminance, without a colour conversion
        img = img[:, :, 0] if img.shape[2] == 1 else img[:, :, 1]
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img)
    h, w = img.shape[:2]
    scale = QUALITY_SIDE / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return img


def _clipped_pixels(grey: np.ndarray) -> int:
    """Pixels at 0 or 255. A frame without either (the common case) is told by one min/max pass,
    instead of two masks and two counts per part."""
    low, high, _, _ = cv2.minMaxLoc(grey)
    if low > 0 and high < 255:
        return 0
    return int(cv2.countNonZero(cv2.inRange(grey, 0, 0)) + cv2.countNonZero(cv2.inRange(grey, 255, 255)))


def image_quality(image: np.ndarray) -> dict[str, Any]:
    """{"sharpness", "mean", "clipped"} of one frame (see the module docstring)."""
    grey = _grey_small(image)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    _, std = cv2.meanStdDev(lap)
    clipped = _clipped_pixels(grey) / grey.size
    return {"sharpness": round(float(std[0, 0]) ** 2, 2), "mean": round(float(cv2.mean(grey)[0]), 2),
            "clipped": round(clipped, 5)}
