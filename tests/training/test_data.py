"""Dataset loading: both layouts, every bad-data case, reading, fingerprint and the split."""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faults.harness import png_bomb
from training.core.data import (
    DataError,
    Dataset,
    Sample,
    load_dataset,
    load_sample,
    read_image,
    read_mask,
    split_dataset,
    split_holdout,
)
from training.core.synth import make_part

SHAPE = (40, 48)  # height, width


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _generic(root: Path, parts: dict[str, str | None], with_good_masks: bool = True) -> Path:
    """Write NAME -> defect type (None = good) in the generic layout."""
    for i, (name, defect) in enumerate(sorted(parts.items())):
        image, mask = make_part(np.random.default_rng(i), SHAPE, "gray", defect)
        _write(root / "images" / f"{name}.png", image)
        if defect is not None or with_good_masks:
            _write(root / "masks" / f"{name}.png", mask * 255)
    return root


@pytest.fixture
def generic(tmp_path: Path) -> Path:
    return _generic(tmp_path / "ds", {"crack_0": "crack", "crack_1": "crack", "pit_0": "pit",
                                      "good_0": None, "good_1": None, "ok": None})


# --------------------------------------------------------------------------- layouts


def test_generic_layout(generic: Path) -> None:
    (generic / "masks" / "ok.png").unlink()  # missing mask = good part
    ds = load_dataset(generic)
    assert ds.layout == "generic" and ds.skipped == [] and ds.warnings == []
    by = {s.name: s for s in ds.samples}
    assert sorted(by) == ["crack_0", "crack_1", "good_0", "good_1", "ok", "pit_0"]
    assert by["crack_0"].category == "crack" and by["crack_0"].defective is True
    assert by["good_0"].category == "good" and by["good_0"].defective is False
    assert by["good_0"].mask_path is not None  # all-zero mask file: still good
    assert by["ok"].mask_path is None and by["ok"].category == "good" and by["ok"].defective is False
    assert ds.summary() == "6 images (3 defective, 3 good), 0 skipped"
    image, mask = load_sample(by["ok"], "gray")
    assert image.shape == SHAPE and mask.shape == SHAPE and not mask.any()
    image, mask = load_sample(by["pit_0"], "bgr")
    assert image.shape == (*SHAPE, 3) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_jpeg_images_and_name_without_prefix(tmp_path: Path) -> None:
    image, mask = make_part(np.random.default_rng(0), SHAPE, "gray", "scratch")
    _write(tmp_path / "images" / "part7.jpg", image)
    _write(tmp_path / "masks" / "part7.png", mask * 255)
    (s,) = load_dataset(tmp_path).samples
    assert s.category == "defect" and s.defective  # no "_" in the name: a generic defect


