"""Probability map -> defect regions. Used by training validation and by the daemon alike.

Steps: threshold, morphological open (drop specks) and close (join fragments of one defect),
connected components, drop components smaller than `min_area`, per-region statistics.
The image score used to rank parts is the highest region score, or - when no region
survives - the map maximum capped just below the threshold, so that
`score >= pixel_threshold` exactly when the image has a defect region.

A model with a part output (a trained decision head) also gives one part probability per tile;
`part_score` reduces them to the frame's score (the max: one defective tile makes a defective
part), and `postprocess` carries it with the package's `part_threshold` into the Detection, where
edge.rules.decide turns it into the verdict. The regions still come from the map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from edge.coarse_windows import full_peak, reaching, support_boxes
from edge.contract import Detection, NonFiniteError, PostprocessParams, Region
from edge.preprocess import CoarseMap

_KERNELS: dict[int, np.ndarray] = {}


def _disk(radius: int) -> np.ndarray:
    if radius not in _KERNELS:
        _KERNELS[radius] = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return _KERNELS[radius]


def binarize(prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """Threshold plus morphology: uint8 mask (1 = defect) before the area filter."""
    # bool and uint8 share their layout: a view, not a second full-frame pass
    mask: np.ndarray = np.greater_equal(prob, params.pixel_threshold).view(np.uint8)
    box = _support(mask, params)
    if box is None:
        return mask
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = _morphology(mask[y0:y1, x0:x1], params)
    return mask


def _support(mask: np.ndarray, params: PostprocessParams) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): the part of the mask morphology can change, or None when it is all zero.

    Morphology of zeros is zero, and opening then closing reaches at most open + 2 * close pixels
    beyond the thresholded pixels; with a wider margin, the crop's own border (OpenCV treats it as
    neutral) never touches a set pixel, so the crop gives exactly the full frame's result. At 5 MP
    a defect then costs its neighbourhood, not 5 million pixels, in morphology and labelling."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return None
    m = 2 * (params.open_radius + params.close_radius) + 2
    return max(0, y - m), min(mask.shape[0], y + h + m), max(0, x - m), min(mask.shape[1], x + w + m)


def _morphology(mask: np.ndarray, params: PostprocessParams) -> np.ndarray:
    if params.open_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_radius))
    if params.close_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_radius))
    return mask


def check_finite(prob: np.ndarray) -> None:
    """Raise NonFiniteError when the map holds NaN or +-inf (they would fail open: NaN >= t is False)."""
    _finite_peak(prob)


def _finite_peak(prob: np.ndarray) -> np.floating:
    """The map's maximum, once check_finite's test passed (postprocess reuses it for the score).

    min and max propagate NaN and reveal +-inf in two passes without a full-size temporary;
    only a bad map pays for counting.
    """
    if prob.size:
        peak = prob.max()
        if np.isfinite(prob.min()) and np.isfinite(peak):
            return peak
    if not prob.size:
        raise NonFiniteError("probability map is empty")
    nan = int(np.isnan(prob).sum())
    inf = int(np.isinf(prob).sum())
    raise NonFiniteError(f"model output is not finite: {nan} NaN and {inf} infinite of {prob.size} values")


def part_score(tile_scores: Sequence[float] | np.ndarray) -> float:
    """The frame's part score: the highest part probability of its tiles.

    NonFiniteError for NaN/inf (NaN >= threshold is False: such a part would pass) or no tiles.
    """
    arr = np.asarray(tile_scores, dtype=np.float32).ravel()
    if not arr.size:
        raise NonFiniteError("no tile part scores")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"part output is not finite: {int(np.isnan(arr).sum())} NaN and "
                             f"{int(np.isinf(arr).sum())} infinite of {arr.size} tile scores")
    return float(arr.max())


def _shifted(mean: float, offset: int, area: int) -> float:
    """A component's centroid coordinate in the frame from the crop's, bit for bit as labelling the whole
    frame gives it: OpenCV divides the integer sum of coordinates by the area, so recover that sum."""
    return (round(float(mean) * area) + offset * area) / area


def postprocess(prob: np.ndarray, params: PostprocessParams, part: float | None = None) -> Detection:
    """Regions of one probability map (HxW float in [0, 1]); NonFiniteError for NaN/inf.

    `part`: the frame's part score (see `part_score`) when the model has a part output. A package
    with a `part_threshold` but no part output is judged by the map's peak instead (the calibration
    chose that: a verdict threshold of its own leaves the pixel threshold free to draw good masks)."""
    if prob.ndim != 2:
        raise ValueError(f"probability map must be HxW, got shape {prob.shape}")
    if part is None and params.part_threshold is not None and prob.size:
        part = float(prob.max())
    if part is not None and not math.isfinite(part):
        raise NonFiniteError(f"part score is not finite: {part}")
    prob = prob.astype(np.float32, copy=False)
    peak = _finite_peak(prob)
    if not np.greater_equal(peak, params.pixel_threshold):  # the comparison binarize makes, on the peak
        # No pixel reaches the threshold (most good parts): the all-zero mask, without morphology or labels.
        return _detection([], np.zeros(prob.shape, np.uint8), _no_region_score(peak, params), part, params)
    mask = binarize(prob, params)
    return _finish(_label(prob, mask, params, 0, 0), mask, peak, part, params)


def _no_region_score(peak: np.floating, params: PostprocessParams) -> float:
    """The image score without a region: the map's peak, capped just below the threshold."""
    return float(min(float(peak), float(np.nextafter(np.float32(params.pixel_threshold), np.float32(0.0)))))


