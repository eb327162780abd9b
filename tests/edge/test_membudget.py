"""The memory budget of the frame path (pipeline.max_queued_mb)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.membudget import MemoryBudget, frame_cost, map_share


def test_frame_cost_counts_the_image_and_its_float_map() -> None:
    assert frame_cost(None) == 0
    assert frame_cost(np.zeros((1000, 2000), np.uint8)) == 2_000_000 + 8_000_000
    assert frame_cost(np.zeros((10, 20, 3), np.uint8)) == 600 + 800
    # a model at scale 0.25, or at scale 1 with output stride 4, hands over a map of 1/16 of the pixels
    assert map_share(0.25, 1) == map_share(1.0, 4) == 1 / 16 and map_share(1.0, 1) == 1.0
    assert frame_cost(np.zeros((2048, 2448), np.uint8), map_share(1.0, 4)) == 2048 * 2448 * (1 + 4 / 16)


def test_bytes_and_parts_bound_admission() -> None:
    b = MemoryBudget(max_bytes=100, max_parts=3)
    assert b.try_acquire(60) and b.try_acquire(40)
    assert not b.try_acquire(1), "over the byte bound"
    b.release(60)
    assert b.try_acquire(10) and b.try_acquire(10)
    assert not b.try_acquire(0), "over the part bound"
    assert (b.used_bytes, b.parts, b.peak_bytes) == (60, 3, 100)


def test_one_oversized_part_passes_alone() -> None:
    b = MemoryBudget(max_bytes=100, max_parts=10)
    assert b.try_acquire(1000), "a frame bigger than the budget must not wait forever"
    assert not b.try_acquire(1)
    b.release(1000)
    assert b.try_acquire(1)


def test_acquire_waits_for_a_release_and_times_out() -> None:
    b = MemoryBudget(max_bytes=100, max_parts=10)
    assert b.acquire(100, 0.1)
    t0 = time.monotonic()
    assert not b.acquire(50, 0.3)
    assert time.monotonic() - t0 >= 0.25
    threading.Timer(0.2, b.release, (100,)).start()
    assert b.acquire(50, 5.0)


def test_invalid_bounds() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(0, 1)
