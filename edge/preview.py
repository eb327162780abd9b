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
from typing import Any

import cv2
import numpy as np

from edge.contract import Region
from edge.evidence import MaskCrop, shrunk_overlay

log = logging.getLogger(__name__)

PREVIEW_SIDE = 640
JPEG_QUALITY = 75


def render_preview(image: np.ndarray, mask: np.ndarray | None, regions: Sequence[Region], verdict: str,
                   offset: tuple[int, int] = (0, 0)) -> bytes:
    """JPEG of the frame shrunk to PREVIEW_SIDE on its long side, with the overlay drawn at that size (the
    evidence overlay's drawing, with a strided read first: a 5 MP frame costs a quarter of its pixels)."""
    crop = None if mask is None else MaskCrop.of(mask)
    out = shrunk_overlay(image, crop, regions, verdict, offset, PREVIEW_SIDE, stride=True)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("cannot encode the preview")
    return bytes(buf.data)


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
