"""Station counters that several threads write (capture, results, the main loop), behind one lock.

`+=` on an attribute is a read and a write: two threads may interleave and lose a count. Every
counter the stats message and /healthz report lives here instead.
"""

from __future__ import annotations

import threading

PART_COUNTS = ("pass", "fail", "error", "duplicate")  # results stored, by verdict; duplicates not counted again
FRAME_COUNTS = ("inspected", "dropped", "skipped")  # parts finished, live frames dropped or skipped on purpose


class Counters:
    """Thread-safe integer counters; `since_last` gives the increase over the previous call (stats)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(PART_COUNTS + FRAME_COUNTS, 0)
        self._marks: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self, names: tuple[str, ...]) -> dict[str, int]:
        with self._lock:
            return {k: self._values[k] for k in names}

    def since_last(self, name: str) -> int:
        with self._lock:
            value = self._values[name]
            delta, self._marks[name] = value - self._marks.get(name, 0), value
            return delta
