"""Triggered mode against a real network camera (ffmpeg serving MPEG-TS over TCP), a real Mosquitto,
the real daemon and a PLC simulator that misbehaves the way lines do: it resends triggers, keeps
sending while the station's broker link is cut, leaves a retained trigger on the broker, skips a
sequence number, reuses one for another part, the daemon is SIGKILLed and restarted in the middle, and
the PLC itself is power-cycled at the end (a dead connection, its counter starting again at 1).

The promise under test: every part id the PLC announced gets exactly one result (one event id;
a redelivery of the same event is allowed), never a result for a retained trigger or a second one
for a duplicate, and every non-error result is of a frame captured after its trigger was sent.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.broker import Broker
from tests.daemon_proc import Daemon, station, write_config
from tests.faults.harness import BASE, PersistentSubscriber, check, tally
from tests.faults.netcam import FFMPEG, NetCamera
from tests.faults.tcp_proxy import TcpProxy

pytestmark = pytest.mark.skipif(not Path(FFMPEG).exists(), reason="ffmpeg is not installed (scripts/setup.sh)")


class Plc:
    """A PLC gateway: QoS 1 triggers {"part_id", "seq", "ts"} straight to the broker (never cut)."""

    def __init__(self, broker: Broker) -> None:
        self.sent: dict[str, float] = {}  # part id -> wall time of its first trigger
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plc-sim", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def trigger(self, part_id: str, seq: int | None = None, *, payload: bytes | None = None,
                retain: bool = False) -> bytes:
        ts = time.time()
        body = payload or json.dumps({"part_id": part_id, **({"seq": seq} if seq is not None else {}),
                                      "ts": round(ts, 6)}).encode()
        self.client.publish(f"{BASE}/trigger", body, qos=1, retain=retain).wait_for_publish(5)
        self.sent.setdefault(part_id, ts)
        return body

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def die(self) -> None:
        """The PLC loses power: no DISCONNECT, its TCP connection just ends."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def error_class(message: str) -> str:
    """Why a part got `error`, in a word, for the report."""
    for key, words in (("late", "after the PLC sent it"), ("restarted", "station restarted"),
                       ("sequence", "sequence went back"), ("no_frame", "no frame within")):
        if words in message:
            return key
    return message[:60]


def wait_online(sub: PersistentSubscriber, after: float, timeout: float) -> bool:
    """The daemon's retained birth message, received after `after` (monotonic)."""
    return sub.wait_for(lambda: any(s.get("state") == "online" and s["_t"] >= after for s in sub.on("/status")),
                        timeout)


