"""The PLC handshake as a state machine, free of OPC UA: jobs in, results out, acknowledgements.

Why separate from the server: the rules (one trigger -> exactly one result, a bounded number of
jobs, never a silent drop) are the contract with the PLC and are easier to read and check
without an event loop. The server (edge.opcua.server) mirrors `view()` into the address space.

- StartJob stores the part's trigger in the station's one FrameGate (the MQTT trigger path uses
  the same gate), so de-duplication, trigger timeouts (`error` result when no frame comes) and the
  restart recovery of open triggers are the gate's, not a second implementation.
- A job holds one of `max_jobs` slots from StartJob until the PLC acknowledges its result; past
  that StartJob is refused with Busy. Results queue in order; Result shows the oldest
  unacknowledged one, so a PLC that reads slowly never misses one.
- Every triggered part's result is shown (a job of this PLC, an MQTT trigger, or the `error`
  result a restart gives a trigger that was open), numbered by ResultCounter. The unacknowledged
  results and the counter survive a daemon crash (state_dir/opcua-results.json, replaced
  atomically; not fsynced: the MQTT outbox is the durable record, this is the PLC's view of it).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from edge.sources.base import Frame, valid_part_id
from edge.triggering.gate import FrameGate
from edge.triggering.triggers import TriggerMessage

log = logging.getLogger(__name__)

# A result is kept for the PLC while fewer than this wait. PLC jobs alone never get there (max_jobs);
# more means MQTT triggers nobody acknowledges here (the MQTT outbox has every one): the oldest are
# dropped from the PLC's view with an error log, never silently. Bounds the state file written per result.
MAX_UNACKED = 100


class JobStatus(IntEnum):
    """StartJob's first output; the second is a readable text. 0 = a result will come."""

    ACCEPTED = 0
    BUSY = 1  # max_jobs jobs started and not acknowledged: retry after an Acknowledge
    UNKNOWN_RECIPE = 2
    BAD_PART_ID = 3
    DUPLICATE = 4  # this part id is open or was triggered within pipeline.trigger_dedup_s
    NOT_READY = 5  # the station is starting or stopping
    STORE_FAILED = 6  # the trigger could not be stored (disk): nothing was started, retry


class AckStatus(IntEnum):
    OK = 0
    NOTHING_PENDING = 1
    WRONG_COUNTER = 2  # the counter is not the one Result shows: read Result again


class State(IntEnum):
    """OPC 40100 style, simplified (docs/opcua.md)."""

    INITIALIZED = 0  # the server runs, the station is not inspecting yet
    READY = 1  # no job in the station
    BUSY = 2  # jobs started and not yet acknowledged
    ERROR = 3  # a fault stops good results (camera lost, model or outbox error); jobs still get `error` results


@dataclass
class PlcResult:
    """What Result shows for one part (from its result event)."""

    counter: int
    part_id: str
    verdict: str
    defect_count: int
    total_defect_area: int
    event_id: str
    model_version: str
    recipe: str
    error: str
    trigger_ts: float  # station clock when the trigger arrived (epoch s)
    capture_ts: float
    result_ts: float  # when the result was durable in the outbox
    inference_ms: float
    station_ms: float  # capture -> result inside the station
    plc_job: bool  # started by this PLC's StartJob (False: MQTT trigger or a restart's recovery)


@dataclass
class View:
    """A consistent snapshot for the server to publish."""

    state: State
    state_text: str
    jobs: int  # started, result not yet there
    unacked: int
    result: PlcResult | None = None
    counter: int = 0
    faults: dict[str, str] = field(default_factory=dict)


