"""Defect stamps: a training defect pasted onto the good surface of another part (copy-paste).

Why: on Magnetic-Tile tiles never trained on, the model fires on the dark pits of good tiles and
passes thin breaks (docs/benchmarks.md, ninth session): with ~140 training tiles it sees each
defect only on the one tile that has it. Pasting small defects onto many good surfaces shows the
same defect against exposures and textures it never appeared on (copy-paste augmentation,
Ghiasi et al. 2021; common for surface-defect sets with few defective parts).

The blend is multiplicative. A stamp keeps the defect's pixels relative to its own surround
(crop / the median of a ring of good surface around it), and pasting multiplies the target surface
by that ratio under a feathered alpha. A blowhole then stays as much darker than its new surround
as it was than its old one, whatever the two exposures, and the target's texture shows through
the defect instead of a pasted rectangle's seams. The label is the component's own mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

RING = 3  # px of surface around a component that measures its background level
MAX_RATIO = 4.0  # a stamp pixel may brighten its target at most this much (a dark surround's glints)


@dataclass(frozen=True)
class Stamp:
    """One defect component, cut with a margin of surface: what `paste` needs to place it."""

    ratio: np.ndarray  # float32 h x w (x C): crop / background level of the surround
    alpha: np.ndarray  # float32 h x w: 1 on the defect, feathered to 0 over the margin
    mask: np.ndarray  # uint8 h x w: the component's label (0/1)
    source: int  # index of the image it was cut from


def cut_stamps(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_side: int) -> list[Stamp]:
    """Every defect component whose crop (with a RING margin) fits in `max_side` x `max_side`.

    Larger components (an uneven area, a long fray) are left out: they cannot move to another
    surface without taking their part's geometry along. So are components without enough good
    surface around them to measure a background level (e.g. filling the crop).
    """
    stamps: list[Stamp] = []
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RING + 1, 2 * RING + 1))
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if not mask.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
        H, W = mask.shape
        for k in range(1, n):
            x, y, w, h = (int(v) for v in stats[k, :4])
            if max(w, h) + 2 * RING > max_side:
                continue
            y0, x0, y1, x1 = max(0, y - RING), max(0, x - RING), min(H, y + h + RING), min(W, x + w + RING)
            comp = (labels[y0:y1, x0:x1] == k).astype(np.uint8)
            ring = (cv2.dilate(comp, kernel) > 0) & (mask[y0:y1, x0:x1] == 0)
            if ring.sum() < 8:
                continue
            crop = image[y0:y1, x0:x1].astype(np.float32)
            level = np.maximum(np.median(crop[ring], axis=0), 8.0)  # per channel; a black surround would divide by ~0
            ratio = np.clip(crop / level, 0.0, MAX_RATIO).astype(np.float32)
            alpha = cv2.GaussianBlur(cv2.dilate(comp, np.ones((3, 3), np.uint8)).astype(np.float32), (5, 5), 1.0)
            alpha = np.maximum(alpha, comp.astype(np.float32))
            stamps.append(Stamp(ratio, alpha, comp, i))
    return stamps


def paste(image: np.ndarray, mask: np.ndarray, stamp: Stamp, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` and `mask` with `stamp` placed at (y, x); the stamp must fit inside."""
    h, w = stamp.mask.shape
    if y < 0 or x < 0 or y + h > mask.shape[0] or x + w > mask.shape[1]:
        raise ValueError(f"stamp {h}x{w} at ({y}, {x}) does not fit in {mask.shape[0]}x{mask.shape[1]}")
    image, mask = image.copy(), mask.copy()
    region = image[y : y + h, x : x + w].astype(np.float32)
    alpha = stamp.alpha if region.ndim == 2 else stamp.alpha[..., None]
    image[y : y + h, x : x + w] = np.clip(region * (1.0 + alpha * (stamp.ratio - 1.0)), 0, 255).round().astype(image.dtype)
    mask[y : y + h, x : x + w] |= stamp.mask
    return image, mask
