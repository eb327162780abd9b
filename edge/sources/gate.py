"""Which frames become inspected parts: free-run sampling, or part ids from trigger messages.

Triggered mode: a message on `<base>/trigger` names a part; the next frame captured *after*
the message is that part's image. A trigger that gets no frame in time, or that overflows the
pending list, still gets an `error` verdict - a part the line announced is never silently lost.
Malformed trigger payloads are counted and logged (rate-limited), never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from edge.config import PipelineConfig
from edge.metrics import Metrics
from edge.sources.base import Frame, parse_trigger

log = logging.getLogger(__name__)

CAMERA_LOST = "camera_lost"


class FrameGate:
    """Thread-safe: triggers arrive on the MQTT thread, frames on the capture thread."""

    def __init__(self, cfg: PipelineConfig, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.triggered = cfg.mode == "triggered"
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, float, float]] = deque()  # (part_id, wall ts, monotonic ts)
        self._rejected: list[Frame] = []  # overflowed triggers, turned into error parts
        self._n = 0
        self._last_taken = float("-inf")
        self.inspected = self.dropped = self.skipped = 0
        self._inspected_at_snapshot = 0
        self.triggers = {"accepted": 0, "malformed": 0, "ignored": 0, "expired": 0, "overflow": 0}

    # -- triggers (MQTT thread) --------------------------------------------------------------------
    def on_trigger(self, payload: bytes) -> None:
        try:
            part_id = parse_trigger(payload)
        except ValueError as e:
            self._count("malformed")
            n = self.triggers["malformed"]
            if n <= 10 or n % 100 == 0:  # a misbehaving PLC must not flood the journal
                log.warning("malformed trigger #%d ignored (%s): %r", n, e, payload[:80])
            return
        if not self.triggered:
            self._count("ignored")
            if self.triggers["ignored"] == 1:
                log.warning("trigger for part %r ignored: pipeline.mode is free_run", part_id)
            return
        now, mono = time.time(), time.monotonic()
        with self._lock:
            if len(self._pending) >= self.cfg.trigger_max_pending:
                self.triggers["overflow"] += 1
                self._rejected.append(_error_part(part_id, now, "no_frame",
                                                  f"trigger dropped: {len(self._pending)} triggers already wait "
                                                  f"for a frame (trigger_max_pending)"))
                self.metrics.triggers.labels("overflow").inc()
                return
            self._pending.append((part_id, now, mono))
            self.triggers["accepted"] += 1
        self.metrics.triggers.labels("accepted").inc()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.triggers[outcome] += 1
        self.metrics.triggers.labels(outcome).inc()

    # -- frames (capture thread) -------------------------------------------------------------------
    def admit(self, frame: Frame) -> list[Frame]:
        """The frames to inspect for this captured frame (zero or one)."""
        if not self.triggered:
            if frame.error is not None:
                return [frame]  # never skip a failure: it is the only sign of a broken camera
            self._n += 1
            now = time.monotonic()
            if self._n % self.cfg.every_nth or (self.cfg.max_fps and now - self._last_taken < 1.0 / self.cfg.max_fps):
                self.skipped += 1
                self.metrics.skipped.inc()
                return []
            self._last_taken = now
            return [frame]
        with self._lock:
            due = self._pending and frame.mono_ts >= self._pending[0][2]
            if frame.error_kind == CAMERA_LOST or not due:
                # A stall alone is not a part; waiting triggers time out with an error verdict.
                if frame.error is None:
                    self.skipped += 1
                    self.metrics.skipped.inc()
                return []
            part_id, _, _ = self._pending.popleft()
        frame.part_id = part_id
        frame.live = False  # now it is a part: never dropped, never "stale"
        return [frame]

    def expired_triggers(self) -> list[Frame]:
        """Triggers that waited longer than trigger_timeout_s, and overflowed ones, as error parts."""
        out: list[Frame] = []
        limit = time.monotonic() - self.cfg.trigger_timeout_s
        with self._lock:
            out, self._rejected = self._rejected, []
            while self._pending and self._pending[0][2] < limit:
                part_id, ts, _ = self._pending.popleft()
                self.triggers["expired"] += 1
                self.metrics.triggers.labels("expired").inc()
                out.append(_error_part(part_id, ts, "no_frame",
                                       f"no frame within {self.cfg.trigger_timeout_s} s after the trigger"))
        return out

    def flush(self, reason: str) -> list[Frame]:
        """All waiting triggers as error parts (shutdown)."""
        with self._lock:
            out = self._rejected + [_error_part(p, ts, "no_frame", reason) for p, ts, _ in self._pending]
            self._rejected, self._pending = [], deque()
        return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._pending)
            triggers = dict(self.triggers)
        interval = self.inspected - self._inspected_at_snapshot
        self._inspected_at_snapshot = self.inspected
        return {"inspected_interval": interval, "dropped": self.dropped, "skipped": self.skipped,
                "triggers": {**triggers, "pending": pending} if self.triggered or any(triggers.values()) else None}


def _error_part(part_id: str, ts: float, kind: str, message: str) -> Frame:
    return Frame(part_id=part_id, capture_ts=ts, image=None, error=message, error_kind=kind, live=False)
