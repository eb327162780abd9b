"""The real-data recipe on Magnetic-Tile: the untouched default recipe, 8 minutes of training on
this machine's 2 cores, exported to INT8 and judged on held-out parts that chose nothing.

Slow (about 12 minutes) and needs ../shared/data/magnetic-tile, so it is not in the default run:

    scripts/test.sh -m slow tests/training/test_real_data.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from training.core.evaluate import main as evaluate_main
from training.core.train import main as train_main
from training.release.export import main as export_main

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MAGNETIC_TILE", ROOT.parent / "shared" / "data" / "magnetic-tile"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # 8 min of training + export + evaluation (default timeout: 600 s)
    pytest.mark.skipif(not (DATA / "images").is_dir(), reason=f"no Magnetic-Tile data at {DATA}"),
]


def test_default_recipe_on_magnetic_tile_in_eight_minutes(tmp_path: Path) -> None:
    run, pkg, result = tmp_path / "run", tmp_path / "pkg", tmp_path / "test.json"
    assert train_main(["--config", str(ROOT / "configs" / "train" / "default.yaml"), "--data", str(DATA),
                       "--out", str(run), "--time-budget", "8", "--set", "log.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["elapsed_s"] < 8 * 60 + 60
    assert summary["overhead_pct"] is not None and summary["overhead_pct"] <= 12.0  # validation + mining
    assert export_main(["--checkpoint", str(run / "best.pt"), "--out", str(pkg), "--calib-data", str(DATA)]) == 0
    assert evaluate_main(["--model", str(pkg), "--data", str(DATA), "--json", str(result), "--split", "test",
                          "--no-progress"]) == 0
    m = json.loads(result.read_text())
    assert m["n_images"] >= 180  # the held-out fifth of 946 parts
    # issue 15's figures come from scripts/recipe_report.py (docs/benchmarks.md, "The component term"): 8 minutes
    # on the AMX Xeon (2,400-2,969 steps) reach held-out INT8 image AP 0.905-0.990 and pixel IoU 0.32-0.42 over 3
    # seeds, recall 1.0; 1,100 steps (a machine 2.5x slower) AP 0.820, IoU 0.23. The targets (accuracy and recall
    # >= 0.97, IoU >= 0.70) are not met. The guards sit below the slow machine's figures, so a failure says the
    # recipe got worse, not that the targets still stand open.
    assert m["image_recall"] >= 0.95, m
    assert m["image_ap"] >= 0.78, m
    assert m["pixel_iou"] >= 0.15, m
