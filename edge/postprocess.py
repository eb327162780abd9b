"""Probability map -> defect regions. Used by training validation and by the daemon alike.

Steps: threshold, morphological open (drop specks) and close (join fragments of one defect),
connected components, drop components smaller than `min_area`, per-region statistics.
The image score used to rank parts is the highest region score, or - when no region
survives - the map maximum capped just below the threshold, so that
`score >= pixel_threshold` exactly when the image has a defect region.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge.contract import Detection, NonFiniteError, PostprocessParams, Region

_KERNELS: dict[int, np.ndarray] = {}


def _disk(radius: int) -> np.ndarray:
    if radius not in _KERNELS:
        _KERNELS[radius] = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return _KERNELS[radius]


def binarize(prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """Threshold plus morphology: uint8 mask (1 = defect) before the area filter."""
    mask: np.ndarray = (prob >= params.pixel_threshold).astype(np.uint8)
    if params.open_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_radius))
    if params.close_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_radius))
    return mask


def check_finite(prob: np.ndarray) -> None:
    """Raise NonFiniteError when the map holds NaN or +-inf (they would fail open: NaN >= t is False).

    min and max propagate NaN and reveal +-inf in two passes without a full-size temporary;
    only a bad map pays for counting.
    """
    if prob.size and np.isfinite(prob.min()) and np.isfinite(prob.max()):
        return
    if not prob.size:
        raise NonFiniteError("probability map is empty")
    nan = int(np.isnan(prob).sum())
    inf = int(np.isinf(prob).sum())
    raise NonFiniteError(f"model output is not finite: {nan} NaN and {inf} infinite of {prob.size} values")


def postprocess(prob: np.ndarray, params: PostprocessParams) -> Detection:
    """Regions of one probability map (HxW float in [0, 1]); NonFiniteError for NaN/inf."""
    if prob.ndim != 2:
        raise ValueError(f"probability map must be HxW, got shape {prob.shape}")
    prob = prob.astype(np.float32, copy=False)
    check_finite(prob)
    mask = binarize(prob, params)
    regions: list[Region] = []
    if mask.any():
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(n, dtype=bool)
        for i in range(1, n):
            area = int(stats[i, cv2.CC_STAT_AREA])
            if area < max(params.min_area, 1):
                continue
            x, y, w, h = (int(v) for v in stats[i, :4])
            sub_labels = labels[y : y + h, x : x + w] == i
            scores = prob[y : y + h, x : x + w][sub_labels]
            regions.append(
                Region(
                    area=area,
                    bbox=(x, y, w, h),
                    centroid=(float(centroids[i, 0]), float(centroids[i, 1])),
                    max_score=float(scores.max()),
                    mean_score=float(scores.mean()),
                )
            )
            keep[i] = True
        mask = keep[labels].astype(np.uint8)
    regions.sort(key=lambda r: (-r.area, r.bbox))
    if regions:
        score = max(r.max_score for r in regions)
    else:
        below = np.nextafter(np.float32(params.pixel_threshold), np.float32(0.0))
        score = float(min(float(prob.max()), float(below)))
    return Detection(regions=regions, mask=mask, score=score)
