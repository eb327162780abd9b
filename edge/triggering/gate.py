"""Which frames become inspected parts: free-run sampling, or part ids from trigger messages.

Triggered mode: a message on `<base>/trigger` names a part; the next frame captured *after*
the message is that part's image. Every trigger that names a part gets exactly one result:
- it is stored durably (edge.triggering.triggers) before the MQTT layer acknowledges it, and closed only
  once its result is in the outbox; open triggers of a previous run become `error` results
  at start, never matched to a frame taken after the restart (that shows another part);
- a trigger for a part id that is open or was seen within `trigger_dedup_s` is a duplicate:
  no frame, no second result (one extra frame taken would shift every later match);
- a trigger that cannot be matched safely (no frame in time, too many waiting, arrived late,
  PLC sequence going back, unusable optional field) becomes an `error` result for its part;
- retained triggers (replayed at every subscribe) and malformed payloads are counted and
  logged (rate-limited), never inspected.
An optional PLC sequence number ("seq") detects triggers that never arrived (gap) and repeats
or reordering (the `trigger_sequence` alarm, with the expected and received numbers).

Frame time: OpenCV gives no exposure time, only the moment read() returns a frame. A stream
hands over old frames in a burst at open (FFmpeg's probe buffer) and after the reader fell
behind, so the camera source backdates frames by their delay measured in stream time and marks
the burst after an open `buffered` (edge/sources/camera.py _StreamClock); buffered frames are
never given to a trigger. The constant latency of camera and network, which no stream time
shows, is what `trigger_frame_delay_s` is for.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from edge.alarms import CAMERA_LOST, TRIGGER_LATE, TRIGGER_SEQUENCE, TRIGGER_STORE
from edge.config import PipelineConfig
from edge.counters import Counters
from edge.metrics import Metrics
from edge.rules import BAD_TRIGGER, LATE_TRIGGER, NO_FRAME
from edge.sources.base import Frame, TriggerFields, error_frame, parse_trigger_fields
from edge.triggering.triggers import StoredTrigger, TriggerMessage, TriggerStore

log = logging.getLogger(__name__)

RESUME_GRACE_S = 1.0  # a broker flushes what it queued for us right after the CONNACK
_REJECTED_BATCH = 32  # error parts per capture-loop turn: a flood of overflowed triggers never holds capture
RESTARTED = ("the station restarted before this part's result was stored; a frame taken after the restart "
             "shows another part, so none is used")

AlarmCallback = Callable[[str, bool, str], None]


class FrameGate:
    """Thread-safe: triggers arrive on the MQTT thread, frames on the capture thread."""

    def __init__(self, cfg: PipelineConfig, metrics: Metrics, store: TriggerStore | None = None,
                 on_alarm: AlarmCallback | None = None, counters: Counters | None = None,
                 recipes: Collection[str] = ()) -> None:
        self.cfg, self.metrics, self._on_alarm = cfg, metrics, on_alarm
        self.recipes = frozenset(recipes)  # names a trigger's "recipe" may take (config `recipes:`)
        self.triggered = cfg.mode == "triggered"
        self.store = store if store is not None else TriggerStore(dedup_s=cfg.trigger_dedup_s)
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, float, float, str | None]] = deque()  # (part_id, wall ts, monotonic ts, recipe)
        self._rejected_after = 0  # store cursor: rejected rows up to this id were handed over
        self._rejected_due = self.triggered  # rejected rows may wait in the store (bounded memory)
        self._n = 0
        self._last_taken = float("-inf")
        self.counters = counters if counters is not None else Counters()  # shared with the frame flow
        self.triggers = dict.fromkeys(("accepted", "malformed", "ignored", "expired", "overflow", "duplicate",
                                       "retained", "late", "invalid", "sequence_gap", "sequence_error", "sequence_restart",
                                       "recovered"), 0)
        self._last_seq = self.store.last_seq()
        self._raised: set[str] = set()  # alarms raised by this gate (MQTT thread only)
        self._store_ok = True  # the last write to the trigger store worked
        if self.store.moved_aside:
            self._alarm(TRIGGER_STORE, True, f"the trigger store was corrupt and moved aside to "
                                             f"{self.store.moved_aside}: triggers open in it got no result")
        if self.triggered:
            recovered = self.store.recover(RESTARTED)
            if recovered:
                self.triggers["recovered"] = recovered
                log.warning("%d trigger(s) of the previous run had no stored result: they get error verdicts",
                            recovered)

    # -- triggers (MQTT thread) --------------------------------------------------------------------
    def on_trigger(self, message: TriggerMessage | bytes) -> str:
        """Decide and store one trigger; returns once it is durable (the caller acks it afterwards).

        Returns the outcome: "accepted" (waits for its frame), "duplicate", "retained", "malformed" or
        "ignored" (no result will come), or the reason of an `error` result that will come ("invalid",
        "late", "overflow", "sequence_error"). The OPC UA StartJob answers the PLC with it."""
        msg = message if isinstance(message, TriggerMessage) else TriggerMessage(bytes(message))
        if msg.retain:
            self._note("retained", "retained trigger ignored: the broker replays it at every subscribe, it is "
                                   "not a part (clear it with an empty retained message): %r", msg.payload[:80])
            return "retained"
        try:
            fields = parse_trigger_fields(msg.payload)
        except ValueError as e:
            self._note("malformed", "malformed trigger ignored (%s): %r", e, msg.payload[:80])
            return "malformed"
        if not self.triggered:
            self._note("ignored", "trigger for part %r ignored: pipeline.mode is free_run", fields.part_id)
            return "ignored"
        now, mono = time.time(), time.monotonic()
        alarms: list[tuple[str, bool, str]] = []
        with self._lock:  # one trigger at a time: store, sequence and pending list stay consistent
            last_seq = self._last_seq
            try:
                outcome, reason, kind = "duplicate", None, NO_FRAME
                if not self.store.duplicate(fields.part_id, now):
                    outcome, reason, kind = self._judge(fields, msg, now, alarms)
                    self.store.add(fields.part_id, now, fields.seq, reason, kind)
                    if reason is None:
                        self._pending.append((fields.part_id, now, mono, fields.recipe))
                    else:
                        self._rejected_due = True
                failure = None
            except sqlite3.Error as e:  # disk full, I/O error: not acked, so the broker keeps the trigger
                self._last_seq, failure = last_seq, e
        self._stored(failure is None, f"triggers cannot be stored ({failure}); the broker redelivers them "
                                      f"after a reconnect" if failure else "triggers are stored again")
        if failure is not None:
            raise failure
        if outcome == "duplicate":
            self._note("duplicate", "duplicate trigger for part %r ignored (open or seen within %.0f s)",
                       fields.part_id, self.cfg.trigger_dedup_s)
        elif reason is not None:
            self._note(outcome, "trigger for part %r gets an error verdict: %s", fields.part_id, reason)
        else:
            self._count(outcome)
        for alarm in alarms:
            self._alarm(*alarm)
        return outcome

    def _stored(self, ok: bool, message: str) -> None:
        """Raise trigger_store on a write failure, clear it on the next success (a corrupt store found
        at start stays raised until the next start: the triggers lost with it need a person)."""
        if ok == self._store_ok:
            return
        self._store_ok = ok
        if not ok:
            log.error("%s", message)
        self._alarm(TRIGGER_STORE, not ok, message)

    def _judge(self, f: TriggerFields, msg: TriggerMessage, now: float,
               alarms: list[tuple[str, bool, str]]) -> tuple[str, str | None, str]:
        """(outcome, reason for an error verdict or None, error kind) of a trigger that is not a duplicate."""
        seq_reason = self._sequence(f, alarms)
        late = self._late(f, msg, now)
        alarms.append((TRIGGER_LATE, late is not None, late or "triggers arrive in time"))
        if f.problem is not None:
            return "invalid", f.problem, BAD_TRIGGER
        if f.recipe is not None and f.recipe not in self.recipes:
            return "invalid", (f"unknown recipe {f.recipe!r} (the station config's recipes: "
                               f"{', '.join(sorted(self.recipes)) or 'none'})"), BAD_TRIGGER
        if seq_reason is not None:
            return "sequence_error", seq_reason, TRIGGER_SEQUENCE
        if late is not None:
            return "late", late, LATE_TRIGGER
        if len(self._pending) >= self.cfg.trigger_max_pending:
            return "overflow", (f"trigger dropped: {len(self._pending)} triggers already wait for a frame "
                                f"(trigger_max_pending)"), NO_FRAME
        return "accepted", None, NO_FRAME

    def _sequence(self, f: TriggerFields, alarms: list[tuple[str, bool, str]]) -> str | None:
        """Check the PLC sequence number; a gap is alarmed, a repeat or step back also fails the part.

        A number that repeats with another part id (or goes back) means the order of triggers
        cannot be trusted - reordered messages, two PLCs on one topic - so the frame that follows
        it may belong to another part: this part gets `error` rather than a guess, and the count
        resynchronises on the received number. A PLC that restarts its counter (sends 0 or 1 again)
        is alarmed but not failed: a power cycle is routine, and a stale replay is still caught by
        the de-duplication and lateness checks.
        """
        if f.seq is None:
            return None
        last, self._last_seq = self._last_seq, f.seq
        if last is None or f.seq == last + 1:
            alarms.append((TRIGGER_SEQUENCE, False, f"PLC trigger sequence in order again at {f.seq}"))
            return None
        expected = last + 1
        if f.seq > expected:
            self._bump("sequence_gap")
            msg = (f"PLC trigger sequence gap: expected {expected}, received {f.seq} for part {f.part_id}: "
                   f"{f.seq - expected} trigger(s) never arrived")
            log.warning("%s", msg)
            alarms.append((TRIGGER_SEQUENCE, True, msg))
            return None
        if f.seq <= 1 < last:
            self._bump("sequence_restart")
            msg = f"PLC trigger sequence restarted at {f.seq} (was {last}) with part {f.part_id}: PLC restart?"
            log.warning("%s", msg)
            alarms.append((TRIGGER_SEQUENCE, True, msg))
            return None
        msg = (f"PLC trigger sequence went back: expected {expected}, received {f.seq} for part {f.part_id} "
               f"(repeated number with another part id, reordered triggers or a PLC restart)")
        alarms.append((TRIGGER_SEQUENCE, True, msg))
        return f"{msg}: the trigger order cannot be trusted, so no frame is matched to this part"

    def _late(self, f: TriggerFields, msg: TriggerMessage, now: float) -> str | None:
        """Why this trigger may have arrived after its part passed the camera, or None."""
        max_age = self.cfg.trigger_max_age_s
        if max_age <= 0:
            return None
        if f.ts is not None:
            age = now - f.ts
            if age > max_age:
                return (f"trigger arrived {age:.2f} s after the PLC sent it (trigger_max_age_s {max_age}): "
                        f"its part has passed the camera")
            if age < -max_age:
                return (f"trigger time stamp is {-age:.2f} s ahead of the station clock: PLC and station clocks "
                        f"differ by more than trigger_max_age_s {max_age}")
            return None
        if msg.dup or (msg.resumed_s is not None and msg.resumed_s < RESUME_GRACE_S):
            return ("trigger may have been queued by the broker while the station was offline (it came "
                    "redelivered or right after the session resumed, without a `ts` to tell): its part has "
                    "passed the camera")
        return None

    def _note(self, outcome: str, fmt: str, *args: Any) -> None:
        """Count an outcome and log it rate-limited: a misbehaving PLC must not flood the journal."""
        n = self._count(outcome)
        if n <= 10 or n % 100 == 0:
            log.warning(f"{fmt} (#{n} {outcome})", *args)

    def _count(self, outcome: str) -> int:
        with self._lock:
            return self._bump(outcome)

    def _bump(self, outcome: str) -> int:
        """Count an outcome; the caller holds the lock."""
        self.triggers[outcome] += 1
        self.metrics.triggers.labels(outcome).inc()
        return self.triggers[outcome]

    def _alarm(self, name: str, active: bool, message: str) -> None:
        """Raise, or clear what this gate raised (not a clear per trigger)."""
        if active == (name in self._raised):
            return
        (self._raised.add if active else self._raised.discard)(name)
        if self._on_alarm is not None:
            try:
                self._on_alarm(name, active, message)
            except Exception:
                log.exception("alarm callback failed for %s", name)

    # -- frames (capture thread) -------------------------------------------------------------------
    def admit(self, frame: Frame) -> list[Frame]:
        """The frames to inspect for this captured frame (zero or one)."""
        if not self.triggered:
            if frame.error is not None:
                return [frame]  # never skip a failure: it is the only sign of a broken camera
            self._n += 1
            now = time.monotonic()
            if self._n % self.cfg.every_nth or (self.cfg.max_fps and now - self._last_taken < 1.0 / self.cfg.max_fps):
                self.counters.add("skipped")
                self.metrics.skipped.inc()
                return []
            self._last_taken = now
            return [frame]
        with self._lock:
            due = self._pending and frame.mono_ts >= self._pending[0][2] + self.cfg.trigger_frame_delay_s
            if frame.error_kind == CAMERA_LOST or not due or frame.meta.get("buffered"):
                # A stall alone is not a part; waiting triggers time out with an error verdict.
                if frame.error is None:
                    self.counters.add("skipped")
                    self.metrics.skipped.inc()
                return []
            part_id, received, _, recipe = self._pending.popleft()
        frame.part_id = part_id
        if recipe is not None:
            frame.meta["recipe"] = recipe  # the flow judges the part by this rule set
        frame.live = False  # now it is a part: never dropped, never "stale"
        frame.meta["trigger_ts"] = received  # the event id's key, shared with a restart's error result
        return [frame]

    def expired_triggers(self) -> list[Frame]:
        """Triggers that waited longer than trigger_timeout_s, and a batch of rejected ones, as error parts."""
        out: list[Frame] = []
        limit = time.monotonic() - self.cfg.trigger_timeout_s
        with self._lock:
            while self._pending and self._pending[0][2] < limit:
                part_id, ts, _, _ = self._pending.popleft()
                self._bump("expired")
                out.append(_error_part(part_id, ts, NO_FRAME,
                                       f"no frame within {self.cfg.trigger_timeout_s} s after the trigger"))
            if self._rejected_due:
                rows = self.store.rejected(self._rejected_after, _REJECTED_BATCH)
                self._rejected_due = len(rows) == _REJECTED_BATCH
                out += [self._rejected_part(r) for r in rows]
        return out

    def _rejected_part(self, row: StoredTrigger) -> Frame:
        self._rejected_after = row.id
        return _error_part(row.part_id, row.received, row.kind or NO_FRAME, row.reason or "trigger rejected")

    def flush(self, reason: str, max_rejected: int = 1000) -> list[Frame]:
        """Waiting triggers as error parts (shutdown); rejected ones beyond `max_rejected` stay stored
        and get their error result at the next start, so a flood cannot stretch the shutdown."""
        with self._lock:
            out = [_error_part(p, ts, NO_FRAME, reason) for p, ts, _, _ in self._pending]
            self._pending = deque()
            out += [self._rejected_part(r) for r in self.store.rejected(self._rejected_after, max_rejected)]
        return out

    def commit(self, frame: Frame) -> None:
        """The part's result is durable in the outbox: close its trigger (kept for de-duplication)."""
        received = frame.meta.get("trigger_ts")
        if received is not None:
            self.store.done(frame.part_id, received)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._pending)
            triggers = dict(self.triggers)
        c = self.counters
        return {"inspected_interval": c.since_last("inspected"), "dropped": c.get("dropped"), "skipped": c.get("skipped"),
                "triggers": {**triggers, "pending": pending} if self.triggered or any(triggers.values()) else None}


def _error_part(part_id: str, ts: float, kind: str, message: str) -> Frame:
    """A trigger that ends without a frame; keyed by its receive time like its part would have been."""
    return error_frame(part_id, ts, kind, message, live=False, meta={"trigger_ts": ts})