class Handshake:
    """Thread-safe: StartJob runs on the OPC UA loop's executor, Acknowledge on the loop, results on the
    flow's result thread."""

    def __init__(self, gate: FrameGate, max_jobs: int, state_path: Path | None,
                 faults: Callable[[], dict[str, str]] = dict) -> None:
        self.gate, self.max_jobs, self.path = gate, max_jobs, state_path
        self.recipes = gate.recipes  # one list of names: the gate refuses the same ones for MQTT triggers
        self._faults = faults
        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}  # part id -> recipe ("" = the station rules), result not yet there
        self._unacked: deque[PlcResult] = deque()
        self._counter = 0
        self._last_acked: PlcResult | None = None
        self.ready = False  # set_ready: the station inspects (StartJob is refused NotReady before and after)
        self.on_change: Callable[[], None] = lambda: None  # the server's wake-up (thread-safe)
        self.dropped = 0
        self._load()

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self.ready = ready
        self.on_change()

    # -- PLC side ----------------------------------------------------------------------------------
    def start_job(self, part_id: Any, recipe: Any) -> tuple[JobStatus, str]:
        """One PLC trigger: stored in the gate before ACCEPTED is returned (one result will follow)."""
        part = valid_part_id(part_id)
        if part is None:
            return JobStatus.BAD_PART_ID, "part id must be 1-128 printable characters without slashes"
        name = recipe.strip() if isinstance(recipe, str) else ""
        if name and name not in self.recipes:
            known = ", ".join(sorted(self.recipes)) or "none configured"
            return JobStatus.UNKNOWN_RECIPE, f"unknown recipe {name!r} (known: {known})"
        with self._lock:
            if not self.ready:
                return JobStatus.NOT_READY, "the station is not inspecting (starting or stopping): retry"
            held = len(self._jobs) + len(self._unacked)
            if held >= self.max_jobs:
                return JobStatus.BUSY, (f"busy: {len(self._jobs)} job(s) running and {len(self._unacked)} result(s) "
                                        f"not acknowledged (opcua.max_jobs {self.max_jobs}): acknowledge, then retry")
            if part in self._jobs:
                return JobStatus.DUPLICATE, f"part {part!r} is already running"
            self._jobs[part] = name  # before the gate: its result may be ready before on_trigger returns
        payload = json.dumps({"part_id": part, **({"recipe": name} if name else {})}).encode()
        try:
            outcome = self.gate.on_trigger(TriggerMessage(payload))
        except Exception as e:  # sqlite: the gate raised trigger_store; nothing was stored
            self._forget(part)
            return JobStatus.STORE_FAILED, f"the trigger could not be stored ({type(e).__name__}: {e}): retry"
        if outcome == "duplicate":
            self._forget(part)
            return JobStatus.DUPLICATE, (f"part {part!r} was triggered within pipeline.trigger_dedup_s "
                                         f"({self.gate.cfg.trigger_dedup_s:g} s): no second result")
        if outcome in ("retained", "malformed", "ignored"):  # no result will come (free_run is refused by config)
            self._forget(part)
            return JobStatus.NOT_READY, f"the station does not take triggers ({outcome})"
        self.on_change()
        if outcome != "accepted":  # stored as rejected: its `error` result follows from the gate
            return JobStatus.ACCEPTED, f"accepted; the gate refused a frame for it ({outcome}): an error result follows"
        return JobStatus.ACCEPTED, "accepted" + (f" with recipe {name!r}" if name else "")

    def acknowledge(self, counter: Any) -> tuple[AckStatus, str]:
        """The PLC has read the result numbered `counter`: the next one (if any) is shown."""
        with self._lock:
            if not self._unacked:
                return AckStatus.NOTHING_PENDING, "no result waits for an acknowledgement"
            shown = self._unacked[0].counter
            if counter != shown:
                return AckStatus.WRONG_COUNTER, f"Result shows counter {shown}, not {counter}: read it again"
            self._last_acked = self._unacked.popleft()
            self._save()
        self.on_change()
        return AckStatus.OK, f"result {counter} acknowledged"

    # -- station side ------------------------------------------------------------------------------
    def on_result(self, frame: Frame, event_id: str, payload: bytes) -> None:
        """FrameFlow result listener: a triggered part's result is durable in the outbox."""
        trigger_ts = frame.meta.get("trigger_ts")
        if trigger_ts is None:
            return  # a free-running frame: no PLC asked for it
        event = json.loads(payload)
        with self._lock:
            requested = self._jobs.pop(frame.part_id, None)
            self._counter += 1
            rules = event.get("rules") or {}
            timings = event.get("timings_ms") or {}
            result = PlcResult(
                counter=self._counter, part_id=str(event["part_id"]), verdict=str(event["verdict"]),
                defect_count=int(event.get("region_count", len(event.get("regions", [])))),
                total_defect_area=int(event.get("total_defect_area", 0)), event_id=event_id,
                model_version=str((event.get("model") or {}).get("version", "")),
                recipe=str(rules.get("recipe") or requested or ""), error=str(event.get("error") or ""),
                trigger_ts=float(trigger_ts), capture_ts=float(event["capture_ts"]), result_ts=time.time(),
                inference_ms=float(timings.get("inference", 0.0)),
                station_ms=float(timings.get("capture_to_result", 0.0)), plc_job=requested is not None)
            self._unacked.append(result)
            while len(self._unacked) > MAX_UNACKED:
                old = self._unacked.popleft()
                self.dropped += 1
                log.error("OPC UA: result %d of part %s dropped from the PLC's view: %d results are not "
                          "acknowledged (it stays in the MQTT outbox as event %s)", old.counter, old.part_id,
                          MAX_UNACKED, old.event_id)
            self._save()
        self.on_change()

    def view(self) -> View:
        faults = self._faults()
        with self._lock:
            jobs, unacked = len(self._jobs), len(self._unacked)
            shown = self._unacked[0] if self._unacked else self._last_acked  # kept on show after its ack
            counter = shown.counter if shown else self._counter
        if not self.ready:
            state, text = State.INITIALIZED, "starting: the station does not inspect yet"
        elif faults:
            state, text = State.ERROR, "; ".join(f"{k}: {v}" for k, v in sorted(faults.items()))
        elif jobs or unacked:
            state, text = State.BUSY, f"{jobs} job(s) running, {unacked} result(s) to acknowledge"
        else:
            state, text = State.READY, "ready"
        return View(state, text, jobs, unacked, shown, counter, faults)

    def _forget(self, part: str) -> None:
        with self._lock:
            self._jobs.pop(part, None)

    # -- persistence -------------------------------------------------------------------------------
    def _save(self) -> None:
        """Caller holds the lock. Atomic replace, no fsync (see the module docstring)."""
        if self.path is None:
            return
        data = {"counter": self._counter, "last_acked": asdict(self._last_acked) if self._last_acked else None,
                "unacked": [asdict(r) for r in self._unacked]}
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk must not stop results; the PLC view may then not survive a crash
            log.error("OPC UA: cannot write %s: %s", self.path, e)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._counter = int(data["counter"])
            self._unacked = deque(PlcResult(**r) for r in data["unacked"])
            self._last_acked = PlcResult(**data["last_acked"]) if data.get("last_acked") else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("OPC UA: %s unreadable (%s): unacknowledged results of the previous run are not shown "
                      "(they are in the MQTT outbox); the counter starts again", self.path, e)
            self._unacked = deque()
