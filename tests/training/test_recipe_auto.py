"""The automatic recipe: statistics of the data -> scale, fold, patch, tile and validation interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from training.core import recipe_auto
from training.core.recipe_auto import DataStats, choose, component_sizes, data_stats, resolve_auto
from training.core.train_config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "train" / "default.yaml"
MT = ROOT / "configs" / "train" / "magnetic-tile.yaml"
DEMO = ROOT / "configs" / "train" / "synthetic-demo.yaml"


def _stats(h: int, w: int, n: int, thin: float, area: float = 200.0) -> DataStats:
    """n frames of h x w with defect components `thin` px thin (a spread around it)."""
    t = np.full(40, float(thin))
    return DataStats(np.full(n, float(h)), np.full(n, float(w)), {"defect": t}, {"defect": np.full(40, area)})


BLOBS = _stats(330, 270, 700, thin=7)  # compact parts, 7-px blowholes (Magnetic-Tile-like)
STRIPS = _stats(500, 1250, 256, thin=1)  # long strips, 1-px hairline cracks
BIG = _stats(330, 270, 700, thin=40)  # compact parts, only large defects


def _resolved(stats: DataStats, cfg: TrainConfig, n_val: int = 64) -> TrainConfig:
    from training.core.recipe_auto import config_from_dict, deep_merge

    over, reasons = choose(stats, cfg, n_val)
    assert reasons
    return config_from_dict(deep_merge(cfg.model_dump(mode="json"), over))


def _check_stride(cfg: TrainConfig) -> None:
    assert not cfg.auto_fields()
    stride = cfg.model.stride
    assert cfg.patches.size % stride == 0 and cfg.input.tile % stride == 0
    assert cfg.input.overlap * 2 < cfg.input.tile


def test_default_recipe_is_auto_and_the_demo_is_not() -> None:
    assert set(load_config(DEFAULT).auto_fields()) == {"input.scale", "input.tile", "patches.size",
                                                       "model.space_to_depth", "schedule.val_every_s",
                                                       "schedule.usual_steps", "validation.max_min_area"}
    assert load_config(MT).auto_fields() == load_config(DEFAULT).auto_fields()
    assert load_config(DEMO).auto_fields() == []


def test_compact_blobs_and_long_cracks_choose_differently() -> None:
    cfg = load_config(DEFAULT)
    blobs, strips, big = _resolved(BLOBS, cfg), _resolved(STRIPS, cfg), _resolved(BIG, cfg)
    for c in (blobs, strips, big):
        _check_stride(c)
    # 1-px cracks: every pixel reaches the input; 7-px blobs and large defects can lose some
    assert strips.input.scale == 1.0
    assert blobs.input.scale < 1.0 and big.input.scale <= blobs.input.scale
    # the body runs at input / s: a whole compact part fits 96-128 body px
    blob_body = blobs.input.scale / blobs.model.space_to_depth
    assert 330 * blob_body <= 128 and blobs.patches.size / blobs.model.space_to_depth in (96, 112, 128)
    # large defects need no fold at all: the input itself is at body resolution
    assert big.model.space_to_depth == 1 and big.input.scale == blob_body
    # the strip is tiled along its length without padding its width up to 1250 px
    assert strips.input.tile < 1250 * strips.input.scale and strips.input.tile >= 500 * 0.5


@pytest.mark.parametrize("batch", [16, 8])
def test_usual_steps_follow_the_body_pixels_of_a_step(batch: int) -> None:
    """The "machine too slow" warning must fire for the run that sees too few body pixels, not for a recipe
    whose larger patches need fewer steps: 3,000 steps of 16 (96 px)^2 body patches, in proportion."""
    cfg = load_config(DEFAULT, {"patches": {"batch_size": batch}})
    for stats in (BLOBS, STRIPS, BIG):
        c = _resolved(stats, cfg)
        side = c.patches.size // c.model.space_to_depth
        assert type(c.schedule.usual_steps) is int
        assert c.schedule.usual_steps * batch * side**2 == pytest.approx(3000 * 16 * 96**2, rel=0.05)
    assert _resolved(STRIPS, cfg).schedule.usual_steps < _resolved(BLOBS, cfg).schedule.usual_steps
    over, reasons = choose(BLOBS, cfg, 64)
    assert any(r.startswith(f"schedule.usual_steps {over['schedule']['usual_steps']}:") for r in reasons)
    assert type(over["schedule"]["usual_steps"]) is int  # printed and written as a step count, not "3000.0"
    assert _resolved(BLOBS, load_config(DEFAULT, {"schedule": {"usual_steps": 7}})).schedule.usual_steps == 7
    with pytest.raises(ValueError, match="usual_steps"):
        load_config(DEFAULT, {"schedule": {"usual_steps": 0}})


def test_thin_defects_win_over_context_when_the_fold_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(DEFAULT)
    monkeypatch.setattr(recipe_auto, "USE_VIEWS_STEM", False)  # plain pixel unshuffle: s <= 2
    capped = _resolved(STRIPS, cfg)
    assert capped.input.scale == 1.0 and capped.model.space_to_depth == 2
    monkeypatch.setattr(recipe_auto, "USE_VIEWS_STEM", True)  # the pooled-views stem: s up to 4
    over, reasons = choose(STRIPS, cfg, 64)
    assert over["model"]["space_to_depth"] == 4 and over["input"]["scale"] == 1.0
    assert over["model"]["stem"] == "views" and any("views" in r for r in reasons)


@pytest.mark.parametrize("over", [
    {"input": {"scale": 0.5}},
    {"model": {"space_to_depth": 4}},
    {"patches": {"size": 96}},
    {"input": {"tile": 320}},
    {"input": {"scale": 0.25, "tile": 160}, "model": {"space_to_depth": 1}, "patches": {"size": 96}},
    {"schedule": {"val_every_s": 90}},
], ids=str)
@pytest.mark.parametrize("stats", [BLOBS, STRIPS, BIG], ids=["blobs", "strips", "big"])
def test_explicit_values_are_never_overridden_and_the_stride_holds(over: dict[str, Any], stats: DataStats) -> None:
    cfg = load_config(DEFAULT, over)
    resolved = _resolved(stats, cfg)
    _check_stride(resolved)
    for section, fields in over.items():
        for key, value in fields.items():
            assert getattr(getattr(resolved, section), key) == value


def test_an_explicit_side_limits_the_fold_instead_of_breaking_the_stride() -> None:
    cfg = load_config(DEFAULT, {"patches": {"size": 112}})  # 112 = 7 x 16: no 2 x 2 or 4 x 4 fold fits
    over, _ = choose(STRIPS, cfg, 64)
    assert over["model"]["space_to_depth"] == 1 and "size" not in over.get("patches", {})


def test_validation_interval_keeps_validation_a_small_share() -> None:
    cfg = load_config(DEFAULT)
    small = choose(BLOBS, cfg, 20)[0]["schedule"]["val_every_s"]
    many = choose(_stats(4000, 4000, 50, thin=1), cfg, 400)[0]["schedule"]["val_every_s"]
    assert small == recipe_auto.MIN_VAL_EVERY_S and many > 10 * small


def test_component_sizes_measure_thin_side_and_area() -> None:
    m = np.zeros((80, 80), np.uint8)
    cv2.line(m, (5, 5), (70, 40), 1, 1)  # a diagonal 1-px crack: a bounding box would call it 35 px
    m[60:63, 5:60] = 1  # a 3-px line
    cv2.circle(m, (60, 12), 5, 1, -1)  # an 11-px blob
    thin, area = component_sizes(m)
    by_area = dict(zip(area.tolist(), thin.tolist(), strict=True))
    assert by_area[165.0] == 3.0 and min(thin) == 1.0 and max(thin) >= 7.0
    assert component_sizes(np.zeros((5, 5), np.uint8))[0].size == 0


def test_resolve_auto_reads_the_data_and_leaves_explicit_configs_alone() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (100, 300), np.uint8) for _ in range(6)]
    masks = [np.zeros((100, 300), np.uint8) for _ in range(6)]
    masks[0][50, 10:200] = 1  # a 1-px crack
    cfg, why = resolve_auto(load_config(DEFAULT), images, masks, ["crack"] + ["good"] * 5, 2)
    assert not cfg.auto_fields() and cfg.input.scale == 1.0
    assert any("aspect" in w for w in why) and any("input.scale 1" in w for w in why)
    stats = data_stats(images, masks, ["crack"] + ["good"] * 5)
    assert stats.smallest_thin() == 1.0 and not stats.compact
    demo = load_config(DEMO)
    assert resolve_auto(demo, images, masks, ["crack"] + ["good"] * 5, 2) == (demo, [])


def test_calibration_may_not_drop_regions_the_size_of_the_smallest_defects() -> None:
    """A min_area larger than the product's small defects passed 30-100 px blowholes on Magnetic-Tile's
    held-out parts: the cap follows the smallest defects' area, and calibration's grid stops there."""
    from training.core.calibrate import calibrate
    from training.core.evaluate import evaluate_predictions
    from training.core.train_utils import min_area_grid

    cfg = load_config(DEFAULT)
    small = _resolved(_stats(330, 270, 700, thin=7, area=40.0), cfg).validation
    large = _resolved(_stats(330, 270, 700, thin=40, area=2000.0), cfg).validation
    assert small.max_min_area == 20 and large.max_min_area == 1000
    assert min_area_grid(small) == [0, 4, 8, 16] and min_area_grid(large) == [0, 4, 8, 16, 32, 64, 128]
    no_defects = DataStats(np.full(5, 100.0), np.full(5, 100.0))
    assert _resolved(no_defects, cfg).validation.max_min_area is None
    # calibration parts: a good one with a 40 px false spot, a defective one with a 100 px region. The whole
    # grid drops the spot at no recall cost there (min_area 64); a held-out part's 24 px blowhole then passes
    def part(region: tuple[slice, slice] | None, spot: tuple[slice, slice] | None) -> tuple[np.ndarray, np.ndarray]:
        prob, mask = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.uint8)
        for where, is_defect in ((region, 1), (spot, 0)):
            if where is not None:
                prob[where], mask[where] = 0.9, is_defect
        return prob, mask

    calib = [part(None, (slice(10, 15), slice(10, 18))), part((slice(30, 40), slice(30, 40)), None)]
    held_out = [part((slice(20, 24), slice(20, 26)), None)]
    whole, _ = calibrate([p for p, _ in calib], [m for _, m in calib], min_recall=0.97)
    capped, _ = calibrate([p for p, _ in calib], [m for _, m in calib], min_recall=0.97,
                          min_areas=min_area_grid(small))
    assert whole.min_area == 64 and capped.min_area <= 20
    recall = [evaluate_predictions([p for p, _ in held_out], [m for _, m in held_out], c)["image_recall"]
              for c in (whole, capped)]
    assert recall == [0.0, 1.0]


def test_measured_validation_time_sets_the_interval() -> None:
    assert recipe_auto.val_interval(0.5) == recipe_auto.MIN_VAL_EVERY_S
    assert recipe_auto.val_interval(20.0) == pytest.approx(180.0)  # 20 s of every 200 s = 10 %


def test_ragged_outlines_and_annotation_specks_do_not_make_defects_thin() -> None:
    m = np.zeros((120, 120), np.uint8)
    cv2.circle(m, (60, 60), 20, 1, -1)
    for a in np.linspace(0, 2 * np.pi, 24, endpoint=False):  # a ragged outline: 1-px spurs all round
        cv2.line(m, (60, 60), (int(60 + 27 * np.cos(a)), int(60 + 27 * np.sin(a))), 1, 1)
    thin, _ = component_sizes(m)
    assert thin[0] >= 30
    speck = np.zeros((120, 120), np.uint8)
    speck[5, 5] = 1  # a one-pixel annotation speck next to a 41-px stain
    stats = data_stats([m, speck | m], [m, speck | m], ["stain", "stain"])
    assert stats.thin["stain"].size == 2 and stats.smallest_thin() >= 30
