"""Generated parts with known truth, for demos, soak tests and benchmarks without a camera.

A light textured surface; defective parts carry one dark blob of about 40 pixels. The truth
is in the part id ('ok-000012' / 'ng-000013') so events stay clean and a consumer or test can
still score the verdicts.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edge.config import SyntheticSourceConfig
from edge.sources.base import Frame


def synth_part(height: int, width: int, defect: bool, rng: np.random.Generator) -> np.ndarray:
    """One uint8 grey part: ~170 +- 6 noise, and with `defect` a dark (40) disc of radius ~3.5 px."""
    noise = rng.normal(0, 6, size=(height, width))
    noise += 170  # in place: the same values as 170 + noise, without a second float frame
    img = noise.clip(0, 255, out=noise).astype(np.uint8)
    if defect:
        cy, cx = rng.integers(10, height - 10), rng.integers(10, width - 10)
        yy, xx = np.ogrid[:height, :width]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12] = 40
    return img


class SyntheticSource:
    """Rate-limited generator; `count` parts then exhausted (0 = endless)."""

    def __init__(self, cfg: SyntheticSourceConfig) -> None:
        self.cfg = cfg
        self.name = "synthetic"
        self._rng = np.random.default_rng(cfg.seed)
        self._index = 0
        self._next_due = 0.0
        self._lock = threading.Lock()
        self._pool: dict[bool, list[np.ndarray]] = {}

    def _image(self, defect: bool) -> np.ndarray:
        """A new part, or a copy of a pooled one (a camera hands over a new buffer per frame too)."""
        cfg = self.cfg
        if not cfg.pool:
            return synth_part(cfg.height, cfg.width, defect, self._rng)
        self._fill_pool()
        return self._pool[defect][self._index % cfg.pool].copy()

    def _fill_pool(self) -> None:
        cfg = self.cfg
        if cfg.pool and not self._pool:
            rng = np.random.default_rng(cfg.seed)
            self._pool = {d: [synth_part(cfg.height, cfg.width, d, rng) for _ in range(cfg.pool)] for d in (False, True)}

    def open(self) -> None:
        """Generates the pool here, before the clock starts: made in the first read (0.36 s at 5 MP), it
        put the paced schedule behind, and the catch-up handed the first two parts over back to back."""
        self._fill_pool()
        self._next_due = time.monotonic()

    def read(self, timeout: float) -> Frame | None:
        with self._lock:
            if self.cfg.count and self._index >= self.cfg.count:
                time.sleep(min(timeout, 0.05))
                return None
            if self.cfg.fps > 0:
                wait = self._next_due - time.monotonic()
                if wait > timeout:
                    time.sleep(timeout)
                    return None
                if wait > 0:
                    time.sleep(wait)
                # Catch-up is capped at one period: a paused pipeline must not cause a burst.
                self._next_due = max(self._next_due + 1.0 / self.cfg.fps, time.monotonic())
            self._index += 1
            defect = bool(self._rng.random() < self.cfg.defect_rate)
            image = self._image(defect)
            part_id = f"{'ng' if defect else 'ok'}-{self._index:06d}"
            # Not live: a generated part is a part (never dropped), like a triggered one.
            return Frame(part_id=part_id, capture_ts=time.time(), image=image, live=False,
                         meta={"truth": "defect" if defect else "good"})

    def commit(self, frame: Frame, ok: bool) -> None:
        """Nothing to move."""

    def close(self) -> None:
        """Nothing to release."""

    @property
    def exhausted(self) -> bool:
        return bool(self.cfg.count and self.cfg.stop_at_end and self._index >= self.cfg.count)
