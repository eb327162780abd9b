"""MqttSink against a real Mosquitto: order, no loss across a broker crash, LWT, ACL rejection."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import MqttConfig
from edge.mqtt import MqttSettings, MqttSink
from edge.outbox import Outbox
from tests.broker import Broker, Received, Subscriber

pytestmark = pytest.mark.timeout(60)

BASE = "inspection/l1/s1"
RESULT, STATUS, ALARM, TRIGGER = f"{BASE}/result", f"{BASE}/status", f"{BASE}/alarm", f"{BASE}/trigger"
REPO = Path(__file__).resolve().parents[2]


def _settings(broker: Broker, password: str | None = None, **kw: Any) -> MqttSettings:
    kw.setdefault("reconnect_min_s", 0.1)
    kw.setdefault("reconnect_max_s", 0.5)
    return MqttSettings(MqttConfig(host=broker.host, port=broker.port, **kw), password=password)


def _add(ob: Outbox, n: int, start: int = 0) -> list[str]:
    ids = [f"ev-{i:05d}" for i in range(start, start + n)]
    for i, eid in enumerate(ids, start):
        assert ob.add(eid, RESULT, json.dumps({"event_id": eid, "n": i}).encode())
    return ids


def _ids(msgs: list[Received]) -> list[str]:
    return [json.loads(m.payload)["event_id"] for m in msgs if m.topic == RESULT]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db")
    yield ob
    ob.close()


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker)
    yield s
    s.close()


def test_delivers_in_order_and_empties_outbox(broker: Broker, sub: Subscriber, outbox: Outbox) -> None:
    ids = _add(outbox, 60)
    sink = MqttSink(_settings(broker, max_inflight=5), outbox, BASE, {"station": "s1", "model": "m1"})
    sink.start()
    try:
        assert sub.wait_for(lambda ms: len(_ids(ms)) >= 60)
        assert _ids(sub.messages) == ids  # no reconnect here, so exactly once and in order
        deadline = time.monotonic() + 5
        while outbox.count() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox.count() == 0
        c = sink.counters()
        assert c["acked"] == 60 and c["rejected"] == 0 and c["connected"] == 1
        first = sub.on(RESULT)[0]
        assert dict(first.user_properties)["event_id"] == ids[0]  # MQTT 5: id + send time as user properties
        assert "sent_ts" in dict(first.user_properties)
        birth = json.loads(sub.on(STATUS)[0].payload)
        assert birth["state"] == "online" and birth["model"] == "m1" and "ts" in birth

        sink.publish_alarm("camera_lost", True, "no frames", {"seconds": 2})
        sink.update_status({"station": "s1", "model": "m2"})
        sink.publish_stats({"parts": 60})
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/stats" for m in ms))
        assert sub.wait_for(lambda ms: any(json.loads(m.payload).get("model") == "m2"
                                           for m in ms if m.topic == STATUS))
        alarm = json.loads(sub.on(ALARM)[0].payload)
        assert alarm["alarm"] == "camera_lost" and alarm["state"] == "raised" and alarm["details"] == {"seconds": 2}

        # rows added while running are picked up after notify_new
        more = _add(outbox, 5, start=60)
        sink.notify_new()
        assert sub.wait_for(lambda ms: _ids(ms)[-5:] == more)
    finally:
        sink.stop(drain_timeout=5)
    assert outbox.count() == 0
    assert sub.wait_for(lambda ms: any(json.loads(m.payload).get("reason") == "shutdown"
                                       for m in ms if m.topic == STATUS))


def test_results_leave_without_nagle_delay_also_after_a_reconnect(broker: Broker, outbox: Outbox) -> None:
    """The sink's socket has TCP_NODELAY, on the first connection and on the one after a broker restart: with
    Nagle's algorithm a PUBLISH waited for the broker's delayed ACK of the one before (~40 ms)."""
    import socket

    sink = MqttSink(_settings(broker), outbox, BASE, {"station": "s1"})
    sink.start()
    try:
        for attempt in ("first", "after restart"):
            deadline = time.monotonic() + 10
            while not sink.connected and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sink.connected, attempt
            sock = sink._client.socket()  # the live paho socket: the only place the option can be read
            assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), attempt
            if attempt == "first":
                broker.kill()
                deadline = time.monotonic() + 10
                while sink.connected and time.monotonic() < deadline:
                    time.sleep(0.02)
                broker.start()
    finally:
        sink.stop(drain_timeout=2)


def test_mqtt311_delivers(broker: Broker, sub: Subscriber, outbox: Outbox) -> None:
    ids = _add(outbox, 10)
    sink = MqttSink(_settings(broker, protocol="3.1.1"), outbox, BASE, {"station": "s1"})
    sink.start()
    try:
        assert sub.wait_for(lambda ms: len(_ids(ms)) >= 10)
        assert _ids(sub.messages) == ids
    finally:
        sink.stop(drain_timeout=5)
    assert outbox.count() == 0


def test_broker_crash_loses_nothing(tmp_path: Path, outbox: Outbox) -> None:
    """Kill -9 the broker mid-stream, restart it: every event arrives, duplicates only as the same id,
    also those the dying broker had acknowledged but not saved (the sink replays recent PUBACKs)."""
    users = {"edge": "edge-pw", "sub": "sub-pw"}
    # A QoS 1 message the broker acknowledged is the broker's: with persistence saved on every change
    # and a persistent subscriber session, the broker's own SIGKILL does not lose it, so this test
    # measures the sink (resend of everything not acknowledged), not Mosquitto's memory.
    broker = Broker(tmp_path / "b", passwords=users, allow_anonymous=False, persistence=True,
                    extra=("autosave_interval 1", "autosave_on_changes true")).start()
    sub = Subscriber(broker, [RESULT], username="sub", password="sub-pw", client_id="crash-sub",
                     session_expiry=3600)
    sink = MqttSink(_settings(broker, username="edge", password="edge-pw", max_inflight=10), outbox, BASE,
                    {"station": "s1"})
    total, produced = 300, []
    stop_producing = threading.Event()

    def producer() -> None:
        for i in range(total):
            if stop_producing.is_set():
                return
            produced.extend(_add(outbox, 1, start=i))  # ~4 ms each: a real fsync
            sink.notify_new()

    prod = threading.Thread(target=producer)
    try:
        sink.start()
        prod.start()
        assert sub.wait_for(lambda ms: len(ms) >= 60)
        deadline = time.monotonic() + 5
        while sink.counters()["inflight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        broker.kill()  # mid-stream, with publishes in flight
        deadline = time.monotonic() + 5
        while sink.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sink.connected
        # Mosquitto PUBACKs before its autosave reaches the disk, so a SIGKILL can lose a result it
        # acknowledged; the sink put the last `replay_acked_s` of acknowledged rows back under their seq
        # Bring the broker back with only the subscriber allowed in, so it is listening again before
        # the sink can resend (a broker without persistence forgets subscriptions when killed).
        broker.write_passwords({"sub": "sub-pw"})
        broker.start()
        assert sub.subscribed.wait(10)
        time.sleep(0.3)
        assert not sink.connected  # CONNACK refused: not counted as connected
        broker.write_passwords(users)
        broker.reload()
        prod.join(timeout=30)
        expected = [f"ev-{i:05d}" for i in range(total)]
        assert sub.wait_for(lambda ms: set(_ids(ms)) >= set(expected), timeout=30), (
            f"missing {sorted(set(expected) - set(_ids(sub.messages)))[:10]}")
    finally:
        stop_producing.set()
        prod.join(timeout=10)
        sink.stop(drain_timeout=5)
        sub.close()
        broker.kill()
    got = _ids(sub.messages)
    assert set(got) == set(expected)
    by_id: dict[str, set[bytes]] = {}
    for m in sub.on(RESULT):
        by_id.setdefault(json.loads(m.payload)["event_id"], set()).add(m.payload)
    assert all(len(p) == 1 for p in by_id.values())  # a duplicate is the identical event
    assert list(dict.fromkeys(got)) == expected  # first deliveries are in order, replayed ones too
    assert outbox.count() == 0
    assert sink.counters()["reconnects"] >= 1


@pytest.mark.parametrize(("replay_s", "wait_s", "restored"), [(2.0, 0.0, True), (0.5, 1.0, False), (0.0, 0.0, False)])
def test_results_acknowledged_just_before_the_broker_died_go_back_into_the_outbox(
        tmp_path: Path, outbox: Outbox, replay_s: float, wait_s: float, restored: bool) -> None:
    """Mosquitto sends the PUBACK before it saves: a result acknowledged moments before a SIGKILL may be
    gone. After a lost connection the rows acknowledged within `replay_acked_s` are back under their
    own seq (resent first, in order); older ones, or all with 0, are not."""
    broker = Broker(tmp_path / "b").start()
    sub = Subscriber(broker, [RESULT])  # a consumer, so the broker acknowledges with success (not 0x10)
    sink = MqttSink(_settings(broker, replay_acked_s=replay_s), outbox, BASE, {"station": "s1"})
    try:
        ids = _add(outbox, 5)
        seqs = [r.seq for r in outbox.pending()]
        sink.start()
        deadline = time.monotonic() + 10
        while (outbox.count() or sink.counters()["acked"] < 5) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.count() == 0 and sink.counters()["acked"] == 5
        time.sleep(wait_s)
        broker.kill()
        deadline = time.monotonic() + 5
        while sink.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the sender thread handles the disconnect
        back = outbox.pending()
        if restored:
            assert [r.event_id for r in back] == ids and [r.seq for r in back] == seqs
        else:
            assert back == []
    finally:
        sink.stop(drain_timeout=0)
        sub.close()
        broker.kill()


_CHILD = """
import sys, time
from edge.config import MqttConfig
from edge.mqtt import MqttSettings, MqttSink
from edge.outbox import Outbox
sink = MqttSink(MqttSettings(MqttConfig(host="127.0.0.1", port=int(sys.argv[1]))), Outbox(sys.argv[2]),
                "inspection/l1/s1", {"station": "s1", "model": "m1"})
