"""The patch prefetcher hands over exactly the loader's batches, surfaces its errors and stops with the epoch."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.core.patches import HardNegative, PatchDataset
from training.core.prefetch import Prefetcher


def _dataset() -> PatchDataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 128), dtype=np.uint8) for _ in range(6)]
    masks = [np.zeros((96, 128), np.uint8) for _ in range(6)]
    masks[0][40:44, 50:60] = 1
    masks[3][10:13, 100:103] = 1
    return PatchDataset(images, masks, patch_size=64, patches_per_epoch=24, augment="default", seed=5)


def _epochs(ds: PatchDataset, prefetch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two epochs with hard negatives set in between, as the trainer does after mining."""
    loader = DataLoader(ds, batch_size=4, num_workers=0, drop_last=True)
    out = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        if epoch:
            ds.set_hard_negatives([HardNegative(1, 30, 30, 0.9), HardNegative(2, 60, 90, 0.8)])
        if prefetch:
            with Prefetcher(loader, prefetch) as it:
                out.extend(it)
        else:
            out.extend(loader)
    return out


def test_prefetched_batches_are_the_loaders_own() -> None:
    plain, ahead = _epochs(_dataset(), 0), _epochs(_dataset(), 2)
    assert len(plain) == len(ahead) == 12
    for (x0, y0), (x1, y1) in zip(plain, ahead, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_an_error_in_the_loader_reaches_the_trainer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise OSError("patch source broke")

    it = Prefetcher(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(OSError, match="patch source broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_closing_mid_epoch_stops_the_producer_within_its_depth() -> None:
    taken: list[int] = []
    gate = threading.Event()

    def counting() -> Iterator[int]:
        for i in range(1000):
            taken.append(i)
            yield i

    with Prefetcher(counting(), depth=2) as it:
        assert next(it) == 0
        gate.wait(0.3)  # let the producer fill its queue
    assert not any(t.name == "patch-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(taken) <= 1 + 2 + 1  # the one handed over, the queue's two, one blocked on the full queue
    with pytest.raises(StopIteration):
        next(it)


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([1, 2], depth=0)
