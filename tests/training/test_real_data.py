"""The real-data recipe on Magnetic-Tile: the untouched default recipe (magnetic-tile.yaml adds only
the name, grey and which images show one tile), 8 minutes of training on this machine's 2 cores,
exported to INT8 and judged on held-out tiles that chose nothing and were never trained on under
another exposure.

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
    assert train_main(["--config", str(ROOT / "configs" / "train" / "magnetic-tile.yaml"), "--data", str(DATA),
                       "--out", str(run), "--time-budget", "8", "--set", "log.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["elapsed_s"] < 8 * 60 + 60
    assert summary["overhead_pct"] is not None and summary["overhead_pct"] <= 12.0  # validation + mining
    assert export_main(["--checkpoint", str(run / "best.pt"), "--out", str(pkg), "--calib-data", str(DATA)]) == 0
    assert evaluate_main(["--model", str(pkg), "--data", str(DATA), "--json", str(result), "--split", "test",
                          "--no-progress"]) == 0
    m = json.loads(result.read_text())
    assert m["n_images"] >= 170  # the held-out fifth of 237 tiles (946 images)
    # issue 15's figures come from scripts/recipe_report.py (docs/benchmarks.md, "Ninth session"): 8 minutes on a
    # 2-vCPU AVX-512 EPYC (3,841-3,970 steps), with each tile's exposures on one side of the split, give held-out
    # INT8 image recall 0.907-0.982, AP 0.777-0.860 and pixel IoU 0.26-0.44 over 3 seeds (the default augmentation
    # before it: 0.907-0.926, 0.754-0.792, 0.20-0.37); with pasted defects (tenth session) this test gave recall 1.0,
    # AP 0.885, IoU 0.441, and over 5 folds of all tiles the recipe's folds range 0.84-1.0, 0.68-0.95, 0.09-0.35
    # (the guards hold on this split, seed 0, not on every fold). The targets (accuracy
    # and recall >= 0.97, IoU >= 0.70) are not met. The guards sit 0.06-0.16 below the lowest of those figures (a
    # slower machine was not measured on this split), so a failure says the recipe got worse, not that the
    # targets still stand open.
    assert m["image_recall"] >= 0.85, m
    assert m["image_ap"] >= 0.65, m
    assert m["pixel_iou"] >= 0.10, m
