"""Threshold, morphology, components, area filter, region stats, verdict rules."""

from __future__ import annotations

import numpy as np
import pytest

from edge.contract import PostprocessParams
from edge.postprocess import postprocess
from edge.rules import Rules, decide


def _map_with_blobs() -> np.ndarray:
    prob = np.zeros((50, 60), np.float32)
    prob[10:15, 20:30] = 0.9  # 50 px defect
    prob[40, 5] = 0.7  # 1 px speck
    return prob


def test_regions_and_stats() -> None:
    det = postprocess(_map_with_blobs(), PostprocessParams(pixel_threshold=0.5, min_area=0, close_radius=0))
    assert len(det.regions) == 2
    big = det.regions[0]
    assert big.area == 50 and big.bbox == (20, 10, 10, 5)
    assert big.centroid == pytest.approx((24.5, 12.0))
    assert big.max_score == pytest.approx(0.9) and big.mean_score == pytest.approx(0.9)
    assert det.mask.sum() == 51


def test_min_area_and_opening_remove_specks() -> None:
    for params in (PostprocessParams(0.5, min_area=2, close_radius=0), PostprocessParams(0.5, open_radius=1)):
        det = postprocess(_map_with_blobs(), params)
        assert [r.area for r in det.regions] == [50] or det.regions[0].area >= 40
        assert det.mask[40, 5] == 0


def test_closing_joins_fragments() -> None:
    prob = np.zeros((30, 30), np.float32)
    prob[10:20, 10:14] = 0.8
    prob[10:20, 15:19] = 0.8  # 1 px gap
    assert len(postprocess(prob, PostprocessParams(0.5, close_radius=0)).regions) == 2
    assert len(postprocess(prob, PostprocessParams(0.5, close_radius=1)).regions) == 1


def test_score_is_at_least_threshold_exactly_when_a_region_survives() -> None:
    prob = _map_with_blobs()
    with_region = postprocess(prob, PostprocessParams(0.5, min_area=10, close_radius=0))
    assert with_region.regions and with_region.score == pytest.approx(0.9)
    without = postprocess(prob, PostprocessParams(0.5, min_area=100, close_radius=0))
    assert not without.regions and without.score < 0.5
    assert without.score > 0.49  # still ranks above a clean map


def test_rules() -> None:
    det = postprocess(_map_with_blobs(), PostprocessParams(0.5, min_area=0, close_radius=0))
    assert decide(det, Rules())[0] == "fail"
    assert decide(det, Rules(max_defects=2))[0] == "pass"
    verdict, reasons = decide(det, Rules(max_defects=5, max_total_area=40))
    assert verdict == "fail" and "total defect area 51" in reasons[0]
    assert decide(det, Rules(max_defects=5, max_region_area_mm2=1.0, mm_per_pixel=0.1))[0] == "pass"
    assert decide(det, Rules(max_defects=5, max_region_area_mm2=0.4, mm_per_pixel=0.1))[0] == "fail"


# -- non-finite model output fails closed (issue 14) -------------------------------------------------
@pytest.mark.parametrize(("bad", "words"), [
    (np.nan, "1 NaN and 0 infinite of 3000 values"),
    (np.inf, "0 NaN and 1 infinite"),
    (-np.inf, "0 NaN and 1 infinite"),
])
def test_non_finite_map_raises_instead_of_passing(bad: float, words: str) -> None:
    from edge.contract import NonFiniteError

    prob = _map_with_blobs()
    prob[0, 0] = bad
    with pytest.raises(NonFiniteError, match=words):
        postprocess(prob, PostprocessParams(pixel_threshold=0.5))
    with pytest.raises(NonFiniteError):
        postprocess(np.full((8, 8), np.nan, np.float32), PostprocessParams(pixel_threshold=0.5))


def test_decide_refuses_a_non_finite_score() -> None:
    from edge.contract import Detection, NonFiniteError

    with pytest.raises(NonFiniteError, match="not finite"):
        decide(Detection(regions=[], mask=None, score=float("nan")), Rules())
    assert decide(Detection(regions=[], mask=None, score=0.1), Rules()) == ("pass", [])
