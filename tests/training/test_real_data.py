"""The real-data recipe on Magnetic-Tile: 20 minutes of training on this machine's 2 cores.

Slow (about 21 minutes) and needs ../shared/data/magnetic-tile, so it is not in the default run:

    scripts/test.sh -m slow tests/training/test_real_data.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from training.train import main

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MAGNETIC_TILE", ROOT.parent / "shared" / "data" / "magnetic-tile"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # 20 min of training + data loading and pictures (default timeout: 600 s)
    pytest.mark.skipif(not (DATA / "images").is_dir(), reason=f"no Magnetic-Tile data at {DATA}"),
]


def test_magnetic_tile_recipe_in_twenty_minutes(tmp_path: Path) -> None:
    assert main(["--config", str(ROOT / "configs" / "train" / "magnetic-tile.yaml"), "--data", str(DATA),
                 "--out", str(tmp_path), "--time-budget", "20", "--set", "log.progress=false"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["elapsed_s"] < 20 * 60 + 60
    # issue 2's pixel target is 0.60 (goal 0.70); the recipe measured 0.757-0.786 in five runs,
    # so this guards the level reached rather than the target
    assert m["pixel_iou"] >= 0.70, m
    # the image target is 0.95, met in one of five runs (0.958; the others 0.947, 0.942, 0.916 and
    # 0.905, recall 0.914-0.966, AP 0.952-0.965; see docs/benchmarks.md). This guards the level reached,
    # with room for the run-to-run spread of bf16, timed epochs and the recall-first calibration.
    assert m["image_accuracy"] >= 0.88 and m["image_recall"] >= 0.85 and m["image_ap"] >= 0.92, m
    assert (tmp_path / "val_grid.png").is_file() and (tmp_path / "curves.png").is_file()