def _mvtec(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        _write(root / "train" / "good" / f"{i:03d}.png", make_part(rng, SHAPE, "bgr", None)[0])
    _write(root / "test" / "good" / "000.png", make_part(rng, SHAPE, "bgr", None)[0])
    for i in range(2):
        image, mask = make_part(rng, SHAPE, "bgr", "crack")
        _write(root / "test" / "crack" / f"{i:03d}.png", image)
        _write(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask * 255)
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    ds = load_dataset(_mvtec(tmp_path / "bottle"))
    assert ds.layout == "mvtec" and ds.skipped == []
    by = {s.name: s for s in ds.samples}
    assert sorted(by) == ["test_crack_000", "test_crack_001", "test_good_000",
                          "train_good_000", "train_good_001", "train_good_002"]
    assert by["test_crack_001"].category == "crack" and by["test_crack_001"].defective
    assert by["test_crack_001"].mask_path == tmp_path / "bottle/ground_truth/crack/001_mask.png"
    assert by["test_good_000"].mask_path is None and by["test_good_000"].defective is False
    assert load_sample(by["test_crack_000"], "gray")[1].any()


def test_mvtec_defect_without_mask_and_orphan_mask(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    _write(root / "ground_truth" / "crack" / "009_mask.png", np.zeros(SHAPE, np.uint8))
    ds = load_dataset(root)
    reasons = dict(ds.skipped)
    assert "without mask" in reasons[str(root / "test" / "crack" / "001.png")]
    assert "without an image" in reasons[str(root / "ground_truth" / "crack" / "009_mask.png")]
    assert len(ds.samples) == 5


def test_mvtec_root_with_categories_gets_a_hint(tmp_path: Path) -> None:
    _mvtec(tmp_path / "bottle")
    with pytest.raises(DataError, match="category folder"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- bad data


def test_corrupt_image_is_skipped_or_fatal_when_strict(generic: Path) -> None:
    bad = generic / "images" / "crack_1.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated: header only
    (generic / "images" / "empty.png").write_bytes(b"")
    bomb = generic / "images" / "zbomb.png"  # 45 MP by its header: once an OpenCV assertion that ended the scan
    bomb.write_bytes(png_bomb(9000, 5000))
    ds = load_dataset(generic)
    skipped = dict(ds.skipped)
    assert "not a readable image" in skipped[str(bad)]
    assert str(generic / "images" / "empty.png") in skipped
    assert "9000x5000 = 45000000 pixels by its header" in skipped[str(bomb)]
    assert "crack_1" not in {s.name for s in ds.samples} and len(ds.samples) == 5
    assert ds.summary() == "5 images (2 defective, 3 good), 3 skipped"
    with pytest.raises(DataError, match=r"crack_1\.png"):
        load_dataset(generic, strict=True)


def test_entries_that_are_not_files_are_skipped_unread_and_their_images_with_them(generic: Path) -> None:
    """A FIFO would block the scan if read; a dangling mask link once made its defective image a good part."""
    images, masks = generic / "images", generic / "masks"
    os.mkfifo(images / "fifo_0.png")
    (images / "zero_0.png").symlink_to("/dev/zero")
    (images / "sub.png").mkdir()
    (masks / "crack_1.png").unlink()
    (masks / "crack_1.png").symlink_to(generic / "nowhere.png")  # dangling
    ds = load_dataset(generic)
    skipped = dict(ds.skipped)
    for entry in (images / "fifo_0.png", images / "zero_0.png", images / "sub.png", masks / "crack_1.png"):
        assert skipped[str(entry)].startswith("not a regular file"), entry
    assert skipped[str(images / "crack_1.png")] == ("its mask masks/crack_1.png is not a regular file (a dangling "
                                                    "link, a folder, a FIFO or a device)")
    assert "crack_1" not in {s.name for s in ds.samples} and len(ds.samples) == 5
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset(generic, strict=True)


def test_rgba_masks_are_read_from_their_colour_and_alpha_only_when_it_is_the_label(generic: Path) -> None:
    """An opaque RGBA mask (alpha 255 everywhere, as labelling tools export) once made every pixel a defect."""
    box = np.zeros(SHAPE, np.uint8)
    box[5:9, 10:20] = 255
    opaque = np.full(SHAPE, 255, np.uint8)
    _write(generic / "masks" / "crack_0.png", np.dstack([box, box, box, opaque]))  # label in colour, opaque
    _write(generic / "masks" / "good_0.png", np.dstack([box * 0, box * 0, box * 0, opaque]))  # all black, opaque
    _write(generic / "masks" / "pit_0.png", np.dstack([box * 0, box * 0, box * 0, box]))  # label as transparency
    by = {s.name: s for s in load_dataset(generic).samples}
    assert int(read_mask(by["crack_0"].mask_path, SHAPE).sum()) == 40
    assert not by["good_0"].defective and int(read_mask(by["good_0"].mask_path, SHAPE).sum()) == 0
    assert by["pit_0"].defective and int(read_mask(by["pit_0"].mask_path, SHAPE).sum()) == 40


def test_mask_of_another_size_is_skipped(generic: Path) -> None:
    _write(generic / "masks" / "pit_0.png", np.zeros((SHAPE[0] + 1, SHAPE[1]), np.uint8))
    ds = load_dataset(generic)
    (path, reason), = ds.skipped
    assert path.endswith("pit_0.png") and "48x41" in reason and "48x40" in reason
    assert "pit_0" not in {s.name for s in ds.samples}


def test_unreadable_mask_is_skipped(generic: Path) -> None:
    (generic / "masks" / "crack_0.png").write_bytes(b"garbage")
    ds = load_dataset(generic)
    (path, reason), = ds.skipped
    assert path.endswith("crack_0.png") and "crack_0.png is skipped" in reason


def test_mask_without_image_is_reported(generic: Path) -> None:
    _write(generic / "masks" / "orphan_3.png", np.zeros(SHAPE, np.uint8))
    ds = load_dataset(generic)
    assert ds.skipped == [(str(generic / "masks" / "orphan_3.png"), "mask without an image (no images/orphan_3.*)")]
    assert len(ds.samples) == 6


def test_non_image_and_hidden_files(generic: Path) -> None:
    (generic / "images" / "notes.txt").write_text("x")
    (generic / "images" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(generic)
    assert [p for p, _ in ds.skipped] == [str(generic / "images" / "notes.txt")]


@pytest.mark.parametrize("make", ["missing", "empty", "no_images", "empty_images", "both"])
def test_not_a_dataset(tmp_path: Path, make: str) -> None:
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "no_images":
        (root / "masks").mkdir()
    if make == "empty_images":
        (root / "images").mkdir()
    if make == "both":
        (root / "images").mkdir()
        (root / "train").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(root) in str(err.value)
    if make in ("empty", "no_images", "empty_images"):
        assert "images/" in str(err.value) and "layout" in str(err.value)


def test_only_corrupt_images_is_an_error_naming_the_first(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"no usable images.*a\.png"):
        load_dataset(tmp_path)


def test_lossy_mask_is_thresholded_and_warned(generic: Path) -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:20, 10:20] = 255
    mask[10:20, 20:22] = 3  # JPEG-like fringe of faint values
    mask[0, 0] = 1
    _write(generic / "masks" / "pit_0.png", mask)
    ds = load_dataset(generic)
    assert ds.skipped == [] and len(ds.warnings) == 1 and "4 distinct values" in ds.warnings[0][1]
    assert ds.summary().endswith(", 1 warnings")
    sample = next(s for s in ds.samples if s.name == "pit_0")
    assert read_mask(sample.mask_path, SHAPE).sum() == 100 + 20 + 1  # documented rule: > 0 is defect


def test_empty_mask_under_a_defect_name_is_good_with_warning(generic: Path) -> None:
    _write(generic / "masks" / "crack_1.png", np.zeros(SHAPE, np.uint8))
    ds = load_dataset(generic)
    s = next(s for s in ds.samples if s.name == "crack_1")
    assert s.category == "good" and s.defective is False
    assert any("crack" in msg for _, msg in ds.warnings)


# --------------------------------------------------------------------------- reading


def test_read_image_and_mask(tmp_path: Path) -> None:
    wide = _write(tmp_path / "a16.png", np.full(SHAPE, 0x8000, np.uint16))  # 16 bit scales to 8 bit
    assert read_image(wide, "gray").max() == 0x80
    rgba = _write(tmp_path / "c.png", np.full((*SHAPE, 4), 9, np.uint8))
    assert read_image(rgba, "bgr").shape == (*SHAPE, 3) and read_image(rgba, "gray").shape == SHAPE
    (tmp_path / "bad.png").write_bytes(b"xx")
    with pytest.raises(DataError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png", "gray")
    with pytest.raises(DataError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png", "gray")
    assert not read_mask(None, SHAPE).any() and read_mask(None, SHAPE).shape == SHAPE
    colour_mask = np.zeros((*SHAPE, 3), np.uint8)
    colour_mask[1, 2, 2] = 200
    m = read_mask(_write(tmp_path / "m.png", colour_mask), SHAPE)
    assert m.dtype == np.uint8 and m.sum() == 1 and m[1, 2] == 1
    with pytest.raises(DataError, match=r"m\.png.*48x40.*48x41"):
        read_mask(tmp_path / "m.png", (41, 48))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_copies_and_sees_edits(generic: Path, tmp_path: Path) -> None:
    fp = load_dataset(generic).fingerprint()
    copy = shutil.copytree(generic, tmp_path / "copy")
    assert load_dataset(copy).fingerprint() == fp
    m = np.zeros(SHAPE, np.uint8)
    m[5, 5] = 255
    _write(copy / "masks" / "good_0.png", m)  # one relabelled pixel
    assert load_dataset(copy).fingerprint() != fp
    # a Dataset built by hand (no cached digests) hashes the files itself, with the same result
    ds = load_dataset(generic)
    assert Dataset(ds.root, ds.layout, list(reversed(ds.samples)), []).fingerprint() == fp


# --------------------------------------------------------------------------- split


def _samples(counts: dict[str, int]) -> list[Sample]:
    out = []
    for cat, n in counts.items():
        for i in range(n):
            out.append(Sample(f"{cat}_{i:03d}", Path(f"/x/{cat}_{i:03d}.png"), None if cat == "good" else
                              Path(f"/m/{cat}_{i:03d}.png"), cat, cat != "good"))
    return out


def test_split_is_deterministic_stratified_and_order_independent() -> None:
    samples = _samples({"good": 50, "crack": 10, "pit": 7, "stain": 2, "odd": 1, "rare": 1})
    train, val = split_dataset(samples, 0.2, seed=5)
    names = [s.name for s in train + val]
    assert sorted(names) == sorted(s.name for s in samples) and len(set(names)) == len(names)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert split_dataset(shuffled, 0.2, seed=5) == (train, val)
    assert split_dataset(samples, 0.2, seed=6) != (train, val)
    per_cat = Counter(s.category for s in val)
    assert per_cat["good"] == 10 and per_cat["crack"] == 2 and per_cat["pit"] == 1
    assert per_cat["stain"] == 1  # every stratum of >= 2 gets a validation item
    assert per_cat["odd"] + per_cat["rare"] == 1  # singletons are pooled into one stratum
    assert {s.category for s in train} >= {"good", "crack", "pit", "stain"}


def test_split_edge_cases() -> None:
    samples = _samples({"good": 5, "crack": 2})
    assert split_dataset(samples, 0.0) == (sorted(samples, key=lambda s: s.name), [])
    assert split_dataset([], 0.2) == ([], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_dataset(samples, 1.0)


def test_holdout_split_is_disjoint_stratified_and_keeps_old_splits() -> None:
    samples = _samples({"good": 50, "crack": 10, "pit": 7, "stain": 3})
    parts = split_holdout(samples, 0.2, 0.2, seed=5)
    names = [s.name for s in parts.train + parts.val + parts.test]
    assert sorted(names) == sorted(s.name for s in samples) and len(set(names)) == len(names)
    for held in (parts.val, parts.test):  # both hold every category, in proportion
        per_cat = Counter(s.category for s in held)
        assert per_cat["good"] == 10 and per_cat["crack"] == 2 and per_cat["stain"] >= 1
    # the held-out parts do not move when the calibration share changes, nor with the model seed
    assert split_holdout(samples, 0.3, 0.2, seed=5).test == parts.test
    # no test split: exactly the two-way split older runs and packages were made with
    assert split_holdout(samples, 0.2, 0.0, seed=5) == type(parts)(*split_dataset(samples, 0.2, 5), [])
    with pytest.raises(ValueError, match="must be < 1"):
        split_holdout(samples, 0.5, 0.5)


def test_split_without_a_parts_rule_is_the_split_runs_were_made_with() -> None:
    """Pinned from the code before `data.parts`: old runs and packages reproduce their splits."""
    samples = _samples({"good": 12, "crack": 5, "pit": 3, "odd": 1})
    parts = split_holdout(samples, 0.2, 0.2, seed=3)
    assert [s.name for s in parts.val] == ["crack_004", "good_001", "good_010", "pit_002"]
    assert [s.name for s in parts.test] == ["crack_001", "good_002", "good_005", "pit_000"]
    # a rule under which every image is its own part draws exactly the same
    assert split_holdout(samples, 0.2, 0.2, seed=3, parts=r"(?P<part>.+)") == parts


def _bursts(counts: dict[str, int], shots: int = 5, seed: int = 0) -> list[Sample]:
    """`counts` parts per category, each photographed in a burst of up to `shots` exposures
    (`<cat>_exp<k>_num_<n>`: k rises, n runs on through the whole capture; some shots missing)."""
    rng = np.random.default_rng(seed)
    out, seq = [], 100
    for cat, n in counts.items():
        for _ in range(n):
            for k in sorted(rng.choice(np.arange(1, shots + 1), size=int(rng.integers(1, shots + 1)), replace=False)):
                seq += int(rng.integers(3, 40))
                name = f"{cat}_exp{k}_num_{seq}"
                out.append(Sample(name, Path(f"/x/{name}.jpg"), None if cat == "good" else Path(f"/m/{name}.png"),
                                  cat, cat != "good"))
    return out


BURSTS = r"_exp(?P<shot>\d+)_num_(?P<seq>\d+)$"


def test_bursts_of_one_part_stay_on_one_side_of_every_split() -> None:
    samples = _bursts({"good": 60, "crack": 15, "pit": 10})
    part_of: dict[str, int] = {}
    n, prev = -1, ("", 0)
    for s in samples:  # the generator's own truth: a shot that does not rise starts the next part
        k = int(s.name.split("_exp")[1].split("_")[0])
        if k <= prev[1] or s.category != prev[0]:
            n += 1
        part_of[s.name], prev = n, (s.category, k)
    for seed in range(5):
        split = split_holdout(samples, 0.2, 0.2, seed=seed, parts=BURSTS)
        sides = [{part_of[s.name] for s in side} for side in (split.train, split.val, split.test)]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert sum(len(side) for side in sides) == n + 1
        # the strata count parts: 20 % of each category's parts, whatever their image counts
        assert len({part_of[s.name] for s in split.test if s.category == "good"}) == 12
        assert len({part_of[s.name] for s in split.test if s.category == "crack"}) == 3
        assert {s.category for s in split.val} == {"good", "crack", "pit"}
    # the image-by-image split of the same images leaks parts across: what the rule is for
    plain = split_holdout(samples, 0.2, 0.2, seed=0)
    assert {part_of[s.name] for s in plain.test} & {part_of[s.name] for s in plain.train}


def test_part_ids_bursts_and_named_parts() -> None:
    from training.core.part_groups import part_ids

    def s(name: str, cat: str = "crack") -> Sample:
        return Sample(name, Path(f"/x/{name}.png"), Path("/m"), cat, True)

    names = [s("crack_exp1_num_10"), s("crack_exp3_num_30"),   # one burst, shot 2 missing
             s("crack_exp3_num_45"), s("crack_exp5_num_60"),   # shot 3 again: the next part
             s("pit_exp4_num_50", "pit"),                      # another category: its own part
             s("crack_exp1_num_99"), s("crack_extra")]         # a new burst; a name that does not match
    ids, unmatched = part_ids(names, BURSTS)
    assert ids["crack_exp1_num_10"] == ids["crack_exp3_num_30"] != ids["crack_exp3_num_45"]
    assert ids["crack_exp3_num_45"] == ids["crack_exp5_num_60"] != ids["crack_exp1_num_99"]
    assert len({ids[n.name] for n in names}) == 5 and unmatched == ["crack_extra"]
    ids, _ = part_ids([s("a_view1"), s("a_view2"), s("b_view1")], r"^(?P<part>[^_]+)_view\d")
    assert ids["a_view1"] == ids["a_view2"] != ids["b_view1"]


def test_evaluate_and_export_redraw_the_split_with_the_runs_parts_rule() -> None:
    """`evaluate --split test` and the export gate read the rule from the run's train_config."""
    from training.core.evaluate import select_split

    samples = _bursts({"good": 30, "crack": 10})
    tc = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 4, "parts": BURSTS}
    grouped = split_holdout(samples, 0.2, 0.2, seed=4, parts=BURSTS)
    assert select_split(samples, "test", tc, "m") == grouped.test
    assert select_split(samples, "val", tc, "m") == grouped.val
    assert select_split(samples, "test", {**tc, "parts": None}, "m") == split_holdout(samples, 0.2, 0.2, 4).test
    assert grouped.test != split_holdout(samples, 0.2, 0.2, 4).test


def test_k_fold_holds_out_every_part_exactly_once_and_keeps_categories_in_every_fold() -> None:
    samples = _bursts({"good": 41, "crack": 12, "pit": 7}, seed=1)
    from training.core.part_groups import part_ids

    ids, _ = part_ids(samples, BURSTS)
    n_parts = len(set(ids.values()))
    held_out: Counter[str] = Counter()
    for fold in range(5):
        split = split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=fold)
        sides = [{ids[s.name] for s in side} for side in (split.train, split.val, split.test)]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert len(split.train) + len(split.val) + len(split.test) == len(samples)
        assert {s.category for s in split.test} == {"good", "crack", "pit"}
        assert len(sides[2]) in (n_parts // 5, n_parts // 5 + 1)  # fold sizes differ by at most one part
        # the calibration share stays ~20 % of all parts, drawn from the 80 % not held out
        assert abs(len(sides[1]) - 0.2 * n_parts) <= 2
        held_out.update(sides[2])
    assert set(held_out) == set(ids.values()) and set(held_out.values()) == {1}
    # a fold depends on the split seed, not on the order of the samples
    again = split_holdout(list(reversed(samples)), 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=3)
    assert again == split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=3)
    assert again.test != split_holdout(samples, 0.2, 0.2, seed=3, parts=BURSTS, folds=5, test_fold=3).test


def test_evaluate_redraws_the_runs_fold() -> None:
    """A k-fold run's package is judged on its own fold; a run from before folds keeps its split."""
    from training.core.evaluate import select_split

    samples = _bursts({"good": 30, "crack": 10})
    tc = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 4, "parts": BURSTS, "folds": 4, "test_fold": 2}
    fold2 = split_holdout(samples, 0.2, 0.2, seed=4, parts=BURSTS, folds=4, test_fold=2)
    assert select_split(samples, "test", tc, "m") == fold2.test
    assert select_split(samples, "val", tc, "m") == fold2.val
    assert select_split(samples, "test", {**tc, "test_fold": 3}, "m") != fold2.test
    old = {k: v for k, v in tc.items() if k not in ("folds", "test_fold")}
    assert select_split(samples, "test", old, "m") == split_holdout(samples, 0.2, 0.2, 4, BURSTS).test


def test_train_share_keeps_whole_parts_of_every_category_and_leaves_calibration_and_test_alone() -> None:
    """A learning curve: runs at several shares train on nested-size subsets and are judged on the same parts."""
    from training.core.evaluate import select_split
    from training.core.part_groups import part_ids

    samples = _bursts({"good": 41, "crack": 12, "pit": 7}, seed=1)
    ids, _ = part_ids(samples, BURSTS)
    full = split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=1)
    half = split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=1, train_share=0.5)
    assert half.val == full.val and half.test == full.test
    assert set(half.train) < set(full.train)
    full_parts = {ids[s.name] for s in full.train}
    half_parts = {ids[s.name] for s in half.train}
    assert abs(len(half_parts) - len(full_parts) / 2) <= 2
    # whole parts: every image of a kept part is kept
    assert {s.name for s in full.train if ids[s.name] in half_parts} == {s.name for s in half.train}
    assert {s.category for s in half.train} == {"good", "crack", "pit"}
    # a tiny share still keeps one part of each category
    tiny = split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, folds=5, test_fold=1, train_share=0.01)
    assert {s.category for s in tiny.train} == {"good", "crack", "pit"}
    assert len({ids[s.name] for s in tiny.train}) == 3
    assert split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS, train_share=1.0) == \
        split_holdout(samples, 0.2, 0.2, seed=2, parts=BURSTS)
    # the share travels in train_config: evaluate redraws the same split (and its training parts)
    tc = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 2, "parts": BURSTS, "folds": 5, "test_fold": 1,
          "train_share": 0.5}
    assert select_split(samples, "test", tc, "m") == half.test
    with pytest.raises(ValueError, match=r"train_share must be in \(0, 1\]"):
        split_holdout(samples, 0.2, 0.2, seed=2, train_share=0.0)


