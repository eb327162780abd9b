"""postprocess_map judges a CoarseMap from windows of the full map; it must give exactly what
postprocess(cmap.full()) gives (issue 20, big frames). Real tile layouts, blend_tiles, OpenCV."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from edge.coarse_windows import full_peak, reaching, support_boxes
from edge.contract import Detection, NonFiniteError, PostprocessParams
from edge.postprocess import postprocess, postprocess_map
from edge.preprocess import CoarseMap, _plan_tiles, blend_tiles


def _coarse(rng: np.random.Generator, height: int, width: int, tile: int, overlap: int, k: int,
            kind: str) -> CoarseMap:
    """A frame's blended map from random tile outputs of one kind (real layout, real blending)."""
    layout = _plan_tiles(height, width, tile, overlap, k)
    n, side = len(layout.origins), tile // k
    if kind == "low":  # a good part: noise well below any threshold
        out = rng.random((n, side, side), dtype=np.float32) * 0.2
    elif kind == "blob":  # smooth blobs: noise blurred in each tile, stretched to [0, 1]
        out = np.stack([cv2.GaussianBlur(rng.random((side, side), dtype=np.float32), (0, 0), side / 8)
                        for _ in range(n)])
        out = (out - out.min()) / max(float(np.ptp(out)), 1e-6)
    elif kind == "specks":  # isolated coarse pixels at 1 on zeros
        out = np.where(rng.random((n, side, side)) < 0.004, 1.0, 0.0).astype(np.float32)
    elif kind == "high":  # every value above every threshold used
        out = 0.95 + rng.random((n, side, side), dtype=np.float32) * 0.05
    elif kind == "zeros":
        out = np.zeros((n, side, side), np.float32)
    else:  # peaky noise: a few high values
        out = (rng.random((n, side, side)) ** 20).astype(np.float32)
    return blend_tiles(out, layout, overlap)


def assert_same(a: Detection, b: Detection) -> None:
    assert b.regions == a.regions  # area, bbox, centroid, max/mean score: == on floats, bit for bit
    assert (b.score, b.part_score, b.part_threshold) == (a.score, a.part_score, a.part_threshold)
    assert b.mask.dtype == a.mask.dtype and b.mask.shape == a.mask.shape
    assert b.mask.tobytes() == a.mask.tobytes()


KINDS = ("low", "blob", "specks", "high", "zeros", "peaky")


def _cases(seed: int, count: int) -> list[tuple[CoarseMap, PostprocessParams, float | None]]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        k = (1, 2, 4)[i % 3]
        tile = int(rng.choice([32, 64]))
        overlap = int(rng.choice([0, 8, 16]))
        height, width = int(rng.integers(8, 180)), int(rng.integers(8, 180))  # rarely a multiple of the tile
        cmap = _coarse(rng, height, width, tile, overlap, k, KINDS[i % len(KINDS)])
        threshold = float(rng.choice([0.3, 0.5, 0.9]))
        if i % 4 == 0:  # a value of the map itself: pixels exactly at the threshold
            threshold = float(cmap.full().flat[rng.integers(cmap.full().size)]) or 0.5
        params = PostprocessParams(pixel_threshold=threshold, min_area=int(rng.choice([0, 1, 5, 30])),
                                   open_radius=int(rng.integers(0, 3)), close_radius=int(rng.integers(0, 3)),
                                   part_threshold=None if i % 5 < 3 else 0.5)
        part = None if i % 2 else float(rng.random())
        cases.append((cmap, params, part))
    return cases


@pytest.mark.parametrize("seed", range(4))
def test_same_detection_as_the_full_map(seed: int) -> None:
    for cmap, params, part in _cases(seed, 60):
        assert_same(postprocess(cmap.full(), params, part), postprocess_map(cmap, params, part))


def test_specks_far_apart_are_judged_in_boxes_of_their_own() -> None:
    """Specks over a bigger frame: several independent boxes, still the full map's regions."""
    rng = np.random.default_rng(7)
    layout = _plan_tiles(600, 700, 160, 32, 4)
    out = np.zeros((len(layout.origins), 40, 40), np.float32)
    out[rng.random(out.shape) < 0.002] = 0.9
    out[0, 5:9, 5:9] = 0.8  # one blob too, and a ring around a speck (one box, not two)
    out[1, 20:30, 20:30] = 0.7
    out[1, 22:28, 22:28] = 0.0
    out[1, 25, 25] = 1.0
    cmap = blend_tiles(out, layout, 32)
    params = PostprocessParams(pixel_threshold=0.5, min_area=4, open_radius=0, close_radius=1)
    margin = 2 * (params.open_radius + params.close_radius) + 2
    boxes = support_boxes(cmap, reaching(cmap.blended, 0.5), margin)
    assert len(boxes) > 5
    for i, (y0, y1, x0, x1) in enumerate(boxes):  # disjoint (each holds its candidates' reach plus margin)
        for b in boxes[i + 1:]:
            assert not (y0 < b[1] and b[0] < y1 and x0 < b[3] and b[2] < x1)
    full = cmap.full()
    det = postprocess_map(cmap, params)
    assert det.regions
    assert_same(postprocess(full, params), det)
    assert_same(postprocess(full, replace(params, open_radius=2, min_area=0)),
                postprocess_map(cmap, replace(params, open_radius=2, min_area=0)))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_window_is_the_full_map_slice(k: int) -> None:
    rng = np.random.default_rng(k)
    for height, width in ((37, 53), (160, 160), (1013, 1211)):
        cmap = _coarse(rng, height, width, 64, 16, k, "peaky")
        assert cmap.exact_windows
        full = cmap.full()
        edges = [(0, 1), (0, height), (height - 1, height)]
        rows = edges + [tuple(sorted(rng.choice(height + 1, 2, replace=False))) for _ in range(30)]
        cols = [(0, 1), (0, width), (width - 1, width)] + [
            tuple(sorted(rng.choice(width + 1, 2, replace=False))) for _ in range(30)]
        for (y0, y1), (x0, x1) in zip(rows, cols, strict=True):
            assert np.array_equal(cmap.window(int(y0), int(y1), int(x0), int(x1)), full[y0:y1, x0:x1])
    with pytest.raises(ValueError, match="outside"):
        cmap.window(0, height + 1, 0, 1)


