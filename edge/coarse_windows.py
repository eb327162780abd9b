"""Where a coarse map's full-resolution values matter: the full map's exact peak and the boxes around
the coarse pixels that can reach a level, without building the full map (edge.postprocess.postprocess_map).

A bilinear output pixel is a convex combination of at most 4 coarse neighbours, so it exceeds the
largest of them by rounding at most (a few float32 ulps of the map's magnitude: `_slack`). A full
pixel >= level therefore has a coarse neighbour >= level - slack, and coarse pixel (cy, cx) weighs only
in full rows [(cy - 1) k, (cy + 2) k) and the matching columns.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from edge.preprocess import CoarseMap

_BILINEAR_REACH = 2  # coarse pixels around a candidate whose k x k blocks hold every full pixel it weighs in


def _slack(coarse: np.ndarray) -> float:
    """Bound on how far a bilinear output can exceed its neighbours: two rounded products and a sum per
    direction, 16 float32 ulps of the largest magnitude for a wide margin."""
    return 16 * float(np.finfo(np.float32).eps) * max(abs(float(coarse.max())), abs(float(coarse.min())))


def reaching(coarse: np.ndarray, level: float, strict: bool = False) -> np.ndarray:
    """uint8 mask of the coarse pixels that can give a full pixel >= level (> level when `strict`)."""
    bound = np.float64(level) - _slack(coarse)  # float64: the comparison itself adds no rounding
    hit = np.greater(coarse, bound) if strict else np.greater_equal(coarse, bound)
    return hit.view(np.uint8)


def support_boxes(cmap: CoarseMap, candidates: np.ndarray, margin: int) -> list[tuple[int, int, int, int]]:
    """Full-resolution boxes (y0, y1, x0, x1) holding every full pixel the candidate coarse pixels weigh in,
    plus `margin` full pixels around them; the boxes are at least `margin` apart from each other's
    candidates' pixels, so what happens within `margin` of one cluster never involves another.

    Clusters come from the candidates grown by the reach, labelled; their bounding rectangles are filled
    and labelled again until no two touch (a ring around a speck becomes one box)."""
    k = cmap.k
    reach = _BILINEAR_REACH + math.ceil(margin / k)
    x, y, w, h = cv2.boundingRect(candidates)
    if w == 0 or h == 0:
        return []
    ch, cw = candidates.shape
    oy, ox = max(0, y - reach), max(0, x - reach)
    grown = cv2.dilate(candidates[oy : min(ch, y + h + reach), ox : min(cw, x + w + reach)],
                       np.ones((2 * reach + 1, 2 * reach + 1), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
    while n > 2:  # fill each cluster's rectangle; rectangles that touch merge
        filled = np.zeros_like(grown)
        for bx, by, bw, bh in stats[1:, :4]:
            filled[by : by + bh, bx : bx + bw] = 1
        merged, _, merged_stats, _ = cv2.connectedComponentsWithStats(filled, connectivity=8)
        if merged == n:
            break
        n, stats = merged, merged_stats
    height, width = cmap.layout.height, cmap.layout.width
    return [(int(oy + by) * k, min(height, int(oy + by + bh) * k), int(ox + bx) * k, min(width, int(ox + bx + bw) * k))
            for bx, by, bw, bh in stats[1:, :4]]


def full_peak(cmap: CoarseMap) -> np.float32:
    """The exact maximum of `cmap.full()` (a finite map with exact windows), from windows only.

    The window around the coarse maximum gives a lower bound; only coarse pixels that can exceed it need
    their windows computed (usually a handful). A map with many near-equal maxima costs more windows."""
    coarse = cmap.blended
    cy, cx = np.unravel_index(int(np.argmax(coarse)), coarse.shape)
    first = np.zeros(coarse.shape, np.uint8)
    first[cy, cx] = 1
    peak = max(cmap.window(*box).max() for box in support_boxes(cmap, first, 0))
    for box in support_boxes(cmap, reaching(coarse, float(peak), strict=True), 0):
        peak = max(peak, cmap.window(*box).max())
    return np.float32(peak)
