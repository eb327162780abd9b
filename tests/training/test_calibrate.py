"""Calibration: picks a separating setting, handles few/no defects, and agrees with evaluate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.contract import PostprocessParams
from training.core.calibrate import calibrate, grid_counts
from training.core.evaluate import evaluate_predictions

SHAPE = (40, 48)


def _maps(n_bad: int, n_good: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Defective maps: a 7x7 blob at 0.8 on the true defect; good maps: 1x3 specks at 0.6."""
    rng = np.random.default_rng(seed)
    probs, masks = [], []
    for i in range(n_bad + n_good):
        p = np.full(SHAPE, 0.05, np.float32) + rng.uniform(0, 0.03, SHAPE).astype(np.float32)
        m = np.zeros(SHAPE, np.uint8)
        y, x = int(rng.integers(2, 30)), int(rng.integers(2, 38))
        if i < n_bad:
            m[y : y + 7, x : x + 7] = 1
            p[y : y + 7, x : x + 7] = 0.8
        else:
            p[y, x : x + 3] = 0.6
        probs.append(p)
        masks.append(m)
    return probs, masks


def test_calibrate_separates_blobs_from_specks() -> None:
    probs, masks = _maps(6, 10)
    params, report = calibrate(probs, masks, min_recall=0.95)
    assert params.min_area > 3 or params.pixel_threshold > 0.6
    assert report["metrics"]["image_f1"] == 1.0
    assert report["recall_reached"] and report["warnings"] == []
    assert report["chosen"] == params.to_dict()
    # the default setting flags every speck: calibration must have mattered
    assert evaluate_predictions(probs, masks, PostprocessParams())["image_f1"] < 1.0


def test_chosen_params_give_exactly_the_evaluated_metrics() -> None:
    probs, masks = _maps(5, 7, seed=3)
    _, report = calibrate(probs, masks)
    best, metrics = report["grid_best"], report["metrics"]
    for key in ("image_precision", "image_recall", "image_f1", "pixel_iou", "image_fp", "image_fn"):
        assert best[key] == metrics[key], key


@pytest.mark.parametrize("open_radius,close_radius", [(0, 1), (1, 0), (0, 0)])
def test_grid_counts_match_postprocess_for_every_setting(open_radius: int, close_radius: int) -> None:
    rng = np.random.default_rng(7)
    probs = [np.clip(rng.normal(0.4, 0.25, (24, 30)), 0, 1).astype(np.float32) for _ in range(5)]
    masks = [(p > 0.7).astype(np.uint8) * (i % 2) for i, p in enumerate(probs)]
    base = PostprocessParams(open_radius=open_radius, close_radius=close_radius)
    ths, areas = [0.3, 0.55, 0.8], [0, 2, 5, 20]
    g = grid_counts(probs, masks, ths, areas, base)
    for i, t in enumerate(ths):
        for j, a in enumerate(areas):
            m = evaluate_predictions(probs, masks, dataclasses.replace(base, pixel_threshold=t, min_area=a))
            assert (g.img_tp[i, j], g.img_fp[i, j], g.img_fn[i, j]) == (m["image_tp"], m["image_fp"], m["image_fn"])
            assert (g.px_tp[i, j], g.px_fp[i, j], g.px_fn[i, j]) == (m["pixel_tp"], m["pixel_fp"], m["pixel_fn"])


def test_no_defective_parts_choose_most_sensitive_clean_setting() -> None:
    probs, masks = _maps(0, 8)
    params, report = calibrate(probs, masks)
    assert any("no defective" in w for w in report["warnings"])
    # lowest threshold first (0.10 is above the 0.05-0.08 background), then the smallest area > 3
    assert (params.pixel_threshold, params.min_area) == (0.1, 4)
    assert report["metrics"]["image_fp"] == 0


def test_no_defective_parts_and_no_clean_setting_keeps_base() -> None:
    probs = [np.full(SHAPE, 0.99, np.float32) for _ in range(3)]
    masks = [np.zeros(SHAPE, np.uint8) for _ in range(3)]
    base = PostprocessParams(pixel_threshold=0.42, min_area=7)
    params, report = calibrate(probs, masks, base=base)
    assert params == base
    assert len(report["warnings"]) == 2