def test_peak_is_exact() -> None:
    rng = np.random.default_rng(3)
    for i in range(60):
        cmap = _coarse(rng, int(rng.integers(8, 150)), int(rng.integers(8, 150)), 32, 8, (1, 2, 4)[i % 3],
                       KINDS[i % len(KINDS)])
        assert full_peak(cmap) == cmap.full().max()


def test_scale_odd_k_and_float64_fall_back_to_the_full_map() -> None:
    """A second resize to the frame size (input scale != 1), k = 3 or a float64 map: windows are not exact,
    so the full map is built (once) and the result is postprocess's."""
    rng = np.random.default_rng(5)
    scaled = _coarse(rng, 90, 110, 64, 16, 4, "blob")
    scaled = CoarseMap(scaled.blended, replace(scaled.layout, frame_height=361, frame_width=439), 4)
    odd = _coarse(rng, 90, 110, 48, 12, 3, "blob")
    wide = _coarse(rng, 90, 110, 64, 16, 4, "blob")
    wide = CoarseMap(wide.blended.astype(np.float64), wide.layout, 4)  # resized in float64, then cast
    assert_same(postprocess(wide.full(), PostprocessParams(0.5)), postprocess_map(wide, PostprocessParams(0.5)))
    for cmap in (scaled, odd):
        assert not cmap.exact_windows
        full = cmap.full()
        assert np.array_equal(cmap.window(3, 50, 7, 60), full[3:50, 7:60])
        for threshold in (0.5, 0.99, 1.5):
            params = PostprocessParams(pixel_threshold=threshold, min_area=3, part_threshold=0.5)
            assert_same(postprocess(full, params), postprocess_map(cmap, params))
    assert scaled.full().shape == (361, 439) and postprocess_map(scaled, PostprocessParams(0.5)).mask.shape == (361, 439)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coarse_map_raises(bad: float) -> None:
    cmap = _coarse(np.random.default_rng(1), 70, 90, 32, 8, 4, "low")
    cmap.blended[5, 7] = bad
    with pytest.raises(NonFiniteError):
        postprocess(cmap.full(), PostprocessParams(0.5))  # the full map does too
    with pytest.raises(NonFiniteError, match=f"not finite: {int(np.isnan(bad))} NaN and {int(np.isinf(bad))} "
                                             f"infinite of {cmap.blended.size} values"):
        postprocess_map(cmap, PostprocessParams(0.5))
    with pytest.raises(NonFiniteError, match="part score is not finite"):
        postprocess_map(_coarse(np.random.default_rng(1), 70, 90, 32, 8, 4, "low"), PostprocessParams(0.5),
                        float("nan"))


def test_a_plain_array_is_postprocessed_as_is() -> None:
    prob = _coarse(np.random.default_rng(2), 50, 60, 32, 8, 2, "blob").full()
    assert_same(postprocess(prob, PostprocessParams(0.5)), postprocess_map(prob, PostprocessParams(0.5)))


@pytest.mark.parametrize("k", [1, 4])
def test_closing_joins_clusters_a_few_pixels_apart(k: int) -> None:
    """Two defects closer than closing reaches are one region on the full map: their boxes must merge."""
    layout = _plan_tiles(120, 200, 64 * k, 16 * k, k)
    for gap in range(1, 12):
        for close in (0, 2, 4, 8):
            coarse = np.zeros((-(-120 // k), -(-200 // k)), np.float32)
            coarse[10:14, 8:12] = 0.9
            coarse[10:14, 12 + gap * 2 // k : 16 + gap * 2 // k] = 0.9
            cmap = CoarseMap(coarse, layout, k)
            params = PostprocessParams(pixel_threshold=0.5, open_radius=close % 3, close_radius=close)
            assert_same(postprocess(cmap.full(), params), postprocess_map(cmap, params))
