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
    # issue 2's targets: pixel IoU >= 0.60 (goal 0.70), image accuracy >= 0.95 (goal 0.98). With the
    # image term (loss.image_weight 0.3) six runs measured IoU 0.738-0.775, accuracy 0.953-0.968,
    # recall 0.862-0.897 and AP 0.950-0.977 (docs/benchmarks.md). The IoU guard sits at the level
    # reached, the accuracy guard at the target itself (the weakest run made the 9 errors of 190
    # it allows: a failure here says the target did not hold), recall and AP below the runs.
    assert m["pixel_iou"] >= 0.70, m
    assert m["image_accuracy"] >= 0.95, m
    assert m["image_recall"] >= 0.85 and m["image_ap"] >= 0.94, m
    assert (tmp_path / "val_grid.png").is_file() and (tmp_path / "curves.png").is_file()
