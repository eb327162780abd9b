"""Alarm state: turns a stream of verdicts and health signals into raise/clear transitions.

Every alarm is a latch: it emits exactly one "raised" when its condition starts and one
"cleared" when it ends, never a message per part. Rate-style alarms use hysteresis (clear
below `hysteresis * threshold`) so a value hovering at the threshold does not flap.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.redact import redact_uri

log = logging.getLogger(__name__)

CONSECUTIVE_FAILS = "consecutive_fails"
FAIL_RATE = "fail_rate"
CAMERA_LOST = "camera_lost"
MODEL_ERROR = "model_error"
BACKLOG_GROWING = "backlog_growing"
PUBLISH_REJECTED = "publish_rejected"
ALARMS = (CONSECUTIVE_FAILS, FAIL_RATE, CAMERA_LOST, MODEL_ERROR, BACKLOG_GROWING, PUBLISH_REJECTED)

AlarmCallback = Callable[[str, bool, str], None]


@dataclass(frozen=True)
class AlarmSettings:
    consecutive_fails: int = 5  # raise after this many fails in a row; a pass clears
    fail_rate_window: int = 50  # parts (pass/fail; error verdicts are not counted)
    fail_rate_max: float = 0.3  # raise when the window's fail ratio exceeds this
    backlog_ratio: float = 0.5  # raise when the outbox fill ratio exceeds this
    hysteresis: float = 0.8  # rate alarms clear below hysteresis * threshold

    def validate(self) -> None:
        if self.consecutive_fails < 1 or self.fail_rate_window < 1:
            raise ValueError("consecutive_fails and fail_rate_window must be >= 1")
        if not 0.0 < self.fail_rate_max <= 1.0 or not 0.0 < self.backlog_ratio <= 1.0:
            raise ValueError("fail_rate_max and backlog_ratio must be in (0, 1]")
        if not 0.0 < self.hysteresis <= 1.0:
            raise ValueError("hysteresis must be in (0, 1]")


class AlarmTracker:
    """Thread-safe; the callback runs outside the lock (it may publish over MQTT)."""

    def __init__(self, settings: AlarmSettings | None = None, callback: AlarmCallback | None = None) -> None:
        self.settings = settings or AlarmSettings()
        self.settings.validate()
        self._callback = callback
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}
        self._run = 0
        self._window: deque[bool] = deque(maxlen=self.settings.fail_rate_window)
        self._fails_in_window = 0

    # --- feeds -------------------------------------------------------------------------
    def observe_verdict(self, verdict: str) -> None:
        """Feed every part's verdict; pass/fail drive the fail alarms, error verdicts do not."""
        s = self.settings
        changes: list[tuple[str, bool, str]] = []
        with self._lock:
            if verdict not in ("pass", "fail"):
                return
            failed = verdict == "fail"
            self._run = self._run + 1 if failed else 0
            if self._run >= s.consecutive_fails:
                self._set(changes, CONSECUTIVE_FAILS, True, f"{self._run} consecutive failed parts")
            elif not failed:
                self._set(changes, CONSECUTIVE_FAILS, False, "a part passed")
            if len(self._window) == self._window.maxlen and self._window[0]:
                self._fails_in_window -= 1
            self._window.append(failed)
            self._fails_in_window += failed
            if len(self._window) == self._window.maxlen:
                rate = self._fails_in_window / len(self._window)
                msg = f"fail rate {rate:.0%} over the last {len(self._window)} parts"
                if rate > s.fail_rate_max:
                    self._set(changes, FAIL_RATE, True, f"{msg} (max {s.fail_rate_max:.0%})")
                elif rate <= s.fail_rate_max * s.hysteresis:
                    self._set(changes, FAIL_RATE, False, msg)
        self._emit(changes)

    def observe_camera(self, ok: bool, message: str = "") -> None:
        """False when frames stop/are stale/corrupt; True once good frames come again."""
        self.set(CAMERA_LOST, not ok, message or ("camera recovered" if ok else "camera lost"))

    def observe_inference(self, ok: bool, message: str = "") -> None:
        """False on an inference failure; True after a successful inference."""
        self.set(MODEL_ERROR, not ok, message or ("inference ok" if ok else "inference failed"))

    def observe_backlog(self, fill_ratio: float) -> None:
        """Outbox fill ratio (Outbox.fill_ratio()), e.g. once per stats period."""
        s = self.settings
        msg = f"outbox {fill_ratio:.0%} full"
        if fill_ratio > s.backlog_ratio:
            self.set(BACKLOG_GROWING, True, f"{msg} (threshold {s.backlog_ratio:.0%})")
        elif fill_ratio <= s.backlog_ratio * s.hysteresis:
            self.set(BACKLOG_GROWING, False, msg)

    def set(self, name: str, active: bool, message: str = "") -> None:
        """Raise/clear any alarm directly (e.g. MqttSink's on_alarm for publish_rejected)."""
        changes: list[tuple[str, bool, str]] = []
        with self._lock:
            self._set(changes, name, active, message)
        self._emit(changes)

    # --- state -------------------------------------------------------------------------
    def active(self) -> dict[str, str]:
        """Currently raised alarms -> the message they were raised with."""
        with self._lock:
            return dict(self._active)

    def is_active(self, name: str) -> bool:
        with self._lock:
            return name in self._active

    def _set(self, changes: list[tuple[str, bool, str]], name: str, active: bool, message: str) -> None:
        if active == (name in self._active):
            return  # latch: only transitions are reported
        message = redact_uri(message)  # alarm texts reach logs, MQTT, stats and health
        if active:
            self._active[name] = message
        else:
            del self._active[name]
        changes.append((name, active, message))

    def _emit(self, changes: list[tuple[str, bool, str]]) -> None:
        for name, active, message in changes:
            log.log(logging.WARNING if active else logging.INFO, "alarm %s %s: %s",
                    name, "raised" if active else "cleared", message)
            if self._callback is not None:
                try:
                    self._callback(name, active, message)
                except Exception:  # an alarm sink failure must not break the pipeline
                    log.exception("alarm callback failed for %s", name)
