"""Hand-computed metric cases and the documented 0/0 and AP conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.core.metrics import PixelCounts, accuracy_bound, average_precision, image_metrics


def test_average_precision_of_a_known_ranking() -> None:
    # ranks: + - + -  -> P@R=0.5 is 1, P@R=1 is 2/3: AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.9, 0.8, 0.7], [1, 1, 0]) == pytest.approx(1.0)
    assert average_precision([0.1, 0.8, 0.7], [1, 0, 0]) == pytest.approx(1 / 3)


def test_average_precision_ties_are_one_operating_point() -> None:
    # threshold 0.5: tp 1, fp 1 (P .5, R .5); threshold 0.2: tp 2, fp 1 (P 2/3, R 1)
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_average_precision_without_positives_is_nan_and_nan_scores_rank_lowest() -> None:
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    assert average_precision([float("nan"), 0.2], [0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        average_precision([0.1], [1, 0])


def test_accuracy_bound_is_the_best_threshold_at_the_recall_asked() -> None:
    # defective: 0.9, 0.8, 0.2; good: 0.7, 0.3, 0.1, 0.05
    scores = [0.9, 0.8, 0.2, 0.7, 0.3, 0.1, 0.05]
    labels = [1, 1, 1, 0, 0, 0, 0]
    # recall 1 needs a threshold <= 0.2: flags 0.7 and 0.3 too -> 5 of 7 right
    assert accuracy_bound(scores, labels, 1.0) == pytest.approx(5 / 7)
    # recall >= 0.6 allows the threshold 0.8: both top defective parts, no good one -> 6 of 7
    assert accuracy_bound(scores, labels, 0.6) == pytest.approx(6 / 7)
    # recall 0 allows flagging nothing: 4 of 7, but 6 of 7 is better
    assert accuracy_bound(scores, labels, 0.0) == pytest.approx(6 / 7)
    # a perfect ranking reaches 1 at any recall; tied scores cannot be split
    assert accuracy_bound([0.9, 0.8, 0.1], [1, 1, 0], 1.0) == 1.0
    assert accuracy_bound([0.5, 0.5, 0.1], [1, 0, 0], 1.0) == pytest.approx(2 / 3)
    assert math.isnan(accuracy_bound([0.1, 0.2], [0, 0], 0.97))
    with pytest.raises(ValueError, match="differ in length"):
        accuracy_bound([0.1], [0, 1], 0.97)


def test_image_metrics_confusion_and_ratios() -> None:
    m = image_metrics([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0.9, 0.8, 0.3, 0.1, 0.7])
    assert (m["image_tp"], m["image_fp"], m["image_fn"], m["image_tn"]) == (2, 1, 1, 1)
    assert m["image_accuracy"] == pytest.approx(3 / 5)
    assert m["image_precision"] == pytest.approx(2 / 3)
    assert m["image_recall"] == pytest.approx(2 / 3)
    assert m["image_f1"] == pytest.approx(2 / 3)
    # ranking: + (.9) - (.8) + (.7) + (.3): AP = 1/3*1 + 1/3*2/3 + 1/3*3/4
    assert m["image_ap"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_zero_division_convention_is_zero() -> None:
    m = image_metrics([0, 0], [0, 0], [0.1, 0.2])
    assert (m["image_precision"], m["image_recall"], m["image_f1"]) == (0.0, 0.0, 0.0)
    assert m["image_accuracy"] == 1.0 and math.isnan(m["image_ap"])
    pc = PixelCounts()
    pc.add(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))
    assert (pc.precision, pc.recall, pc.f1, pc.iou) == (0.0, 0.0, 0.0, 0.0)
    assert pc.tn == 4


def test_pixel_counts_pool_over_images() -> None:
    pc = PixelCounts()
    z = np.zeros((4, 4), np.uint8)
    a_pred, a_true = z.copy(), z.copy()
    a_pred[0, :3] = 1  # 3 predicted
    a_true[0, 1:4] = 1  # 3 true, 2 shared -> tp 2, fp 1, fn 1
    pc.add(a_pred, a_true)
    b_pred = z.copy()
    b_pred[3, 3] = 1  # good image with one false pixel -> fp 1
    pc.add(b_pred, z)
    c_true = z.copy()
    c_true[2, :2] = 1  # missed defect -> fn 2
    pc.add(z, c_true)
    assert (pc.tp, pc.fp, pc.fn, pc.tn) == (2, 2, 3, 48 - 7)
    d = pc.to_dict()
    assert d["pixel_precision"] == pytest.approx(2 / 4)
    assert d["pixel_recall"] == pytest.approx(2 / 5)
    assert d["pixel_f1"] == pytest.approx(4 / 9)
    assert d["pixel_iou"] == pytest.approx(2 / 7)
    with pytest.raises(ValueError):
        pc.add(z, np.zeros((3, 3), np.uint8))