def test_triggered_parts_get_exactly_one_result(tmp_path: Path, tiny_package: Path, report: Any) -> None:  # noqa: C901, PLR0915 - one end-to-end scenario with its checks in order
    broker = Broker(tmp_path / "broker").start()
    proxy = TcpProxy(broker.port).start()  # between the daemon and the broker only
    cam = NetCamera(tmp_path).start()
    sub = PersistentSubscriber(broker.host, broker.port)
    plc = Plc(broker)
    # Only fields the old code knows as well: the new ones keep their defaults, so this test also
    # runs (and fails) against the code before the fix.
    data = station(tmp_path, tiny_package, broker,
                   {"type": "camera", "uri": cam.uri, "backend": "ffmpeg", "stall_timeout_s": 5.0,
                    "open_timeout_s": 5.0, "read_timeout_s": 5.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                   pipeline={"mode": "triggered", "trigger_timeout_s": 5.0},
                   mqtt={"port": proxy.port, "keepalive": 5}, evidence={"enabled": False},
                   metrics={"enabled": False, "stats_interval_s": 1.0})
    config = write_config(tmp_path / "station.yaml", data)
    log = tmp_path / "daemon.log"
    plc.trigger("RETAINED-1", payload=b'{"part_id": "RETAINED-1"}', retain=True)  # left on the broker
    d = Daemon(config, log)
    seq = 0
    resent: list[str] = []
    skipped_seq = 0

    def part(i: int, gap: float = 0.2) -> None:
        nonlocal seq
        seq += 1
        plc.trigger(f"P{i:03d}", seq)
        time.sleep(gap)

    try:
        assert wait_online(sub, 0.0, 60), d.text()
        time.sleep(1.5)  # the camera stream is up
        for i in range(1, 11):
            part(i)
            if i == 4:  # an exact resend of the same message (a PLC retry after a lost PUBACK)
                plc.trigger("P004", payload=json.dumps({"part_id": "P004", "seq": seq, "ts": plc.sent["P004"]}).encode())
                resent.append("P004")
        plc.trigger("P007", 7)  # a late resend with a new time stamp (a PLC that timed out waiting)
        resent.append("P007")
        proxy.set_mode("cut")  # the station's broker link is down; the PLC goes on
        for i in range(11, 21):
            part(i, gap=0.3)
        proxy.set_mode("pass")
        for i in range(21, 31):
            if i == 25:  # the PLC's trigger for seq 25 never reaches the broker: a gap
                seq += 1
                skipped_seq = seq
                continue
            part(i, gap=0.2 if i < 28 else 0.0)
        time.sleep(0.02)
        d.kill()  # SIGKILL right after three quick triggers: stored, in inference or in the outbox
        d.wait(10)
        t_killed = time.monotonic()
        for i in range(31, 36):  # the station is down: the broker queues these in its session
            part(i)
        d = Daemon(config, log)
        assert wait_online(sub, t_killed, 60), d.text()
        plc.trigger("P030", payload=json.dumps({"part_id": "P030", "seq": 30, "ts": time.time()}).encode())
        resent.append("P030")  # a resend across the restart: still a duplicate
        time.sleep(1.0)
        for i in range(36, 51):
            part(i)
            if i == 40:  # seq 40 again for another part id: the order cannot be trusted, no guess
                plc.trigger("X040", seq)
        reused = "X040"
        plc.die()  # the PLC is power-cycled: a new connection, and its counter starts again at 1
        sent_before = plc.sent
        plc = Plc(broker)
        plc.sent = sent_before
        for i, s in zip(range(51, 56), range(1, 6), strict=True):
            plc.trigger(f"P{i:03d}", s)
            time.sleep(0.2)
        sent = set(plc.sent) - {"RETAINED-1"}
        ok = sub.wait_parts(sent, 60)
        time.sleep(1.5)  # a second result for a duplicate would show now
        assert d.proc.poll() is None, d.text()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.text()
    finally:
        d.kill()
        plc.close()
        sub.close()
        cam.close()
        proxy.close()
        broker.kill()
    results = sub.results()
    by_part: dict[str, set[str]] = defaultdict(set)
    for e in results:
        by_part[e["part_id"]].add(e["event_id"])
    verdicts = Counter(e["verdict"] for e in results)
    errors = Counter(error_class(e["error"]) for e in results if e["verdict"] == "error")
    early = [e["part_id"] for e in results if e["verdict"] != "error" and e["part_id"] in plc.sent
             and e["capture_ts"] < plc.sent[e["part_id"]]]
    seq_alarms = [a["message"] for a in sub.alarms("trigger_sequence", "raised")]
    entry = tally("triggered: network camera, resends, link cut, retained, seq gap + repeat, daemon SIGKILL, PLC restart", sent, results,
                  parts_sent=len(sent),
                  parts_with_several_results=sum(len(v) > 1 for k, v in by_part.items() if k in sent),
                  retained_results=len(by_part.get("RETAINED-1", ())), early_frames=len(early),
                  verdicts=dict(verdicts), errors=dict(errors), sequence_alarms=len(seq_alarms),
                  camera_connections=cam.served)
    report(entry)
    log_text = log.read_text(errors="replace")
    assert ok, f"{entry}\n{log_text[-4000:]}"
    check(entry)
    assert entry["parts_with_several_results"] == 0, f"{entry}\n{sorted((k, len(v)) for k, v in by_part.items())}"
    assert not by_part.get("RETAINED-1"), "a retained trigger became a part"
    assert not early, f"results from frames captured before their trigger: {early}"
    assert any(f"gap: expected {skipped_seq}, received {skipped_seq + 1}" in m for m in seq_alarms), seq_alarms
    assert any(f"went back: expected 41, received 40 for part {reused}" in m for m in seq_alarms), seq_alarms
    assert [e["verdict"] for e in results if e["part_id"] == reused] == ["error"]
    assert any("restarted at 1 (was 50) with part P051" in m for m in seq_alarms), seq_alarms
    assert all(e["verdict"] == "pass" for e in results if e["part_id"] in {f"P{i:03d}" for i in range(51, 56)}), \
        "a PLC restart must not cost its parts"
    assert verdicts["pass"] >= len(sent) // 2, entry  # most parts were inspected, not just errored out
    for part_id in resent:
        assert len(by_part[part_id]) == 1, part_id

