"""A low-rate live preview for the station page: a small JPEG of the newest part with its overlay.

The live view wants "what the camera sees" for every verdict, also for passed parts whose evidence
is not kept, and a full-size evidence PNG per update would be megabytes. So the daemon offers
each part here; at most `rate_hz` a second one is taken (a time check and a reference: nothing
else on the verdict path), and a background thread shrinks it to PREVIEW_SIDE pixels, tints the
defect mask, draws the boxes and the verdict, JPEG-encodes it and publishes it with QoS 0 on
<base>/preview (the page's MQTT subscription; nothing on disk). A one-slot mailbox holds at most one
frame: while the thread is busy a newer part replaces the waiting one, so the cost stays bounded
whatever the line does (about 5 ms per preview at 5 MP, i.e. ~1 % of a core at 2 per second).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from edge.contract import Region
from edge.evidence import draw_overlay

log = logging.getLogger(__name__)

PREVIEW_SIDE = 640
JPEG_QUALITY = 75


def render_preview(image: np.ndarray, mask: np.ndarray | None, regions: Sequence[Region], verdict: str,
                   offset: tuple[int, int] = (0, 0)) -> bytes:
    """JPEG of the frame shrunk to PREVIEW_SIDE on its long side, with the overlay drawn at that size."""
    h, w = image.shape[:2]
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    step = max(1, int(1 / scale) // 2)  # strided view first: the resize then reads a quarter of a 5 MP frame
    small = image[::step, ::step]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(np.ascontiguousarray(small), size, interpolation=cv2.INTER_AREA)
    small_mask = None if mask is None else _small_mask(mask, scale)
    boxes = [replace(r, bbox=(int(r.bbox[0] * scale), int(r.bbox[1] * scale), max(1, int(r.bbox[2] * scale)),
                              max(1, int(r.bbox[3] * scale)))) for r in regions]
    out = draw_overlay(small, small_mask, boxes, verdict, (int(offset[0] * scale), int(offset[1] * scale)))
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("cannot encode the preview")
    return bytes(buf.data)


def _small_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """0/1 uint8 mask at the preview's size. Nearest-neighbour picks the same source pixels whatever they
    hold, so the mask is shrunk first and compared with 0 after: the same result as comparing the whole
    frame's mask first, without two frame-sized temporaries (10 MB for a failing 5 MP part)."""
    mh, mw = mask.shape[:2]
    src = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    small = cv2.resize(np.ascontiguousarray(src), (max(1, round(mw * scale)), max(1, round(mh * scale))),
                       interpolation=cv2.INTER_NEAREST)
    hit = small != 0
    return (hit if hit.ndim == 2 else hit.any(axis=2)).astype(np.uint8)


class PreviewFeed:
    """offer() from the result path; `publish(jpeg_bytes, event_id)` runs on the feed's own thread."""

    def __init__(self, rate_hz: float, publish: Callable[[bytes, str], Any]) -> None:
        self.period = 1.0 / rate_hz
        self._publish = publish
        self._next = 0.0
        self._cond = threading.Condition()
        self._slot: tuple[Any, ...] | None = None
        self._closed = False
        self.sent = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="preview", daemon=True)
        self._thread.start()

    def offer(self, image: np.ndarray | None, mask: np.ndarray | None, regions: Sequence[Region], verdict: str,
              offset: tuple[int, int] = (0, 0), event_id: str = "") -> None:
        """Take this part if a preview is due; never blocks, never copies."""
        now = time.monotonic()
        if image is None or now < self._next:
            return
        self._next = now + self.period
        with self._cond:
            self._slot = (event_id, image, mask, list(regions), verdict, offset)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._closed:
                    self._cond.wait()
                job, self._slot = self._slot, None
                if self._closed or job is None:
                    return
            try:
                self._publish(render_preview(*job[1:]), job[0])
                self.sent += 1
            except Exception:  # a preview is never worth stopping anything for
                self.failed += 1
                if self.failed == 1:
                    log.exception("preview failed (logged once)")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(2)