def _finish(regions: list[Region], mask: np.ndarray, peak: np.floating, part: float | None,
            params: PostprocessParams) -> Detection:
    regions.sort(key=lambda r: (-r.area, r.bbox))
    score = max(r.max_score for r in regions) if regions else _no_region_score(peak, params)
    return _detection(regions, mask, score, part, params)


def postprocess_map(prob: CoarseMap | np.ndarray, params: PostprocessParams, part: float | None = None) -> Detection:
    """`postprocess(prob.full(), params, part)` - the same Detection, mask bytes and scores bit for bit - with
    full-resolution values computed only around the coarse pixels that matter (see edge.coarse_windows).

    At 5 MP the full map is 20 MB and resizing, thresholding and labelling it was most of the result
    thread's time; a passing part (no pixel at the threshold) now costs a few small windows around its
    peak, a defect the neighbourhood of its coarse support. Falls back to the full map (built once) when
    windows are not exact: input scale != 1 (a second resize to the frame size), k not a power of two or
    a blended map that is not float32.
    NaN/inf in the coarse map raise NonFiniteError (counted over the coarse map's values: every coarse
    value weighs in some full pixel, so the full map is non-finite exactly when the coarse one is)."""
    if isinstance(prob, np.ndarray):
        return postprocess(prob, params, part)
    if not prob.exact_windows or prob.blended.dtype != np.float32 or prob.blended.ndim != 2 or not prob.blended.size:
        return postprocess(prob.full(), params, part)  # windows would not be exactly the full map's values
    if part is not None and not math.isfinite(part):
        raise NonFiniteError(f"part score is not finite: {part}")
    coarse = prob.blended
    _finite_peak(coarse)
    peak = full_peak(prob)
    if part is None and params.part_threshold is not None:
        part = float(peak)
    shape = (prob.layout.height, prob.layout.width)
    if not np.greater_equal(peak, params.pixel_threshold):
        return _detection([], np.zeros(shape, np.uint8), _no_region_score(peak, params), part, params)
    mask = np.zeros(shape, np.uint8)  # calloc: pages outside the boxes are never touched
    regions: list[Region] = []
    # boxes: the bilinear reach of every coarse pixel that can give a full pixel >= threshold, plus the
    # margin within which morphology is neutral; boxes are apart by more than that margin (independent)
    margin = 2 * (params.open_radius + params.close_radius) + 2
    for y0, y1, x0, x1 in support_boxes(prob, reaching(coarse, params.pixel_threshold), margin):
        window = prob.window(y0, y1, x0, x1)
        sub = binarize(window, params)
        regions += _label(window, sub, params, y0, x0)
        if sub.any():  # a box without defect pixels leaves the mask's pages untouched
            mask[y0:y1, x0:x1] = sub
    return _finish(regions, mask, peak, part, params)


def _label(prob: np.ndarray, mask: np.ndarray, params: PostprocessParams, oy: int, ox: int) -> list[Region]:
    """Regions of a binarized map (`mask` from `binarize(prob)`) whose top-left corner is (oy, ox) in the frame;
    components below min_area are cleared from `mask` in place. Only the crop that holds defect pixels is
    labelled (components never leave it)."""
    regions: list[Region] = []
    box = _support(mask, params)
    if box is None:
        return regions
    y0, y1, x0, x1 = box
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1], connectivity=8)
    keep = np.zeros(n, dtype=bool)
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < max(params.min_area, 1):
            continue
        x, y, w, h = (int(v) for v in stats[i, :4])
        sub_labels = labels[y : y + h, x : x + w] == i
        scores = prob[y0 + y : y0 + y + h, x0 + x : x0 + x + w][sub_labels]
        regions.append(
            Region(
                area=area,
                bbox=(ox + x0 + x, oy + y0 + y, w, h),
                centroid=(_shifted(centroids[i, 0], ox + x0, area), _shifted(centroids[i, 1], oy + y0, area)),
                max_score=float(scores.max()),
                mean_score=float(scores.mean()),
            )
        )
        keep[i] = True
    if not keep[1:].all():  # all kept: the mask already is the kept components
        _drop_components(mask[y0:y1, x0:x1], labels, stats, keep)
    return regions


_MAX_BOXED_DROPS = 512  # beyond this many dropped components, one vectorised pass beats the loop


def _drop_components(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, keep: np.ndarray) -> None:
    """Clear, in place, the pixels of the components not kept. Each dropped one is cleared inside its
    own box (specks below min_area: a few pixels each), where `mask[:] = keep[labels]` indexed every
    pixel of the crop (~40 ms at 5 MP with specks all over the frame); same result."""
    dropped = np.flatnonzero(~keep[1:]) + 1
    if len(dropped) > _MAX_BOXED_DROPS:
        mask[:] = keep[labels]
        return
    for i in dropped:
        x, y, w, h = (int(v) for v in stats[i, :4])
        box = mask[y : y + h, x : x + w]
        box[labels[y : y + h, x : x + w] == i] = 0


def _detection(regions: list[Region], mask: np.ndarray, score: float, part: float | None,
               params: PostprocessParams) -> Detection:
    if part is None:
        return Detection(regions=regions, mask=mask, score=score)
    return Detection(regions=regions, mask=mask, score=score, part_score=float(part),
                     part_threshold=params.part_threshold)
