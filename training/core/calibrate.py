"""Choose `pixel_threshold` and `min_area` on validation maps, for the line's priorities.

Objective, for a line (an escape costs more than a re-inspection): the FEWEST FALSE ALARMS among
the settings that reach image recall >= `min_recall` (0.97 by default). Ties: higher recall, then
higher pixel IoU, then higher F1, then the smaller min_area, then the lower threshold (the most
sensitive of equally good settings). If no setting reaches `min_recall`: the highest recall, ties
by the same order. The report says what the recall costs: the false alarms of the choice against
those of the best-F1 setting (`cost`). The threshold grid reaches down to 0.01, because the
faint small defects of a short training peak at a few percent.

Few or no defective validation parts make the choice fragile, so the report warns:
- fewer than FEW_DEFECTIVE (5) defective parts: calibrated as usual, with a warning;
- none: F1 and recall are undefined, so the rule is "the lowest threshold, then the lowest
  min_area, that keeps the false-positive rate on the good parts at 0"; if no setting does
  (or there are no maps), `base` is kept (0.5 / 0 by default). Always with a warning.

Speed: per map and threshold, the binary map (same morphology as the daemon) and its
connected components are computed once; every min_area is then judged from the component
areas and their overlap with the true mask. This gives exactly what `postprocess` would give
(a component survives iff its area >= max(min_area, 1)), at 1/len(min_areas) of the cost.
The chosen setting is re-scored with `training.core.evaluate.evaluate_predictions` for the report.

Part threshold (`calibrate_part_threshold`, models with a decision head): the verdict is
`part score >= part_threshold`, so the rule is the line's: the fewest false alarms among the
thresholds that reach image recall >= `min_recall`. That is the highest threshold that still
keeps ceil(min_recall x defective) defective parts at or above it; it is placed halfway down to
the next lower score, which changes no validation verdict but leaves a margin. The sorted
scores themselves are the grid, so it goes as low as the scores do (1e-6 at the least).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from edge.contract import PostprocessParams
from edge.postprocess import binarize
from training.core.evaluate import evaluate_predictions
from training.core.metrics import prf, ratio

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07,
                                         *(round(0.1 + 0.05 * i, 2) for i in range(18)))  # 0.01..0.95
DEFAULT_MIN_AREAS: tuple[int, ...] = (0, 4, 8, 16, 32, 64, 128)
FEW_DEFECTIVE = 5


@dataclasses.dataclass
class Grid:
    """Counts of every (threshold, min_area) setting; arrays are [n_thresholds, n_min_areas]."""

    thresholds: np.ndarray
    min_areas: np.ndarray
    img_tp: np.ndarray
    img_fp: np.ndarray
    img_fn: np.ndarray
    img_tn: np.ndarray
    px_tp: np.ndarray
    px_fp: np.ndarray
    px_fn: np.ndarray

    def row(self, i: int, j: int) -> dict[str, Any]:
        """Metrics of one setting (same conventions as training.core.metrics)."""
        tp, fp, fn, tn = (int(a[i, j]) for a in (self.img_tp, self.img_fp, self.img_fn, self.img_tn))
        p, r, f1 = prf(tp, fp, fn)
        ptp, pfp, pfn = int(self.px_tp[i, j]), int(self.px_fp[i, j]), int(self.px_fn[i, j])
        return {
            "pixel_threshold": float(self.thresholds[i]),
            "min_area": int(self.min_areas[j]),
            "image_precision": p,
            "image_recall": r,
            "image_f1": f1,
            "image_fp": fp,
            "image_fn": fn,
            "image_fp_rate": ratio(fp, fp + tn),
            "pixel_iou": ratio(ptp, ptp + pfp + pfn),
        }


def grid_counts(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], thresholds: Sequence[float],
    min_areas: Sequence[int], base: PostprocessParams,
) -> Grid:
    """Image and pooled pixel confusion counts of every setting, one component pass per threshold."""
    ths = np.asarray(thresholds, dtype=np.float64)
    areas_grid = np.asarray(min_areas, dtype=np.int64)
    eff = np.maximum(areas_grid, 1)  # postprocess drops components with area < max(min_area, 1)
    nt, na = len(ths), len(areas_grid)
    z = lambda: np.zeros((nt, na), np.int64)  # noqa: E731
    g = Grid(ths, areas_grid, z(), z(), z(), z(), z(), z(), z())
    for prob, mask in zip(probs, masks, strict=True):
        prob = prob.astype(np.float32, copy=False)
        true = mask.astype(bool, copy=False)
        n_true = int(np.count_nonzero(true))
        defective = n_true > 0
        peak = prob.max(keepdims=True)  # an array, so `>= t` rounds t exactly as binarize does
        for i, t in enumerate(ths.tolist()):  # Python floats: compared in float32 like binarize
            flagged: np.ndarray = np.zeros(na, bool)
            if bool((peak >= t).any()):  # else the binary map is empty (morphology cannot add pixels)
                binary = binarize(prob, dataclasses.replace(base, pixel_threshold=float(t)))
                n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
                if n > 1:
                    comp_area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
                    overlap = (np.bincount(labels[true], minlength=n)[1:] if defective
                               else np.zeros(n - 1, np.int64))
                    keep = comp_area[None, :] >= eff[:, None]  # [na, n_components]
                    tp = keep @ overlap
                    g.px_tp[i] += tp
                    g.px_fp[i] += keep @ comp_area - tp
                    g.px_fn[i] += n_true - tp
                    flagged = np.asarray(keep.any(axis=1))
                else:
                    g.px_fn[i] += n_true
            else:
                g.px_fn[i] += n_true  # nothing reaches the threshold: no region at any min_area
            if defective:
                g.img_tp[i] += flagged
                g.img_fn[i] += ~flagged
            else:
                g.img_fp[i] += flagged
                g.img_tn[i] += ~flagged
    return g


def _order(r: dict[str, Any]) -> tuple[Any, ...]:
    """Fewest false alarms first, then the tie-breaks of the module docstring."""
    return (r["image_fp"], -r["image_recall"], -r["pixel_iou"], -r["image_f1"], r["min_area"], r["pixel_threshold"])


def _pick(rows: list[dict[str, Any]], min_recall: float) -> tuple[dict[str, Any], str]:
    """The documented selection rule over grid rows with defective parts present."""
    feasible = [r for r in rows if r["image_recall"] >= min_recall - 1e-12]
    if feasible:
        best = min(feasible, key=_order)
        return best, (f"fewest false alarms ({best['image_fp']}) among {len(feasible)} setting(s) with "
                      f"image recall >= {min_recall}; ties broken by recall, then pixel IoU")
    best = min(rows, key=lambda r: (-r["image_recall"], *_order(r)))
    return best, (f"no setting reaches image recall {min_recall}: highest recall "
                  f"({best['image_recall']:.4f}), ties broken by fewest false alarms")


def recall_cost(rows: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
    """What the chosen recall costs: its false alarms against the best-F1 setting's."""
    f1 = min(rows, key=lambda r: (-r["image_f1"], *_order(r)))
    return {"chosen_false_alarms": best["image_fp"], "chosen_recall": best["image_recall"],
            "chosen_fp_rate": best["image_fp_rate"], "best_f1_false_alarms": f1["image_fp"],
            "best_f1_recall": f1["image_recall"], "best_f1_setting": [f1["pixel_threshold"], f1["min_area"]],
            "extra_false_alarms": best["image_fp"] - f1["image_fp"]}