sink.start()
while not sink.connected:
    time.sleep(0.02)
print("ready", flush=True)
time.sleep(60)
"""


def test_birth_message_and_last_will(broker: Broker, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(broker.port), str(tmp_path / "child.db")],
                             stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        late = Subscriber(broker, [STATUS])  # joins after the birth: gets it retained
        assert late.wait_for(lambda ms: len(ms) >= 1)
        birth = late.messages[0]
        assert birth.retain and json.loads(birth.payload)["state"] == "online"
        child.send_signal(signal.SIGKILL)  # unclean death: the broker publishes the Last Will
        child.wait(5)
        assert late.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "offline" for m in ms))
        late.close()
        after = Subscriber(broker, [STATUS])
        assert after.wait_for(lambda ms: len(ms) >= 1)
        will = json.loads(after.messages[0].payload)
        assert after.messages[0].retain and will["state"] == "offline" and will["station"] == "s1"
        after.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_acl_denied_publish_raises_alarm_and_keeps_event(tmp_path: Path, outbox: Outbox) -> None:
    broker = Broker(tmp_path / "b", acl=f"topic read #\ntopic write {STATUS}\ntopic write {ALARM}\n").start()
    sub = Subscriber(broker, [RESULT])
    alarms: list[tuple[str, bool, str]] = []
    sink = MqttSink(_settings(broker, reconnect_min_s=0.2), outbox, BASE, {"station": "s1"},
                    on_alarm=lambda n, a, m: alarms.append((n, a, m)))
    _add(outbox, 1)
    try:
        sink.start()
        deadline = time.monotonic() + 10
        while not alarms and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alarms and alarms[0][:2] == ("publish_rejected", True)
        assert "Not authorized" in alarms[0][2] or "0x87" in alarms[0][2] or "135" in alarms[0][2]
        assert outbox.count() == 1 and sink.counters()["rejected"] >= 1 and sink.counters()["acked"] == 0
        assert sub.on(RESULT) == []
        # The operator fixes the ACL: the retry (with backoff) delivers, the alarm clears once.
        broker.write_acl("topic readwrite #")
        broker.reload()
        assert sub.wait_for(lambda ms: len(ms) >= 1, timeout=15)
        deadline = time.monotonic() + 5
        while (outbox.count() or len(alarms) < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox.count() == 0
        assert [(n, a) for n, a, _ in alarms] == [("publish_rejected", True), ("publish_rejected", False)]
    finally:
        sink.stop(drain_timeout=1)
        sub.close()
        broker.kill()


def test_trigger_reaches_on_trigger(broker: Broker, sub: Subscriber, outbox: Outbox) -> None:
    got: list[bytes] = []
    sink = MqttSink(_settings(broker), outbox, BASE, {"station": "s1"}, on_trigger=lambda t: got.append(t.payload))
    sink.start()
    try:
        assert sub.wait_for(lambda ms: any(m.topic == STATUS for m in ms))  # connected and subscribed
        time.sleep(0.1)
        sub.publish(TRIGGER, b'{"part_id": "P-1"}')
        sub.publish(f"{BASE}/other", b"ignored")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [b'{"part_id": "P-1"}']
    finally:
        sink.stop(drain_timeout=1)


def test_tls_never_falls_back_to_plaintext(broker: Broker, outbox: Outbox) -> None:
    ca = "/etc/ssl/certs/ca-certificates.crt"
    if not Path(ca).exists():
        pytest.skip("no system CA bundle")
    sink = MqttSink(_settings(broker, tls_ca=ca), outbox, BASE, {"station": "s1"})
    _add(outbox, 1)
    sink.start()
    try:
        time.sleep(1.0)
        assert not sink.connected and outbox.count() == 1
        assert "New client connected" not in broker.log_text()
    finally:
        sink.stop(drain_timeout=0)


def test_password_never_in_repr_or_logs(broker: Broker, outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(broker, username="edge", password="s3cr3t-pw")
    assert "s3cr3t-pw" not in repr(s)
    caplog.set_level(logging.DEBUG)
    sink = MqttSink(s, outbox, BASE, {"station": "s1"})
    sink.start()
    time.sleep(0.3)
    sink.stop(drain_timeout=0)
    assert "s3cr3t-pw" not in caplog.text
    with pytest.raises(ValueError):
        MqttConfig(protocol="4")
