"""Pasted defects (training/core/paste.py): contrast kept relative to the new surround, labels placed with them."""

from __future__ import annotations

import numpy as np
import pytest

from training.core.paste import cut_stamps, paste
from training.core.patches import PatchDataset


def _source() -> tuple[np.ndarray, np.ndarray]:
    """A surface at level 100 with a dark 5x5 pit (40) and a long crack too big to move."""
    image = np.full((80, 120), 100, np.uint8)
    mask = np.zeros_like(image)
    image[20:25, 30:35], mask[20:25, 30:35] = 40, 1
    image[5:75, 100], mask[5:75, 100] = 60, 1  # 70 px long: does not fit a 32 px stamp
    return image, mask


def test_a_pit_pasted_on_a_brighter_surface_keeps_its_contrast_and_its_label() -> None:
    image, mask = _source()
    stamps = cut_stamps([image], [mask], max_side=32)
    assert len(stamps) == 1 and stamps[0].source == 0  # the crack is left out
    stamp = stamps[0]
    assert stamp.mask.sum() == 25
    target = np.full((64, 64), 200, np.uint8)
    target_mask = np.zeros_like(target)
    out, out_mask = paste(target, target_mask, stamp, 10, 20)
    assert target.max() == 200 and not target_mask.any()  # the inputs are untouched
    assert out_mask.sum() == 25 and out_mask[10:21, 20:31].sum() == 25
    ys, xs = np.nonzero(out_mask)
    assert np.all(out[ys, xs] == 80)  # 40 of 100 on the source: 0.4 x 200 here
    far = np.ones_like(out_mask, bool)
    far[8:24, 18:34] = False
    assert np.all(out[far] == 200)  # nothing changes away from the stamp


def test_a_colour_surface_takes_a_stamp_channel_by_channel() -> None:
    image, mask = _source()
    colour = np.dstack([image, image // 2, image])
    stamp = cut_stamps([colour], [mask], max_side=32)[0]
    out, out_mask = paste(np.full((40, 40, 3), 120, np.uint8), np.zeros((40, 40), np.uint8), stamp, 0, 0)
    ys, xs = np.nonzero(out_mask)
    assert np.all(out[ys, xs] == [48, 48, 48])  # each channel's 0.4 of its own surround


def test_a_defect_without_surrounding_surface_gives_no_stamp_and_a_misplaced_stamp_is_refused() -> None:
    image = np.full((10, 10), 50, np.uint8)
    assert cut_stamps([image], [np.ones((10, 10), np.uint8)], max_side=32) == []
    image, mask = _source()
    stamp = cut_stamps([image], [mask], max_side=32)[0]
    with pytest.raises(ValueError, match="does not fit"):
        paste(np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8), stamp, 5, 5)


def test_pasted_patches_take_their_share_of_defect_patches_on_good_surface() -> None:
    image, mask = _source()
    good = np.full((96, 96), 150, np.uint8)
    images, masks = [image, good], [mask, np.zeros_like(good)]
    plain = PatchDataset(images, masks, 64, 400, defect_fraction=1.0, hard_negative_fraction=0.0,
                         augment="none", seed=3)
    pasted = PatchDataset(images, masks, 64, 400, defect_fraction=1.0, hard_negative_fraction=0.0,
                          augment="none", seed=3, paste_fraction=0.5)
    rng = np.random.default_rng(0)
    kinds = [pasted.choose(rng)[0] for _ in range(400)]
    assert 150 < kinds.count("paste") < 250 and set(kinds) == {"paste", "defect"}
    on_good = [(x, y) for x, y in pasted if float(x.max()) == 150]  # the source image is 100 at most
    assert on_good and all(float(y.sum()) == 25 for _, y in on_good)  # each holds the whole pit, labelled
    assert all(float(x.min()) == 60.0 for x, _ in on_good)  # 0.4 x 150: the pit, at the target's level
    # off by default: the patch stream is the one runs were made with
    again = PatchDataset(images, masks, 64, 400, defect_fraction=1.0, hard_negative_fraction=0.0,
                         augment="none", seed=3, paste_fraction=0.0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(plain, again, strict=True)) and not again.stamps