@pytest.mark.parametrize(("extra", "message"), [
    ("  train_share: 0\n", r"data.train_share.*greater than 0"),
    ("  folds: 5\n  test_fold: 5\n", r"data.test_fold must be < data.folds \(5\)"),
    ("  test_fold: 1\n", "data.test_fold needs data.folds"),
    ("  folds: 1\n", r"data.folds.*greater than or equal to 2"),
    ("  folds: 2\n  val_fraction: 0.5\n", r"val_fraction \+ 1/data.folds \(0.500\) must be < 0.9"),
])
def test_bad_fold_settings_stop_the_config_at_load(tmp_path: Path, extra: str, message: str) -> None:
    from training.core.train_config import ConfigError, load_config

    cfg = tmp_path / "folds.yaml"
    cfg.write_text("base: " + str(Path(__file__).resolve().parents[2] / "configs/train/default.yaml") +
                   "\ndata:\n" + extra)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


@pytest.mark.parametrize(("rule", "message"), [
    (r"(?P<part>a", "is not a regular expression"),
    (r"(?P<shot>\d+)", r"needs a named group \(\?P<part>"),
    (r"^zzz(?P<part>.)", "matches none of the 3 image names"),
    (r"_(?P<shot>[a-z]+)_(?P<seq>\d+)$", "must both be integers"),
])
def test_a_parts_rule_that_cannot_work_is_refused_clearly(rule: str, message: str) -> None:
    from training.core.part_groups import PartRuleError

    samples = [Sample(n, Path(f"/x/{n}.png"), None, "good", False) for n in ("p_a_1", "p_b_2", "p_c_3")]
    with pytest.raises(PartRuleError, match=message):
        split_holdout(samples, 0.2, 0.2, seed=0, parts=rule)


