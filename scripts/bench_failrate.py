"""Benchmark-only: a deterministic share of parts fails, whatever the model thinks of synthetic frames.

The station's verdict comes from `edge.flow.postprocess_map` (regions of the probability map) and
`edge.rules.decide`. `ForcedVerdicts.install()` wraps the first, as `AckProbe` wraps MqttSink
methods in bench_pipeline.py:
- the real postprocess runs on the real map first, so every part pays what a line pays for it,
  whatever the model saw;
- then the detection is replaced: part n (counted on the result thread) fails when
  floor(n * rate) > floor((n - 1) * rate), i.e. exactly `rate` of the parts, spread evenly (10 %:
  every 10th). A failing part gets one disc-shaped region (radius min(h, w) / 40, at least 3 px; at
  5 MP ~8,000 px, a blowhole-sized defect at a different place per part) and its full-frame mask;
  a passing part gets no region and an all-zero mask;
- `decide`, the event, the outbox, MQTT and the evidence writer (frame + overlay + mask) run as
  in production on that detection.
What it does not measure: the cost of the map a real defect would give (the real postprocess
ran on whatever the model produced, which may hold more or fewer regions than the forced one).

`install_from_env()` does the same in a daemon subprocess when BENCH_FAIL_RATE is set (used by
a `sitecustomize.py` the benchmark writes into its work folder).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import cv2
import numpy as np

from edge.contract import Detection, PostprocessParams, Region
from edge.preprocess import CoarseMap


class ForcedVerdicts:
    """Callable stand-in for edge.flow.postprocess_map that forces `rate` of the parts to fail."""

    def __init__(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fail rate must be within 0..1, got {rate}")
        self.rate = rate
        self.n = self.fails = 0
        self._lock = threading.Lock()
        self._orig: Any = None

    def __call__(self, prob: CoarseMap | np.ndarray, params: PostprocessParams, part: float | None = None) -> Detection:
        """As edge.postprocess.postprocess_map (map, params, the part output's score); the verdict is then
        forced by the regions alone (the forced detections carry no part score)."""
        det: Detection = self._orig(prob, params, part)  # the real cost, on the real map
        with self._lock:
            self.n += 1
            n = self.n
            fail = math.floor(n * self.rate) > math.floor((n - 1) * self.rate)
            self.fails += fail
        if not fail:
            mask = det.mask if not det.regions else np.zeros_like(det.mask)
            below = float(np.nextafter(np.float32(params.pixel_threshold), np.float32(0.0)))
            return Detection(regions=[], mask=mask, score=min(det.score, below))
        return defect_detection(det.mask.shape[0], det.mask.shape[1], n)

    def install(self) -> ForcedVerdicts:
        import edge.flow

        self._orig = edge.flow.postprocess_map
        edge.flow.postprocess_map = self
        return self

    def uninstall(self) -> None:
        import edge.flow

        if self._orig is not None:
            edge.flow.postprocess_map = self._orig
            self._orig = None


def defect_detection(h: int, w: int, n: int) -> Detection:
    """One disc region of radius min(h, w) / 40 (>= 3 px), placed by n, with its full-frame mask."""
    r = max(3, min(h, w) // 40)
    rng = np.random.default_rng(n)
    cy = int(rng.integers(min(r, h - 1), max(r + 1, h - r)))
    cx = int(rng.integers(min(r, w - 1), max(r + 1, w - r)))
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    x0, y0, bw, bh = cv2.boundingRect(mask[max(0, cy - r - 1) : cy + r + 2, max(0, cx - r - 1) : cx + r + 2])
    x0, y0 = x0 + max(0, cx - r - 1), y0 + max(0, cy - r - 1)
    area = int(np.count_nonzero(mask[y0 : y0 + bh, x0 : x0 + bw]))
    region = Region(area=area, bbox=(x0, y0, bw, bh), centroid=(float(cx), float(cy)), max_score=0.95,
                    mean_score=0.8)
    return Detection(regions=[region], mask=mask, score=0.95)


def install_from_env() -> ForcedVerdicts | None:
    rate = os.environ.get("BENCH_FAIL_RATE")
    return ForcedVerdicts(float(rate)).install() if rate else None
