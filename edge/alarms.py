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

from edge.config import AlarmsConfig
from edge.redact import redact_uri

log = logging.getLogger(__name__)

# Every alarm name the station raises, in one place (MQTT <base>/alarm, metrics label, health).
CONSECUTIVE_FAILS = "consecutive_fails"
FAIL_RATE = "fail_rate"
CAMERA_LOST = "camera_lost"  # also the error kind of the part a lost camera reports
MODEL_ERROR = "model_error"
BACKLOG_GROWING = "backlog_growing"
PUBLISH_REJECTED = "publish_rejected"  # MQTT 5 PUBACK >= 0x80: the broker refused a result
NO_SUBSCRIBERS = "no_subscribers"  # PUBACK 0x10: nobody subscribes to the results
MQTT_UNVERIFIED_ACKS = "mqtt_unverified_acks"  # MQTT 3.1.1 cannot report a refused publish
CLIENT_ID_CONFLICT = "client_id_conflict"  # another connection took our MQTT client id
OUTBOX_ERROR = "outbox_error"  # results or sequence numbers cannot be stored: the pipeline holds
OUTBOX_RECOVERED = "outbox_recovered"  # a corrupt outbox was moved aside; the message says what was saved
FRAME_ERROR = "frame_error"  # unreadable/black/wrong-size files from a folder source
STALE_FRAMES = "stale_frames"  # live frames waited longer than frame_checks.max_age_s
EVIDENCE_THINNED = "evidence_thinned"  # the evidence writer has been dropping evidence for a while
TRIGGER_SEQUENCE = "trigger_sequence"  # the PLC's sequence numbers skipped or went back
TRIGGER_LATE = "trigger_late"  # triggers arrive too late (or too early) for their frame
TRIGGER_STORE = "trigger_store"  # triggers cannot be stored, so they are not acknowledged
MODEL_RELOAD = "model_reload"  # a reload failed; the previous model keeps running
MODEL_FALLBACK = "model_fallback"  # this CPU computes the package's model differently: its FP32 IR runs (edge.cpu_check)
ALARMS = (CONSECUTIVE_FAILS, FAIL_RATE, CAMERA_LOST, MODEL_ERROR, BACKLOG_GROWING, PUBLISH_REJECTED, NO_SUBSCRIBERS,
          MQTT_UNVERIFIED_ACKS, CLIENT_ID_CONFLICT, OUTBOX_ERROR, OUTBOX_RECOVERED, FRAME_ERROR, STALE_FRAMES,
          EVIDENCE_THINNED, TRIGGER_SEQUENCE, TRIGGER_LATE, TRIGGER_STORE, MODEL_RELOAD, MODEL_FALLBACK)
HYSTERESIS = 0.8  # rate alarms clear below HYSTERESIS * threshold

AlarmCallback = Callable[[str, bool, str], None]


class AlarmTracker:
    """Thread-safe; the callback runs outside the lock (it may publish over MQTT)."""

    def __init__(self, settings: AlarmsConfig | None = None, callback: AlarmCallback | None = None, *,
                 hysteresis: float = HYSTERESIS) -> None:
        if not 0.0 < hysteresis <= 1.0:
            raise ValueError(f"hysteresis must be in (0, 1], got {hysteresis}")
        self.settings = settings or AlarmsConfig()  # thresholds and their defaults: edge.config.AlarmsConfig
        self.hysteresis = hysteresis
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
                elif rate <= s.fail_rate_max * self.hysteresis:
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
        elif fill_ratio <= s.backlog_ratio * self.hysteresis:
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
