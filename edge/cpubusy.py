"""How busy the machine's CPUs are (Linux /proc/stat), for work that may only use idle CPU.

The evidence writer may encode as much as it likes while cores sit idle, and must hold back to its
budget once the verdict path needs every cycle. Reading /proc/stat costs ~20 us, so the share is
refreshed at most every `period_s`; where /proc/stat is missing (not Linux) the CPU counts as busy,
the safe side for verdicts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

_STAT = Path("/proc/stat")


def _cpu_times(path: Path = _STAT) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None where they cannot be read."""
    try:
        with open(path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


class CpuBusy:
    """`share()`: the busy share of all CPUs over the last refresh period (0..1)."""

    def __init__(self, period_s: float = 0.5, path: Path = _STAT) -> None:
        self.period_s, self._path = period_s, path
        self._lock = threading.Lock()
        self._last = _cpu_times(path)
        self._t = time.monotonic()
        self._share = 1.0 if self._last is None else 0.0

    def share(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._t >= self.period_s:
                cur = _cpu_times(self._path)
                if cur is None or self._last is None:
                    self._share = 1.0
                elif cur[1] > self._last[1]:
                    self._share = (cur[0] - self._last[0]) / (cur[1] - self._last[1])
                self._last, self._t = cur, now
            return self._share
