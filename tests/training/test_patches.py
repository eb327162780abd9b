"""Patch sampling: sizes, raw pixels, defect-centred / hard-negative mix, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.core.patches import (
    HardNegative,
    HardPositive,
    PatchDataset,
    mine_hard_negatives,
    mine_hard_positives,
    peaks,
    update_pool,
)


def _data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w), dtype=np.uint8) for h, w in ((100, 140), (40, 50), (96, 96))]
    masks = [np.zeros(im.shape, np.uint8) for im in images]
    masks[0][70:74, 120:126] = 1  # one small defect near a corner
    return images, masks


def test_items_are_raw_float_patches_of_size_p() -> None:
    images, masks = _data()
    ds = PatchDataset(images, masks, 64, 40, augment="none", seed=1)
    items = list(ds)
    assert len(items) == len(ds) == 40
    x, y = items[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and y.shape == (1, 64, 64)
    assert max(float(i[0].max()) for i in items) > 200  # raw 0..255, not normalised
    assert all(set(torch.unique(i[1]).tolist()) <= {0.0, 1.0} for i in items)


def test_defect_patches_contain_the_defect_off_centre() -> None:
    images, masks = _data()
    ds = PatchDataset(images, masks, 32, 200, defect_fraction=1.0, hard_negative_fraction=0.0,
                      augment="none", seed=2)
    centres = []
    for _, y in ds:
        assert y.sum() > 0  # every defect patch shows (part of) the defect
        ys, xs = np.nonzero(y[0].numpy())
        centres.append((ys.mean(), xs.mean()))
    assert np.std(np.array(centres), axis=0).min() > 2.0  # not always at the same spot


def test_images_are_reflect_padded_bottom_right_like_edge_frames() -> None:
    """A 40x50 image with 64 px patches: padded by P/2 = 32 below and right (as the edge pads
    frames up to its tile grid), so patches show the border followed by mirrored surface."""
    images, masks = _data()
    ds = PatchDataset(images[1:2], masks[1:2], 64, 64, augment="none")
    padded = ds.images[0][:, :, 0] if ds.images[0].ndim == 3 else ds.images[0]
    assert padded.shape == (72, 82)
    np.testing.assert_array_equal(padded[:40, :50], images[1])
    np.testing.assert_array_equal(padded[40, :50], images[1][38])  # reflect-101, as edge.preprocess
    np.testing.assert_array_equal(padded[:40, 50], images[1][:, 48])
    origins = {ds.choose(np.random.default_rng(k))[2:] for k in range(200)}
    assert max(y for y, _ in origins) > 0 and max(x for _, x in origins) > 0  # not pinned to the image
    x, _ = next(iter(ds))
    assert x.shape == (1, 64, 64)


def test_hard_negatives_are_sampled_around_the_pool() -> None:
    images, masks = _data()
    images[2][40:50, 40:50] = 255  # a bright blob the model would call a defect
    ds = PatchDataset(images, masks, 32, 100, defect_fraction=0.0, hard_negative_fraction=1.0,
                      jitter=0.2, augment="none", seed=3)
    ds.set_hard_negatives([HardNegative(image=2, y=45, x=45, score=0.9)])
    kinds = [ds.choose(np.random.default_rng(i))[:2] for i in range(20)]
    assert all(k == ("hard", 2) for k in kinds)
    assert all(float(x.max()) == 255.0 and float(y.sum()) == 0 for x, y in ds)


def test_same_seed_same_patches_and_ranks_differ() -> None:
    images, masks = _data()
    a = [x for x, _ in PatchDataset(images, masks, 32, 8, seed=5)]
    b = [x for x, _ in PatchDataset(images, masks, 32, 8, seed=5)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    r0 = PatchDataset(images, masks, 32, 8, seed=5, rank=0, world_size=2)
    r1 = PatchDataset(images, masks, 32, 8, seed=5, rank=1, world_size=2)
    assert len(r0) == len(r1) == 4
    assert not all(torch.equal(p, q) for (p, _), (q, _) in zip(r0, r1, strict=True))
    r0.set_epoch(1)
    assert not all(torch.equal(p, q) for p, (q, _) in zip(a, r0, strict=False))


def test_mining_finds_the_false_positive_and_pool_keeps_the_strongest() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[10, 10], prob[50, 40], prob[11, 11] = 0.9, 0.6, 0.8  # (11, 11) is the same spot as (10, 10)
    assert peaks(prob, 5, spacing=8, min_prob=0.05) == [(10, 10, pytest.approx(0.9)), (50, 40, pytest.approx(0.6))]

    class Blob(torch.nn.Module):  # "model" that fires where the image is bright
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 200.0) / 10.0

    img = np.zeros((40, 56), np.uint8)
    img[20:23, 30:33] = 255
    found = mine_hard_negatives(Blob(), [img], [0], per_image=2, spacing=8)
    assert found and (found[0].y, found[0].x) in {(y, x) for y in range(20, 23) for x in range(30, 33)}
    old = [HardNegative(0, 1, 1, 0.99), HardNegative(1, 5, 5, 0.3)]
    pool = update_pool(old, found, mined_images=[0], capacity=2)
    assert HardNegative(0, 1, 1, 0.99) not in pool  # image 0 was re-mined: its stale entry is gone
    assert pool[0].score >= pool[1].score and len(pool) == 2


def test_coarse_targets_made_after_augmentation_keep_a_one_pixel_crack() -> None:
    """target_stride 4: input-resolution pixels, a P/4 target; a 1 px crack keeps a target in every
    defect patch (the 50 % rule, applied before or after the warp, would leave it nothing)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(90, 110, (160, 200), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros(im.shape, np.uint8) for im in images]
    masks[0][80, 40:160] = 1
    images[0][80, 40:160] = 10
    ds = PatchDataset(images, masks, 64, 40, defect_fraction=1.0, hard_negative_fraction=0.0,
                      augment="default", seed=4, target_stride=4)
    for x, y in ds:
        assert x.shape == (1, 64, 64) and y.shape == (1, 16, 16)
        assert y.sum() >= 3  # the crack crosses the patch: several coarse pixels
    with pytest.raises(ValueError, match="target_stride"):
        PatchDataset(images, masks, 64, 4, target_stride=3)


