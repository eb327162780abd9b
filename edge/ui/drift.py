"""Drift alarms: EWMA of the fail rate and of the image sharpness against a baseline.

The daemon's fail_rate alarm fires on a fixed limit over a window; drift is the slower story of
a line that used to fail 2 % and now fails 12 %, or of a lens that is slowly getting dirty. The
first `warmup_parts` parts set the baseline (their mean); after that an EWMA that moves too far
from it raises one latched alarm, cleared once the EWMA is back within half the margin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from edge.ui.settings import DriftConfig

DRIFT_FAIL_RATE = "drift_fail_rate"
DRIFT_SHARPNESS = "drift_sharpness"


class _Ewma:
    """Baseline mean over the warm-up, then an EWMA; `None` until the warm-up is over."""

    def __init__(self, alpha: float, warmup: int) -> None:
        self.alpha, self.warmup = alpha, warmup
        self.n = 0
        self.total = 0.0
        self.baseline: float | None = None
        self.value: float | None = None

    def add(self, x: float) -> float | None:
        if self.baseline is None:
            self.n += 1
            self.total += x
            if self.n >= self.warmup:
                self.baseline = self.value = self.total / self.n
            return None
        assert self.value is not None
        self.value += self.alpha * (x - self.value)
        return self.value


class DriftWatch:
    """Feed every part; `callback(name, active, message)` on each raise/clear transition."""

    def __init__(self, cfg: DriftConfig, callback: Callable[[str, bool, str], None]) -> None:
        self.cfg, self._callback = cfg, callback
        self._lock = threading.Lock()
        self.fail = _Ewma(cfg.alpha, cfg.warmup_parts)
        self.sharp = _Ewma(cfg.alpha, cfg.warmup_parts)
        self.active: set[str] = set()

    def observe(self, verdict: str, sharpness: float | None) -> None:
        if not self.cfg.enabled:
            return
        changes: list[tuple[str, bool, str]] = []
        with self._lock:
            if verdict in ("pass", "fail"):
                rate = self.fail.add(1.0 if verdict == "fail" else 0.0)
                if rate is not None and self.fail.baseline is not None:
                    rise = rate - self.fail.baseline
                    msg = f"fail rate EWMA {rate:.1%}, baseline {self.fail.baseline:.1%}"
                    self._latch(changes, DRIFT_FAIL_RATE, rise > self.cfg.fail_rate_rise,
                                rise <= self.cfg.fail_rate_rise / 2, msg)
            if sharpness is not None and verdict != "error":
                value = self.sharp.add(float(sharpness))
                base = self.sharp.baseline
                if value is not None and base is not None and base > 0:
                    drop = 1.0 - value / base
                    msg = f"sharpness EWMA {value:.1f}, baseline {base:.1f} ({drop:+.0%} drop)"
                    self._latch(changes, DRIFT_SHARPNESS, drop > self.cfg.sharpness_drop,
                                drop <= self.cfg.sharpness_drop / 2, msg)
        for name, active, message in changes:
            self._callback(name, active, message)

    def _latch(self, changes: list[tuple[str, bool, str]], name: str, raise_: bool, clear: bool, msg: str) -> None:
        if raise_ and name not in self.active:
            self.active.add(name)
            changes.append((name, True, msg))
        elif clear and name in self.active:
            self.active.discard(name)
            changes.append((name, False, msg))
