"""scripts/recipe_report.py: the report puts each package's held-out figures beside its FP32 checkpoint's."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("recipe_report", ROOT / "scripts" / "recipe_report.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(acc: float, recall: float, iou: float, fp: int, fn: int) -> dict[str, Any]:
    return {"image_accuracy": acc, "image_recall": recall, "pixel_iou": iou, "image_ap": 0.9, "image_fp": fp,
            "image_fn": fn}


def _row(seed: int, test: dict[str, Any], fp32: dict[str, Any] | None) -> dict[str, Any]:
    cats = {"good": {"parts": 10, "missed": 0, "false_alarms": test["image_fp"]},
            "break": {"parts": 5, "missed": test["image_fn"], "false_alarms": 0}}
    return {"seed": seed, "steps": 1000, "speed": "speed: 500 steps/min", "overhead_pct": 10.0, "precision": "int8",
            "test": test, "torch_test": fp32, "by_category": cats}


def test_the_report_sets_the_fp32_checkpoint_beside_the_package() -> None:
    rr = _module()
    rows = [_row(0, _metrics(0.95, 0.90, 0.60, 2, 3), _metrics(0.96, 0.95, 0.62, 2, 1)),
            _row(1, _metrics(0.85, 1.0, 0.50, 4, 0), _metrics(0.87, 1.0, 0.52, 3, 0)),
            _row(2, _metrics(0.80, 1.0, 0.40, 6, 0), None),  # train reported no test figures
            {"seed": 3, "error": "exit code 1"}]
    agg = rr.aggregate(rows)
    assert agg["seeds_done"] == 3 and agg["seeds_failed"] == 1
    assert abs(agg["image_recall"]["mean"] - (0.90 + 1.0 + 1.0) / 3) < 1e-9
    assert abs(agg["fp32"]["image_recall"]["mean"] - (0.95 + 1.0) / 2) < 1e-9  # the seed without figures is left out
    assert agg["fp32"]["image_fn"] == {"mean": 0.5, "min": 0.0, "max": 1.0}
    args = argparse.Namespace(config="c.yaml", data="d", time_budget=8.0, max_steps=None, seeds=[0, 1, 2, 3],
                              split_seed=0, folds=None)
    text = rr.markdown(args, rows, agg)
    lines = text.splitlines()
    seed0 = next(ln for ln in lines if ln.startswith("| 0 |"))
    assert seed0.endswith("| 0.9600 / 0.9500 / 0.6200, 2 / 1 |"), seed0
    assert next(ln for ln in lines if ln.startswith("| 2 |")).endswith("| - |")
    assert "| image_recall | 0.9667 | 0.9000 | 1.0000 | 0.9750 (0.9500-1.0000) |" in lines
    assert any(ln.startswith("| 3 | failed: exit code 1") for ln in lines)
    assert "Per physical part" not in text  # no data.parts rule: images are the parts


def test_the_report_counts_physical_parts_when_the_split_grouped_them() -> None:
    rr = _module()
    row = _row(0, _metrics(0.9, 0.9, 0.5, 3, 2), None)
    row["by_physical_part"] = {"parts": 46, "defective_parts": 13, "good_parts": 33,
                               "defective_parts_with_a_miss": 1, "good_parts_with_a_false_alarm": 2}
    args = argparse.Namespace(config="c.yaml", data="d", time_budget=8.0, max_steps=None, seeds=[0], split_seed=0,
                              folds=None)
    lines = rr.markdown(args, [row], rr.aggregate([row])).splitlines()
    assert "| 0 | 46 | 1 of 13 | 2 of 33 |" in lines


def test_k_fold_runs_are_pooled_so_every_part_counts_once() -> None:
    rr = _module()
    rows = []
    for fold, (tp, fp, fn, tn, missed_parts, flagged_parts) in enumerate([(10, 5, 0, 25, 0, 3), (8, 1, 2, 29, 1, 1)]):
        test = {**_metrics((tp + tn) / 40, tp / (tp + fn), 0.5, fp, fn), "image_tp": tp, "image_tn": tn}
        row = {**_row(fold, test, None), "fold": fold,
               "by_physical_part": {"parts": 12, "defective_parts": 3, "good_parts": 9,
                                    "defective_parts_with_a_miss": missed_parts,
                                    "good_parts_with_a_false_alarm": flagged_parts}}
        rows.append(row)
    agg = rr.aggregate(rows)
    p = agg["pooled"]
    assert (p["images"], p["defective"], p["false_alarms"], p["misses"]) == (80, 20, 6, 2)
    assert abs(p["image_accuracy"] - 72 / 80) < 1e-9 and abs(p["image_recall"] - 18 / 20) < 1e-9
    assert (p["defective_parts_with_a_miss"], p["good_parts_with_a_false_alarm"], p["parts"]) == (1, 4, 24)
    args = argparse.Namespace(config="c.yaml", data="d", time_budget=8.0, max_steps=None, seeds=[0, 1],
                              split_seed=0, folds=2)
    text = rr.markdown(args, rows, agg)
    assert "2 folds over physical parts" in text
    assert "80 images, 20 defective: accuracy **0.9000**, recall **0.9000**, 6 false alarms, 2 misses" in text
    assert "1 of 6 defective parts had an image passed, 4 of 18 good parts had an image flagged" in text
    assert any(ln.startswith("| 1 (fold 1) |") for ln in text.splitlines())


def test_folds_need_one_seed_each(capsys: Any) -> None:
    import pytest

    with pytest.raises(SystemExit):
        _module().main(["--data", "d", "--out", "o", "--folds", "3", "--seeds", "0", "1"])
    assert "--folds 3 needs one seed per fold" in capsys.readouterr().err
