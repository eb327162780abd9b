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
_FEW = 64  # up to this many candidates, their rectangles are merged in Python; more are labelled


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
    plus `margin` full pixels around them. The boxes are disjoint, so the pixels two of them are about
    lie 2 * margin apart: what happens within `margin` of one cluster never involves another.

    Each candidate is grown by the reach and overlapping or touching rectangles merge: directly for a
    handful of candidates, else by labelling (`_cluster_rects`; a ring around a speck becomes one box)."""
    reach = _BILINEAR_REACH + math.ceil(margin / cmap.k)
    points = cv2.findNonZero(candidates)  # (x, y) of each; SIMD, where np.flatnonzero took ~0.5 ms at 5 MP
    if points is None:
        return []
    if len(points) <= _FEW:  # a handful (a good part's near-peak pixels): merge their rectangles directly
        rects = _merge([_grown(int(y), int(x), reach, candidates.shape) for x, y in points.reshape(-1, 2)])
    else:
        rects = _cluster_rects(candidates, reach)
    return _full_boxes(cmap, rects)


def _grown(y: int, x: int, reach: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Coarse pixel (y, x) grown by `reach`, clipped to the map: (y0, y1, x0, x1), as dilation grows it."""
    return max(0, y - reach), min(shape[0], y + reach + 1), max(0, x - reach), min(shape[1], x + reach + 1)


def _full_boxes(cmap: CoarseMap, rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Coarse rectangles -> the full-resolution boxes of their k x k blocks, clipped to the frame."""
    k, height, width = cmap.k, cmap.layout.height, cmap.layout.width
    return [(int(y0) * k, min(height, int(y1) * k), int(x0) * k, min(width, int(x1) * k)) for y0, y1, x0, x1 in rects]


def _merge(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Coarse rectangles (y0, y1, x0, x1) merged until no two overlap or touch (8-connected), as
    `_cluster_rects` gives them."""
    merged = True
    while merged:
        merged = False
        out: list[tuple[int, int, int, int]] = []
        for r in rects:
            for i, o in enumerate(out):
                if r[0] <= o[1] and o[0] <= r[1] and r[2] <= o[3] and o[2] <= r[3]:  # overlap or touch
                    out[i] = (min(r[0], o[0]), max(r[1], o[1]), min(r[2], o[2]), max(r[3], o[3]))
                    merged = True
                    break
            else:
                out.append(r)
        rects = out
    return rects


def _cluster_rects(candidates: np.ndarray, reach: int) -> list[tuple[int, int, int, int]]:
    """Coarse rectangles of the candidates grown by `reach`: clusters labelled, their bounding rectangles
    filled and labelled again until no two touch."""
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
    return [(oy + by, oy + by + bh, ox + bx, ox + bx + bw) for bx, by, bw, bh in stats[1:, :4]]


def full_peak(cmap: CoarseMap) -> np.float32:
    """The exact maximum of `cmap.full()` (a finite map with exact windows), from windows only.

    The window around the coarse maximum gives a lower bound; only coarse pixels that can exceed it need
    their windows computed (usually a handful). A map with many near-equal maxima costs more windows."""
    coarse = cmap.blended
    cy, cx = np.unravel_index(int(np.argmax(coarse)), coarse.shape)
    peak = cmap.window(*_full_boxes(cmap, [_grown(int(cy), int(cx), _BILINEAR_REACH, coarse.shape)])[0]).max()
    for box in support_boxes(cmap, reaching(coarse, float(peak), strict=True), 0):
        peak = max(peak, cmap.window(*box).max())
    return np.float32(peak)