def test_one_defective_part_still_calibrates_with_warning() -> None:
    probs, masks = _maps(1, 6, seed=1)
    params, report = calibrate(probs, masks)
    assert any("only 1 defective" in w for w in report["warnings"])
    assert report["metrics"]["image_f1"] == 1.0
    assert params.min_area > 3 or params.pixel_threshold > 0.6


def test_unreachable_recall_takes_highest_recall() -> None:
    probs, masks = _maps(4, 4, seed=2)
    probs[0][:] = 0.005  # one defect the model never sees: its whole map below the lowest grid threshold
    _, report = calibrate(probs, masks, min_recall=0.95)
    assert not report["recall_reached"]
    assert "no setting reaches" in report["reason"]
    assert report["metrics"]["image_recall"] == pytest.approx(0.75)
    assert report["metrics"]["image_f1"] == pytest.approx(6 / 7)


def test_bad_grid_is_rejected() -> None:
    probs, masks = _maps(1, 1)
    with pytest.raises(ValueError):
        calibrate(probs, masks, thresholds=[0.0, 0.5])
    with pytest.raises(ValueError):
        calibrate(probs, masks[:1])


def test_recall_first_then_fewest_false_alarms() -> None:
    """A faint defect is caught by going low, and the rule then takes the setting with the fewest
    false alarms (not the best F1), and reports what that recall costs against the best F1."""
    probs, masks = [], []
    for peak, defective in ((0.9, True), (0.9, True), (0.3, True), (0.4, False), (0.4, False), (0.0, False)):
        p = np.zeros(SHAPE, np.float32)
        m = np.zeros(SHAPE, np.uint8)
        p[10:17, 10:17] = peak
        if defective:
            m[10:17, 10:17] = 1
        probs.append(p)
        masks.append(m)
    params, report = calibrate(probs, masks, min_recall=0.97)
    assert report["recall_reached"] and report["metrics"]["image_recall"] == 1.0
    assert params.pixel_threshold <= 0.3
    assert report["cost"]["chosen_false_alarms"] == 2  # the two 0.4 spots cannot be told from the faint defect
    assert report["cost"]["best_f1_false_alarms"] == 0 and report["cost"]["extra_false_alarms"] == 2
    params, report = calibrate(probs, masks, min_recall=0.6)
    assert params.pixel_threshold > 0.4 and report["cost"]["chosen_false_alarms"] == 0


def test_part_threshold_fewest_false_alarms_at_required_recall() -> None:
    """calibrate_part_threshold: the highest threshold that keeps recall >= min_recall, placed halfway
    to the next lower score; low scores are reachable (no fixed grid floor)."""
    from training.core.calibrate import calibrate_part_threshold

    bad, good = np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    # 10 defective parts (one very faint), 10 good ones with a few high-scoring false alarms
    pos = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.002]
    neg = [0.001, 0.0005, 0.01, 0.05, 0.1, 0.25, 0.0001, 0.0002, 0.0003, 0.0004]
    masks = [bad] * len(pos) + [good] * len(neg)
    base = PostprocessParams(pixel_threshold=0.3, min_area=2)
    p90, r90 = calibrate_part_threshold(pos + neg, masks, base, min_recall=0.9)
    assert (p90.pixel_threshold, p90.min_area) == (0.3, 2)  # only part_threshold changes
    assert 0.2 > p90.part_threshold > 0.1 and r90["image_recall"] == 0.9 and r90["image_fp"] == 1
    p100, r100 = calibrate_part_threshold(pos + neg, masks, base, min_recall=1.0)
    assert 0.002 > p100.part_threshold > 0.001 and r100["image_recall"] == 1.0 and r100["image_fp"] == 4
    # judged exactly as the edge judges: evaluate_predictions with the part scores
    probs = [np.zeros((4, 4), np.float32)] * len(masks)
    m = evaluate_predictions(probs, masks, p100, parts=pos + neg)
    assert m["image_recall"] == 1.0 and m["part_threshold"] == p100.part_threshold
    assert m["image_ap"] > 0.9  # ranked by the part score, not the (empty) maps
    # no defective parts: the lowest threshold with no false alarm
    p0, r0 = calibrate_part_threshold(neg, [good] * len(neg), base)
    assert p0.part_threshold > 0.25 and r0["image_fp"] == 0 and r0["warnings"]