def test_a_bad_parts_rule_stops_the_config_at_load(tmp_path: Path) -> None:
    from training.core.train_config import ConfigError, load_config

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("base: " + str(Path(__file__).resolve().parents[2] / "configs/train/default.yaml") +
                   "\ndata:\n  parts: '(?P<lot>\\d+)'\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.parts.*needs a named group"):
        load_config(cfg)


def test_merge_datasets_joins_and_refuses_a_name_twice(tmp_path: Path) -> None:
    from training.core.data import merge_datasets

    a, b = tmp_path / "a", tmp_path / "b"
    for root, names in ((a, ["p1", "p2"]), (b, ["p3"])):
        (root / "images").mkdir(parents=True)
        for n in names:
            cv2.imwrite(str(root / "images" / f"{n}.png"), np.full((32, 32), 128, np.uint8))
    merged = merge_datasets(load_dataset(a), load_dataset(b))
    assert [s.name for s in merged.samples] == ["p1", "p2", "p3"]
    assert merged.fingerprint() != load_dataset(a).fingerprint()
    cv2.imwrite(str(b / "images" / "p1.png"), np.full((32, 32), 100, np.uint8))
    with pytest.raises(DataError, match="'p1'"):
        merge_datasets(load_dataset(a), load_dataset(b))