PART_THRESHOLD_MIN = 1e-6  # part_threshold must lie in (0, 1)


def calibrate_part_threshold(
    parts: Sequence[float], masks: Sequence[np.ndarray], base: PostprocessParams, min_recall: float = 0.95,
) -> tuple[PostprocessParams, dict[str, Any]]:
    """(base with part_threshold set, report) from per-image part scores; see the module docstring.

    Without defective parts: the lowest threshold with no false alarm on the good parts (warned).
    """
    if len(parts) != len(masks):
        raise ValueError(f"{len(parts)} part scores but {len(masks)} masks")
    scores = np.asarray(parts, dtype=np.float64)
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("part scores contain NaN or infinite values")
    labels = np.array([bool(np.any(m)) for m in masks], dtype=bool)
    pos, neg = np.sort(scores[labels])[::-1], scores[~labels]
    warnings: list[str] = []
    if scores.size == 0:
        return base, {"part_threshold": base.part_threshold, "reason": "no validation data",
                      "warnings": ["no validation parts: part_threshold left as it was"]}
    if pos.size == 0:
        top = float(neg.max())
        t = float(np.nextafter(top, 1.0))
        reason = f"no defective parts: lowest threshold above the highest good part's score {top:.4g}"
        warnings.append("no defective parts in validation: part_threshold only avoids false alarms")
    else:
        k = max(1, math.ceil(min_recall * pos.size - 1e-9))
        anchor = float(pos[k - 1])  # the k-th highest defective score: the highest threshold with recall reached
        below = scores[scores < anchor]
        t = 0.5 * (anchor + float(below.max())) if below.size else anchor
        reason = (f"highest threshold with image recall >= {min_recall} ({k}/{pos.size} defective parts), "
                  f"halfway to the next lower score")
        if pos.size < FEW_DEFECTIVE:
            warnings.append(f"only {pos.size} defective part(s) in validation (< {FEW_DEFECTIVE}): the "
                            f"calibrated part_threshold is uncertain")
    t = float(min(max(t, PART_THRESHOLD_MIN), 1.0 - PART_THRESHOLD_MIN))
    flagged = scores >= t
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    chosen = dataclasses.replace(base, part_threshold=t)
    chosen.validate()
    return chosen, {
        "part_threshold": t, "reason": reason, "warnings": warnings, "n_defective": int(pos.size),
        "n_good": int(neg.size), "image_recall": ratio(tp, int(pos.size)), "image_fp": fp,
        "image_fp_rate": ratio(fp, int(neg.size)), "min_recall": float(min_recall),
    }