def test_hard_positives_get_their_share_of_defect_patches() -> None:
    images, masks = _data()
    masks[0][10:30, 10:30] = 1  # a large defect next to the small one at (70..73, 120..125)
    ds = PatchDataset(images, masks, 32, 100, defect_fraction=1.0, hard_negative_fraction=0.0,
                      augment="none", seed=6, hard_positive_fraction=0.5)
    small = next(k for k, pix in enumerate(ds.components[0]) if len(pix) == 24)
    ds.set_hard_positives([HardPositive(0, small, 0.01)])
    kinds = [ds.choose(np.random.default_rng(i))[0] for i in range(400)]
    share = kinds.count("hard_positive") / len(kinds)
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="no defect component"):
        ds.set_hard_positives([HardPositive(1, 0, 0.0)])


def test_mining_hard_positives_finds_the_missed_component() -> None:
    class Bright(torch.nn.Module):  # fires on bright pixels only: misses the dark defect
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 200.0) / 10.0

    img = np.full((48, 64), 100, np.uint8)
    mask = np.zeros(img.shape, np.uint8)
    img[5:10, 5:10], mask[5:10, 5:10] = 255, 1  # found (bright)
    img[30:33, 40:43], mask[30:33, 40:43] = 0, 1  # missed (dark)
    ds = PatchDataset([img], [mask], 32, 4)
    found = mine_hard_positives(Bright(), [img], ds.components, [0], stride=16)
    assert len(found) == 1 and found[0].score < 0.5
    assert (ds.components[0][found[0].component] == [31, 41]).all(axis=1).any()
