"""Image- and pixel-level metrics of defect detection (numpy only, no torch).

Conventions (one rule everywhere, so numbers from training, calibration and the export gate
compare):

- A ratio whose denominator is 0 is **0.0** (sklearn's ``zero_division=0``): precision with no
  predicted positives, recall with no true positives, F1 when precision + recall is 0, IoU
  when there is neither a true nor a predicted defect pixel, accuracy of an empty set.
  The confusion counts are always reported alongside, so "0.0 because undefined" can be told
  from "0.0 because bad".
- Average precision with no positive label is **NaN** (undefined, not zero): an AP of 0 would
  read as "ranking is wrong" when there was simply nothing to rank. NaN scores rank lowest.
- The positive class is "defective" (images) and "defect pixel" (pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def ratio(num: float, den: float) -> float:
    """num / den with the module's convention 0/0 -> 0.0 (and x/0 -> 0.0)."""
    return float(num) / float(den) if den else 0.0


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1) of the positive class from confusion counts."""
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return p, r, ratio(2 * tp, 2 * tp + fp + fn)


def _operating_points(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(true positives, false positives, parts) at each threshold that flags the parts down to a group
    of tied scores, highest first; None without a positive label. NaN scores rank lowest."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not y.any():
        return None
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # tied scores form one operating point
    tps = np.cumsum(y)[last]
    return tps, last + 1 - tps, int(y.size)


def average_precision(scores: Any, labels: Any) -> float:
    """Area under the precision-recall curve as the step-wise sum sum_n (R_n - R_{n-1}) P_n.

    Same definition as sklearn's ``average_precision_score`` (no interpolation; tied scores form
    one operating point). Returns NaN when there is no positive label. NaN scores rank lowest.
    """
    points = _operating_points(scores, labels)
    if points is None:
        return float("nan")
    tps, fps, _ = points
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy_bound(scores: Any, labels: Any, min_recall: float) -> float:
    """The best image accuracy any single threshold on `scores` reaches on these parts while keeping
    recall >= `min_recall` (NaN without defective parts).

    Why: an upper bound on what calibration could have done, had it seen these very parts. When it
    sits far below a target, the scores rank the parts too poorly and no threshold rule can help;
    when the shipped accuracy sits far below it, the rule (or the calibration parts) is to blame.
    """
    points = _operating_points(scores, labels)
    if points is None:
        return float("nan")
    tps, fps, n = points
    tps, fps = np.r_[0, tps], np.r_[0, fps]  # and the threshold that flags nothing
    positives, negatives = int(tps[-1]), n - int(tps[-1])
    accuracy = (tps + negatives - fps) / n
    return float(accuracy[tps >= min_recall * positives - 1e-9].max())


def image_metrics(pred: Any, label: Any, scores: Any) -> dict[str, Any]:
    """Part-level metrics: a part is positive when defective (label) / flagged (pred).

    `scores` ranks parts for AP (higher = more likely defective).
    """
    p = np.asarray(pred).astype(bool).ravel()
    y = np.asarray(label).astype(bool).ravel()
    if p.shape != y.shape:
        raise ValueError(f"pred and label differ in length: {p.size} vs {y.size}")
    tp = int(np.sum(p & y))
    fp = int(np.sum(p & ~y))
    fn = int(np.sum(~p & y))
    tn = int(np.sum(~p & ~y))
    precision, recall, f1 = prf(tp, fp, fn)
    return {
        "image_accuracy": ratio(tp + tn, p.size),
        "image_precision": precision,
        "image_recall": recall,
        "image_f1": f1,
        "image_ap": average_precision(scores, y),
        "image_tp": tp,
        "image_fp": fp,
        "image_fn": fn,
        "image_tn": tn,
    }


@dataclass
class PixelCounts:
    """Pixel confusion counts pooled over images (a big defect weighs more than a small one).

    Pooling, not averaging per image, because per-image IoU is undefined on good parts, which
    are most of the data.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, pred: np.ndarray, true: np.ndarray) -> None:
        """Accumulate one image: `pred` and `true` are HxW masks, nonzero = defect."""
        if pred.shape != true.shape:
            raise ValueError(f"predicted mask {pred.shape} and true mask {true.shape} differ in shape")
        p, t = pred.astype(bool, copy=False), true.astype(bool, copy=False)
        tp = int(np.count_nonzero(p & t))
        n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
        self.tp += tp
        self.fp += n_p - tp
        self.fn += n_t - tp
        self.tn += p.size - n_p - n_t + tp

    @property
    def precision(self) -> float:
        return ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return ratio(self.tp, self.tp + self.fp + self.fn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pixel_precision": self.precision,
            "pixel_recall": self.recall,
            "pixel_f1": self.f1,
            "pixel_iou": self.iou,
            "pixel_tp": self.tp,
            "pixel_fp": self.fp,
            "pixel_fn": self.fn,
            "pixel_tn": self.tn,
        }
