"""Trigger integrity: the durable trigger store, the gate's decisions (duplicates, retained, PLC
sequence, late triggers, restarts, overflow) and the MQTT sink's persistent session with manual acks."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from edge.alarms import TRIGGER_LATE, TRIGGER_SEQUENCE, TRIGGER_STORE
from edge.config import CameraSourceConfig, MqttConfig, PipelineConfig
from edge.events import event_id_for
from edge.metrics import Metrics
from edge.mqtt import MqttSettings, MqttSink
from edge.outbox import Outbox
from edge.sources.base import Frame, parse_trigger_fields
from edge.sources.camera import CameraSource, _StreamClock
from edge.triggering.gate import RESUME_GRACE_S, FrameGate
from edge.triggering.triggers import TriggerMessage, TriggerStore
from tests.broker import Broker, Subscriber
from tests.faults.netcam import FFMPEG, NetCamera
from tests.faults.tcp_proxy import TcpProxy
from tests.tiny_package import make_part

BASE = "inspection/l1/s1"


def cfg(**kw: Any) -> PipelineConfig:
    return PipelineConfig(mode="triggered", **kw)


def trig(part: str, seq: int | None = None, ts: float | None = None) -> bytes:
    body: dict[str, Any] = {"part_id": part}
    if seq is not None:
        body["seq"] = seq
    if ts is not None:
        body["ts"] = ts
    return json.dumps(body).encode()


def frame() -> Frame:
    return Frame("cam", time.time(), make_part())


class Alarms:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, active: bool, message: str) -> None:
        self.calls.append((name, active, message))

    def raised(self, name: str) -> list[str]:
        return [m for n, a, m in self.calls if n == name and a]


def taken(gate: FrameGate, n: int) -> list[str]:
    return [f.part_id for _ in range(n) for f in gate.admit(frame())]


# -- payload ---------------------------------------------------------------------------------------
def test_trigger_payload_seq_and_ts_are_optional_and_checked() -> None:
    assert parse_trigger_fields(b"SN-1").seq is None
    f = parse_trigger_fields(trig("A", 7, 1.7e9))
    assert (f.part_id, f.seq, f.ts, f.problem) == ("A", 7, 1.7e9, None)
    f = parse_trigger_fields(json.dumps({"part_id": "A", "seq": " 12", "ts": "2026-01-02T03:04:05Z"}).encode())
    assert (f.seq, f.ts, f.problem) == (12, 1767323045.0, None)  # PLCs often send text
    for bad in ({"seq": -1}, {"seq": "7a"}, {"seq": True}, {"ts": "now"}, {"ts": "2026-01-02T03:04:05"},
                {"ts": float("nan")}):
        f = parse_trigger_fields(json.dumps({"part_id": "A", **bad}).encode())
        assert f.part_id == "A" and f.problem is not None  # a known part: error verdict, not dropped


# -- store -------------------------------------------------------------------------------------------
def test_store_deduplicates_open_and_recent_parts_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "triggers.sqlite3"
    store = TriggerStore(path, dedup_s=0.3)
    now = time.time()
    store.add("A", now, 1)
    assert store.duplicate("A", now + 100)  # open: a duplicate however late
    store.done("A", now)
    assert store.duplicate("A", time.time())
    store.close()
    store = TriggerStore(path, dedup_s=0.3)  # the window survives a restart
    assert store.duplicate("A", time.time()) and store.last_seq() == 1
    time.sleep(0.35)
    assert not store.duplicate("A", time.time())  # a new visit of the part after the window
    store.add("A", time.time(), 2)
    assert store.open_count() == 1 and store.last_seq() == 2
    store.close()


# -- gate ----------------------------------------------------------------------------------------------
def test_duplicate_trigger_takes_no_frame_so_later_parts_keep_their_frames() -> None:
    gate = FrameGate(cfg(), Metrics())
    for payload in (trig("A"), trig("A"), b"A", trig("B")):
        gate.on_trigger(payload)
    assert taken(gate, 3) == ["A", "B"]  # without de-duplication B would get A's second frame
    assert gate.triggers["duplicate"] == 2 and gate.triggers["accepted"] == 2


def test_retained_trigger_is_counted_never_inspected() -> None:
    gate = FrameGate(cfg(), Metrics())
    gate.on_trigger(TriggerMessage(trig("R"), retain=True))
    assert taken(gate, 2) == [] and gate.expired_triggers() == [] and gate.triggers["retained"] == 1


def test_sequence_gap_is_alarmed_with_expected_and_received() -> None:
    alarms = Alarms()
    gate = FrameGate(cfg(), Metrics(), on_alarm=alarms)
    for i in (1, 2, 5):
        gate.on_trigger(trig(f"P{i}", i))
    assert alarms.raised(TRIGGER_SEQUENCE) == ["PLC trigger sequence gap: expected 3, received 5 for part P5: "
                                               "2 trigger(s) never arrived"]
    assert taken(gate, 3) == ["P1", "P2", "P5"]  # the gap's parts never arrived; P5 itself is fine
    gate.on_trigger(trig("P6", 6))
    assert alarms.calls[-1][:2] == (TRIGGER_SEQUENCE, False)  # in order again: cleared
    assert gate.triggers["sequence_gap"] == 1


def test_sequence_repeat_with_another_part_id_is_an_error_not_a_guess() -> None:
    alarms = Alarms()
    gate = FrameGate(cfg(), Metrics(), on_alarm=alarms)
    gate.on_trigger(trig("P1", 1))
    gate.on_trigger(trig("P1", 1))  # the same part again: a duplicate, no alarm
    assert alarms.raised(TRIGGER_SEQUENCE) == []
    gate.on_trigger(trig("X9", 1))  # seq 1 again, another part id
    assert "expected 2, received 1 for part X9" in alarms.raised(TRIGGER_SEQUENCE)[0]
    assert taken(gate, 2) == ["P1"]  # X9 takes no frame
    errors = gate.expired_triggers()
    assert [(f.part_id, f.error_kind) for f in errors] == [("X9", "trigger_sequence")]
    gate.on_trigger(trig("P2", 2))  # resynchronised on the received number
    assert taken(gate, 1) == ["P2"] and gate.triggers["sequence_error"] == 1


def test_a_plc_that_restarts_its_counter_is_alarmed_but_its_part_is_inspected() -> None:
    alarms = Alarms()
    gate = FrameGate(cfg(), Metrics(), on_alarm=alarms)
    for i in (1, 2, 3):
        gate.on_trigger(trig(f"P{i}", i))
    gate.on_trigger(trig("Q1", 1))  # the PLC was power-cycled: its counter starts again
    assert alarms.raised(TRIGGER_SEQUENCE) == ["PLC trigger sequence restarted at 1 (was 3) with part Q1: PLC restart?"]
    assert taken(gate, 4) == ["P1", "P2", "P3", "Q1"] and gate.expired_triggers() == []
    gate.on_trigger(trig("Q2", 2))
    assert alarms.calls[-1][:2] == (TRIGGER_SEQUENCE, False) and gate.triggers["sequence_restart"] == 1


def test_late_and_possibly_queued_triggers_get_error_verdicts() -> None:
    alarms = Alarms()
    gate = FrameGate(cfg(trigger_max_age_s=1.0), Metrics(), on_alarm=alarms)
    now = time.time()
    gate.on_trigger(trig("OLD", ts=now - 5))  # queued by the broker while the station was away
    gate.on_trigger(trig("FUTURE", ts=now + 5))  # clocks apart
    gate.on_trigger(TriggerMessage(trig("REDELIVERED"), dup=True))  # no ts: cannot tell, so not trusted
    gate.on_trigger(TriggerMessage(trig("AFTER-RESUME"), resumed_s=RESUME_GRACE_S / 10))
    gate.on_trigger(TriggerMessage(trig("FRESH", ts=time.time()), dup=True))  # the ts says it is fresh
    gate.on_trigger(TriggerMessage(trig("LATER"), resumed_s=RESUME_GRACE_S + 1))
    assert taken(gate, 3) == ["FRESH", "LATER"]
    errors = {f.part_id: f for f in gate.expired_triggers()}
    assert set(errors) == {"OLD", "FUTURE", "REDELIVERED", "AFTER-RESUME"}
    assert "5.0" in (errors["OLD"].error or "") and errors["OLD"].error_kind == "late_trigger"
    assert alarms.raised(TRIGGER_LATE) and alarms.calls[-1][:2] == (TRIGGER_LATE, False)


def test_frame_delay_skips_frames_grabbed_within_the_stream_latency() -> None:
    gate = FrameGate(cfg(trigger_frame_delay_s=0.2), Metrics())
    gate.on_trigger(b"A")
    assert taken(gate, 1) == []  # grabbed right after the trigger: exposed before it
    time.sleep(0.21)
    assert taken(gate, 1) == ["A"]


def test_restart_turns_open_triggers_into_errors_never_into_new_frames(tmp_path: Path) -> None:
    path = tmp_path / "triggers.sqlite3"
    gate = FrameGate(cfg(), Metrics(), TriggerStore(path))
    for i, part in enumerate(("TAKEN", "DONE", "WAITING"), 1):
        gate.on_trigger(trig(part, i))
    taken_frame = gate.admit(frame())[0]  # took a frame, but the daemon dies before its result is stored
    assert taken_frame.part_id == "TAKEN"
    done = gate.admit(frame())[0]
    gate.commit(done)  # DONE's result is in the outbox
    gate.store.close()  # SIGKILL; WAITING still waits for a frame
    gate = FrameGate(cfg(), Metrics(), TriggerStore(path))
    assert taken(gate, 3) == []  # frames after the restart show other parts
    errors = gate.expired_triggers()
    assert sorted(f.part_id for f in errors) == ["TAKEN", "WAITING"]
    assert all("restarted" in (f.error or "") and f.meta["trigger_ts"] == f.capture_ts for f in errors)
    # The same event id as the lost result would have had (flow keys it by trigger_ts): had that result
    # reached the outbox just before the kill, the error is a redelivery of its id, not a second result.
    key = "l1/s1"
    assert event_id_for(key, "TAKEN", taken_frame.meta["trigger_ts"]) == event_id_for(
        key, "TAKEN", next(f for f in errors if f.part_id == "TAKEN").meta["trigger_ts"])
    assert gate.triggers["recovered"] == 2
    for f in errors:
        gate.commit(f)
    for part in ("TAKEN", "DONE", "WAITING"):  # redelivered after the restart: duplicates
        gate.on_trigger(TriggerMessage(trig(part), dup=True))
    assert gate.triggers["duplicate"] == 3 and gate.expired_triggers() == [] and taken(gate, 2) == []
    assert gate.store.open_count() == 0


def test_a_trigger_that_cannot_be_stored_is_not_acknowledged_and_counts_nothing(tmp_path: Path) -> None:
    alarms = Alarms()
    path = tmp_path / "triggers.sqlite3"
    gate = FrameGate(cfg(), Metrics(), TriggerStore(path), on_alarm=alarms)
    gate.on_trigger(trig("P1", 1))
    gate.store.close()  # the database fails (a real sqlite3 error, as on a full disk)
    with pytest.raises(sqlite3.Error):  # the sink then leaves the trigger unacked: the broker keeps it
        gate.on_trigger(trig("P2", 2))
    assert alarms.raised(TRIGGER_STORE) and taken(gate, 1) == ["P1"] and taken(gate, 1) == []
    gate.store = TriggerStore(path)
    gate.on_trigger(TriggerMessage(trig("P2", 2, ts=time.time()), dup=True))  # the broker's redelivery
    assert taken(gate, 1) == ["P2"] and alarms.raised(TRIGGER_SEQUENCE) == []  # P2 was never half-counted
    assert alarms.calls[-1][:2] == (TRIGGER_STORE, False)


def test_a_corrupt_store_is_moved_aside_with_an_alarm_not_a_crash_loop(tmp_path: Path) -> None:
    path = tmp_path / "triggers.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a torn file after a power cut
    alarms = Alarms()
    gate = FrameGate(cfg(), Metrics(), TriggerStore(path), on_alarm=alarms)
    assert "moved aside" in alarms.raised(TRIGGER_STORE)[0]
    assert list(tmp_path.glob("triggers.sqlite3.corrupt-*"))
    gate.on_trigger(b"P1")  # works on the new store
    assert taken(gate, 1) == ["P1"] and alarms.calls[-1][:2] == (TRIGGER_STORE, True)  # stays raised


def test_overflowed_triggers_each_get_an_error_with_bounded_memory() -> None:
    gate = FrameGate(cfg(trigger_max_pending=2), Metrics())
    n = 2000
    for i in range(n):
        gate.on_trigger(f"P{i}".encode())
    assert len(gate._pending) == 2 and not hasattr(gate, "_rejected")  # nothing else held in memory
    seen: list[str] = []
    for _ in range(n):  # the capture loop's turns: a batch each
        batch = gate.expired_triggers()
        assert len(batch) <= 32
        seen += [f.part_id for f in batch]
        if not batch:
            break
    assert sorted(seen) == sorted(f"P{i}" for i in range(2, n)) and len(seen) == len(set(seen))
    assert gate.triggers["overflow"] == n - 2
    assert all(f.error_kind == "no_frame" for f in gate.flush("stop")) and gate.expired_triggers() == []


# -- MQTT: persistent session, manual ack --------------------------------------------------------------
@pytest.fixture
def proxied(tmp_path: Path) -> Any:
    broker = Broker(tmp_path / "broker").start()
    proxy = TcpProxy(broker.port).start()
    try:
        yield broker, proxy
    finally:
        proxy.close()
        broker.kill()


def test_sink_resumes_its_session_and_acks_a_trigger_only_once_it_is_taken(proxied: Any, tmp_path: Path) -> None:
    broker, proxy = proxied
    got: list[TriggerMessage] = []
    fail_first = [True]

    def on_trigger(t: TriggerMessage) -> None:
        if fail_first[0]:
            fail_first[0] = False
            raise OSError("disk full")  # not stored: must not be acked
        got.append(t)

    settings = MqttSettings(MqttConfig(host="127.0.0.1", port=proxy.port, keepalive=5, reconnect_min_s=0.1,
                                       reconnect_max_s=0.3, session_expiry_s=600), client_id="edge-l1-s1")
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = MqttSink(settings, outbox, BASE, {"station": "s1"}, on_trigger=on_trigger)
    plc = Subscriber(broker, [f"{BASE}/status"])
    sink.start()
    try:
        assert plc.wait_for(lambda ms: any(b'"online"' in m.payload for m in ms), 10)
        time.sleep(0.2)
        plc.publish(f"{BASE}/trigger", trig("UNSTORED"))
        time.sleep(0.5)
        assert got == []
        proxy.set_mode("cut")
        plc.publish(f"{BASE}/trigger", trig("WHILE-AWAY"))  # queued by the broker in the station's session
        time.sleep(0.5)
        proxy.set_mode("pass")
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        parts = {parse_trigger_fields(t.payload).part_id: t for t in got}
        assert set(parts) == {"UNSTORED", "WHILE-AWAY"}, got
        assert parts["UNSTORED"].dup  # the broker's redelivery of what we did not ack
        assert all(t.resumed_s is not None and t.resumed_s < RESUME_GRACE_S for t in got)
        proxy.set_mode("cut")
        proxy.set_mode("pass")
        time.sleep(1.5)  # acked now: nothing is redelivered after another reconnect
        assert len(got) == 2
    finally:
        sink.stop(drain_timeout=1)
        plc.close()
        outbox.close()


# -- a network camera's buffered frames ------------------------------------------------------------------
@pytest.mark.skipif(not Path(FFMPEG).exists(), reason="ffmpeg is not installed (scripts/setup.sh)")
def test_frames_from_the_stream_buffer_are_marked_and_never_given_to_a_trigger(tmp_path: Path) -> None:
    """FFmpeg hands over what it buffered while probing in one burst at open: those frames were
    exposed before they were grabbed, so a trigger that came in between must not get one."""
    cam = NetCamera(tmp_path).start()
    src = CameraSource(CameraSourceConfig(type="camera", uri=cam.uri, backend="ffmpeg", open_timeout_s=5,
                                          read_timeout_s=5))
    gate = FrameGate(cfg(), Metrics())
    frames: list[tuple[float, Frame]] = []
    try:
        gate.on_trigger(b"P1")  # waiting before the stream opens
        src.open()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            f = src.read(1.0)
            if f is not None and f.error is None:
                frames.append((f.mono_ts - t0, f))
                gate.admit(f)  # renames the frame that P1 takes
    finally:
        src.close()
        cam.close()
    assert frames and frames[0][1].meta.get("buffered"), "the first frame after an open comes from the buffer"
    first_for_p1 = next(f for _, f in frames if f.part_id == "P1")
    assert not first_for_p1.meta.get("buffered")
    late = [f for t, f in frames if t > frames[0][0] + 1.5]
    assert late and not any(f.meta.get("buffered") for f in late), "caught up: the stream is live"


def test_stream_clock_backdates_a_backlog_by_stream_time() -> None:
    clock, t = _StreamClock(), 100.0
    # at open: 10 frames of 40 ms stream time in one burst, then live at 25 fps
    ages = [clock.age(t + i * 0.001, i * 0.04) for i in range(10)]
    assert ages == [None] * 10  # the probe buffer: no estimate, never given to a trigger
    t += 0.4
    ages = [clock.age(t + i * 0.04, 0.4 + i * 0.04) for i in range(10)]
    assert ages[0] == 0.0 and all(a is not None and abs(a) < 1e-6 for a in ages)
    # the reader stalls 1 s, then drains the socket: the drained frames are up to 1 s older than their grab
    t, st = t + 0.4 + 1.0, 0.8  # frame 0.8 s of stream time was due at t + 0.4
    drained = [clock.age(t + i * 0.001, st + i * 0.04) for i in range(25)]
    assert drained[0] == pytest.approx(1.0, abs=0.01) and drained[-1] == pytest.approx(1.0 - 24 * 0.039, abs=0.01)
    assert clock.age(t + 10.0, st + 20.0) is None  # a jump in stream time: a new stream, a new burst