def calibrate(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_recall: float = 0.97,
    thresholds: Sequence[float] | None = None, min_areas: Sequence[int] | None = None,
    base: PostprocessParams | None = None,
) -> tuple[PostprocessParams, dict[str, Any]]:
    """(chosen params, report). `base` supplies open/close radii (kept) and the fallback setting.

    The report holds: chosen, reason, warnings (list of str), n_images, n_defective, n_good,
    min_recall, recall_reached, grid_size, grid_best (grid row of the choice, None if base kept),
    top (best 5 settings by the rule) and metrics
    (evaluate_predictions of the chosen params, i.e. the authoritative numbers).
    """
    base = base or PostprocessParams()
    ths = sorted({round(float(t), 6) for t in (DEFAULT_THRESHOLDS if thresholds is None else thresholds)})
    areas = sorted({int(a) for a in (DEFAULT_MIN_AREAS if min_areas is None else min_areas)})
    if not ths or not areas:
        raise ValueError("calibration needs at least one threshold and one min_area")
    if any(not 0.0 < t < 1.0 for t in ths) or any(a < 0 for a in areas):
        raise ValueError("thresholds must be in (0, 1) and min_areas >= 0")
    if len(probs) != len(masks):
        raise ValueError(f"{len(probs)} probability maps but {len(masks)} masks")
    for i, (p, m) in enumerate(zip(probs, masks, strict=True)):
        if p.shape != m.shape:
            raise ValueError(f"image {i}: probability map {p.shape} and mask {m.shape} differ in shape")

    n = len(probs)
    n_def = sum(bool(np.any(m)) for m in masks)
    warnings: list[str] = []
    report: dict[str, Any] = {"n_images": n, "n_defective": n_def, "n_good": n - n_def,
                              "min_recall": float(min_recall), "grid_size": [len(ths), len(areas)]}
    if n == 0:
        warnings.append("no validation maps: kept the base postprocessing parameters uncalibrated")
        report.update(chosen=base.to_dict(), reason="no validation data", recall_reached=False,
                      top=[], metrics={}, warnings=warnings)
        return base, report

    grid = grid_counts(probs, masks, ths, areas, base)
    rows = [grid.row(i, j) for i in range(len(ths)) for j in range(len(areas))]
    if n_def == 0:
        warnings.append("no defective parts in validation: recall and F1 are undefined; chose the most "
                        "sensitive setting with no false positive on the good parts")
        clean = [r for r in rows if r["image_fp"] == 0]
        if clean:
            best = min(clean, key=lambda r: (r["pixel_threshold"], r["min_area"]))
            reason = (f"lowest threshold, then min_area, with 0 false positives on {n} good part(s)")
            chosen = dataclasses.replace(base, pixel_threshold=best["pixel_threshold"], min_area=best["min_area"])
        else:
            warnings.append("every setting flags some good part: kept the base parameters")
            reason, chosen, best = "no setting free of false positives; kept base parameters", base, None
        top = clean[:5]
    else:
        if n_def < FEW_DEFECTIVE:
            warnings.append(f"only {n_def} defective part(s) in validation (< {FEW_DEFECTIVE}): the "
                            f"calibrated threshold/min_area are uncertain; validate on more defects")
        best, reason = _pick(rows, min_recall)
        chosen = dataclasses.replace(base, pixel_threshold=best["pixel_threshold"], min_area=best["min_area"])
        feasible = [r for r in rows if r["image_recall"] >= min_recall - 1e-12] or rows
        top = sorted(feasible, key=_order)[:5]
        report["cost"] = recall_cost(rows, best)
        # the setting that draws the defects best, for when a score threshold decides the verdict
        report["mask_best"] = max(rows, key=lambda r: (r["pixel_iou"], -r["min_area"], -r["pixel_threshold"]))
    chosen.validate()
    metrics = evaluate_predictions(probs, masks, chosen)
    report.update(
        chosen=chosen.to_dict(),
        reason=reason,
        recall_reached=bool(n_def > 0 and metrics["image_recall"] >= min_recall),
        grid_best=best,
        top=top,
        metrics=metrics,
        warnings=warnings,
    )
    return chosen, report
