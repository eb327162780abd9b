"""Synthetic parts: determinism, textured good parts, masks exactly where the image changed."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.core.synth import DEFECT_TYPES, VISIBLE_DELTA, generate_dataset, make_part, render_part

SIZE = (64, 80)  # height, width: small and non-square on purpose


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 12, seed=3, size=SIZE, progress=False)
    b = generate_dataset(tmp_path / "b", 12, seed=3, size=SIZE, progress=False)
    generate_dataset(tmp_path / "c", 12, seed=4, size=SIZE, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and fa == fb and len(fa) == 24
    assert fa != fc


def test_counts_names_and_masks(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, 20, seed=0, size=SIZE, defect_fraction=0.5, progress=False)
    assert sum(counts.values()) == 20 and counts["good"] == 10
    assert all(counts[t] == 2 for t in DEFECT_TYPES)  # defect types take equal turns
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "masks").iterdir())
    for name in names:
        assert re.fullmatch(r"(good|scratch|crack|pit|stain|missing)_\d{5}\.png", name)
        mask = cv2.imread(str(tmp_path / "masks" / name), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(tmp_path / "images" / name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape == SIZE
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any() == (not name.startswith("good_")), name  # good parts get an all-zero mask


def test_rerun_removes_stale_parts_but_not_foreign_files(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 10, seed=0, size=SIZE, progress=False)
    (tmp_path / "images" / "mine.txt").write_text("keep me")
    generate_dataset(tmp_path, 4, seed=0, size=SIZE, progress=False)
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    assert len(list((tmp_path / "masks").glob("*.png"))) == 4
    assert (tmp_path / "images" / "mine.txt").exists()


@pytest.mark.parametrize("color", ["gray", "bgr"])
@pytest.mark.parametrize("defect", [None, *DEFECT_TYPES])
def test_mask_marks_exactly_the_changed_pixels(defect: str | None, color: str) -> None:
    for seed in range(4):
        part = render_part(np.random.default_rng(seed), SIZE, color, defect)
        assert part.image.shape == part.clean.shape == ((*SIZE, 3) if color == "bgr" else SIZE)
        assert part.image.dtype == part.mask.dtype == np.uint8
        diff = np.abs(part.image.astype(np.int16) - part.clean)
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        np.testing.assert_array_equal(part.mask, (diff > 0).astype(np.uint8))
        assert (diff[part.mask > 0] >= VISIBLE_DELTA).all()  # every marked pixel visibly changed
        assert part.mask.any() == (defect is not None)


def test_good_parts_are_textured_not_flat() -> None:
    for seed in range(9):  # covers all three textures
        image, _ = make_part(np.random.default_rng(seed), (96, 96), "gray", None)
        detail = image.astype(np.float32) - cv2.GaussianBlur(image, (0, 0), 3).astype(np.float32)
        assert image.std() > 4 and detail.std() > 2


def test_colour_parts_are_coloured() -> None:
    image, mask = make_part(np.random.default_rng(1), SIZE, "bgr", "stain")
    assert image.shape == (*SIZE, 3) and mask.shape == SIZE
    means = image.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() > 3  # tinted, not grey in three channels


def test_some_pits_are_tiny() -> None:
    areas = []
    for seed in range(15):
        _, mask = make_part(np.random.default_rng(seed), (128, 128), "gray", "pit")
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas += list(stats[1:n, cv2.CC_STAT_AREA])
    assert min(areas) <= 30 and any(10 <= a <= 30 for a in areas)
    assert max(areas) < 200


def test_same_rng_state_gives_same_part() -> None:
    a = make_part(np.random.default_rng(7), SIZE, "gray", "crack")
    b = make_part(np.random.default_rng(7), SIZE, "gray", "crack")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"defect_type": "dent"}, "defect_type"),
    ({"color": "rgb"}, "color"),
    ({"size": (16, 16)}, "size"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_part(np.random.default_rng(0), **kwargs)


# --------------------------------------------------------------------------- the strip profile

STRIP = (96, 240)  # a small long part: the profile's 500 x 1250 would make the tests slow


def test_strip_profile_is_deterministic_long_and_mixes_hairline_cracks(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 16, seed=5, size=STRIP, progress=False, profile="strip")
    b = generate_dataset(tmp_path / "b", 16, seed=5, size=STRIP, progress=False, profile="strip")
    assert a == b and _files(tmp_path / "a") == _files(tmp_path / "b")
    assert a == {"good": 8, "crack": 4, "pit": 2, "scratch": 2}  # half good; cracks are half the defects
    for path in (tmp_path / "a" / "images").glob("*.png"):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "a" / "masks" / path.name), cv2.IMREAD_UNCHANGED)
        assert image.shape == STRIP and mask.shape == STRIP
        assert mask.any() == (not path.name.startswith("good"))


def test_strip_defaults_to_500_by_1250() -> None:
    part = render_part(np.random.default_rng(0), None, defect_type=None, profile="strip")
    assert part.image.shape == (500, 1250) and part.texture == "commutator"


def test_strip_cracks_are_hairlines_and_the_mask_is_exact() -> None:
    from training.core.recipe_auto import component_sizes

    thin = []
    for seed in range(12):
        part = render_part(np.random.default_rng(seed), STRIP, defect_type="crack", profile="strip")
        assert np.array_equal(part.mask > 0, part.image != part.clean)
        t, _ = component_sizes(part.mask)
        thin += t.tolist()
    assert 1 <= np.median(thin) <= 3 and max(thin) <= 5 and min(thin) == 1  # 1-3 px (wider where branches meet)


def test_strip_bars_make_a_periodic_texture_across_the_long_axis() -> None:
    part = render_part(np.random.default_rng(3), STRIP, profile="strip")
    profile = part.image.astype(np.float32).mean(axis=0)  # averaged along the bars
    dips = profile < np.percentile(profile, 5)  # the dark insulating gaps between the bars
    assert 2 <= np.count_nonzero(np.diff(dips.astype(int)) == 1) <= 8


def test_unknown_profile_and_defect_are_named() -> None:
    with pytest.raises(ValueError, match="profile"):
        render_part(np.random.default_rng(0), STRIP, profile="disc")
    with pytest.raises(ValueError, match="stain"):
        render_part(np.random.default_rng(0), STRIP, defect_type="stain", profile="strip")
