"""How much of the frame path's memory the parts inside it may hold.

A part holds its frame from capture until its result is stored, and its float32 probability
map at the model's output resolution once inferred (edge.preprocess.CoarseMap: the result thread
judges one part at a time, from windows of the full-resolution map around its defect pixels, or the
whole full map for a model at input scale != 1; edge.postprocess.postprocess_map): at 5 MP about 5 + 1.25 MB per part for a
model at scale 0.25 or output stride 4, 5 + 20 MB for one at full resolution. Unbounded, the old
64-job result queue alone could reach 2 GB (far above the unit's MemoryMax). Every frame is admitted
against this budget before it enters the path and released after its result is stored; the
queues behind the admission then never block (so an OpenVINO callback never waits on a queue).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def frame_cost(image: Any, map_share: float = 1.0) -> int:
    """Bytes a frame holds on its way: the image, plus the float32 probability map it will wait with,
    `map_share` of the frame's pixels (see map_share)."""
    if image is None:
        return 0
    return int(image.nbytes) + int(int(image.shape[0]) * int(image.shape[1]) * 4 * map_share)


def map_share(scale: float, output_stride: int) -> float:
    """Pixels of the map a model hands the result thread, per frame pixel: (scale / output stride)^2."""
    return min(1.0, (scale / max(1, output_stride)) ** 2)


class MemoryBudget:
    """Bytes and parts held by the frame path. One part is always admitted when nothing is held,
    so a frame larger than the whole budget still gets through (alone) instead of waiting forever."""

    def __init__(self, max_bytes: int, max_parts: int) -> None:
        if max_bytes <= 0 or max_parts <= 0:
            raise ValueError(f"max_bytes and max_parts must be > 0, got {max_bytes}, {max_parts}")
        self.max_bytes, self.max_parts = max_bytes, max_parts
        self.used_bytes = self.parts = self.peak_bytes = 0
        self._cond = threading.Condition()

    def _fits(self, n: int) -> bool:
        return self.parts == 0 or (self.used_bytes + n <= self.max_bytes and self.parts < self.max_parts)

    def _take(self, n: int) -> None:
        self.used_bytes += n
        self.parts += 1
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def try_acquire(self, n: int) -> bool:
        """Admit a part of `n` bytes now, or say no (a live frame is then dropped)."""
        with self._cond:
            if not self._fits(n):
                return False
            self._take(n)
            return True

    def acquire(self, n: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds for room (a part with an identity waits, it is never dropped)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._fits(n):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._take(n)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used_bytes -= n
            self.parts -= 1
            self._cond.notify_all()
