"""The end-to-end delivery promise (docs/deploy.md) with the SHIPPED broker config.

Mosquitto runs deploy/mosquitto/mosquitto.conf and deploy/mosquitto/acl.example, rewritten only
where a test must (listener port, file paths, log file): TLS, passwords, ACL, persistence, autosave,
queue and size limits are the shipped ones. The station is the real daemon (`python -m edge run`)
logging in as its "<line>/<station>" user over TLS; the consumer is a real paho client with a
persistent session (fixed client id, clean_start=false, session expiry), as docs/deploy.md asks
of MES and historians.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import MqttConfig
from edge.mqtt import MqttSettings, MqttSink
from edge.outbox import Outbox
from tests.broker import MOSQUITTO, MOSQUITTO_PASSWD, Broker, Subscriber, free_port
from tests.daemon_proc import Daemon, alarms, station, wait_results, write_config
from tests.deploy.test_mqtt_tls import _ca, _leaf, _listening, _wait
from tests.faults.harness import check, tally
from tests.faults.test_faults import outbox_rows, stop_daemon, synthetic_ids

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "deploy" / "mosquitto" / "acl.example"
BASE = "inspection/l1/s1"
USERS = {"l1/s1": "station-pw", "dashboard": "dash-pw"}  # acl.example: station user = "<line>/<station>"

pytestmark = pytest.mark.skipif(
    not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists() and shutil.which("openssl")),
    reason="needs mosquitto, mosquitto_passwd and openssl",
)


def shipped_conf(text: str, *, port: int, workdir: Path, pki: Path) -> str:
    """The shipped mosquitto.conf with only the listener port and file locations rewritten."""
    paths = {"password_file": workdir / "passwd", "acl_file": workdir / "acl", "cafile": pki / "ca.crt",
             "certfile": pki / "server.crt", "keyfile": pki / "server.key"}
    out = []
    for line in text.splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key in paths:
            line = f"{key} {paths[key]}"
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        elif key == "log_dest":
            line = f"log_dest file {workdir / 'mosquitto.log'}"
        out.append(line)
    if os.geteuid() == 0:
        out.append("user root")  # mosquitto would drop to 'mosquitto', which cannot read the tmp dir
    return "\n".join(out) + "\n"


class ShippedBroker:
    """deploy/mosquitto/mosquitto.conf + acl.example on a fixed free port; SIGKILL and restart keep both."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        self.dir, self.port = workdir, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        passwd = workdir / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
        subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwd)], check=True, capture_output=True)
        shutil.copy(ACL, workdir / "acl")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(shipped_conf(CONF.read_text(), port=self.port, workdir=workdir, pki=pki))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ShippedBroker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        assert _wait(lambda: self.proc is not None and self.proc.poll() is None and _listening(self.port), 15), \
            self.log_text()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        log = self.dir / "mosquitto.log"
        return log.read_text(errors="replace") if log.exists() else ""


class Consumer:
    """An MES-style consumer as docs/deploy.md asks for: TLS, its own user, fixed client id,
    clean_start=false with a session expiry, QoS 1 subscriptions. Records every message."""

    def __init__(self, port: int, pki: Path, topics: list[str], client_id: str, session_expiry: int = 3600) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.port, self.topics, self.client_id, self.expiry = port, topics, client_id, session_expiry
        self.ca = pki / "ca.crt"
        self.client: mqtt.Client | None = None

    def connect(self) -> Consumer:
        subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set("dashboard", USERS["dashboard"])
        c.tls_set(ca_certs=str(self.ca), cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        c.on_connect = lambda cl, *a: cl.subscribe([(t, 1) for t in self.topics])
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.expiry
        c.connect_async("localhost", self.port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        assert subscribed.wait(15), "consumer could not subscribe"
        return self

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def disconnect(self) -> None:
        """Go offline: a clean DISCONNECT keeps the session (expiry > 0), so the broker queues for us."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def part_ids(self) -> set[str]:
        return {e["part_id"] for e in self.on("/result")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _leaf(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    return d


def tls_station(tmp_path: Path, pkg: Path, port: int, pki: Path, source: dict[str, Any], **sections: Any) -> Path:
    pw = tmp_path / "station.mqtt-password"
    pw.write_text(USERS["l1/s1"] + "\n")
    data = station(tmp_path, pkg, None, source, evidence={"enabled": False}, **sections)
    data["mqtt"].update(host="localhost", port=port, username="l1/s1", password_file=str(pw),
                        tls_ca=str(pki / "ca.crt"), client_id="edge-l1-s1")
    return write_config(tmp_path / "station.yaml", data)


def test_shipped_broker_keeps_results_for_an_offline_consumer(tmp_path: Path, tiny_package: Path, pki: Path,
                                                              report: Any) -> None:
    """Consumer subscribes, goes offline; parts keep flowing; the broker is SIGKILLed and restarted
    while it is away; it comes back and must receive every result (duplicates only by event_id)."""
    count, fps, seed = 120, 15.0, 11
    broker = ShippedBroker(tmp_path / "broker", pki).start()
    consumer = Consumer(broker.port, pki, [f"{BASE}/result"], client_id="mes-historian").connect()
    cfg = tls_station(tmp_path, tiny_package, broker.port, pki,
                      {"type": "synthetic", "count": count, "fps": fps, "seed": seed, "stop_at_end": False})
    d = Daemon(cfg, tmp_path / "daemon.log")
    generated = synthetic_ids(count, seed)
    try:
        assert _wait(lambda: len(consumer.part_ids()) >= 5, 90), d.text()[-3000:] + broker.log_text()[-2000:]
        consumer.disconnect()
        t_off = time.monotonic()
        time.sleep(2.0)  # parts flow; the broker queues them for the offline session
        broker.kill()  # SIGKILL while the consumer is away: only what was saved survives
        time.sleep(1.0)
        broker.start()
        time.sleep(2.0)  # more parts, queued again
        offline_s = time.monotonic() - t_off
        consumer.connect()
        ok = _wait(lambda: generated <= consumer.part_ids(), 60 + count / fps)
        time.sleep(1.0)  # late duplicates would show now
        entry = tally("shipped broker: consumer offline + broker SIGKILL", generated, consumer.on("/result"),
                      consumer_offline_s=round(offline_s, 2))
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert stop_daemon(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        consumer.disconnect()
        broker.kill()
    check(entry)


def test_no_subscribers_keeps_results_until_a_consumer_subscribes(tmp_path: Path, tiny_package: Path, pki: Path,
                                                                  report: Any) -> None:
    """No consumer session for /result at all: PUBACK 0x10. Default no_subscribers=retry keeps every row
    in the outbox and raises `no_subscribers`; once a consumer subscribes, all arrive and it clears."""
    count, seed = 20, 5
    broker = ShippedBroker(tmp_path / "broker", pki).start()
    watcher = Consumer(broker.port, pki, [f"{BASE}/alarm", f"{BASE}/stats"], client_id="ops-watch").connect()
    cfg = tls_station(tmp_path, tiny_package, broker.port, pki,
                      {"type": "synthetic", "count": count, "fps": 20, "seed": seed, "stop_at_end": False},
                      metrics={"enabled": False, "stats_interval_s": 1.0})
    d = Daemon(cfg, tmp_path / "daemon.log")
    generated = synthetic_ids(count, seed)
    state = tmp_path / "state"
    consumer: Consumer | None = None
    try:
        raised = lambda: [a for a in watcher.on("/alarm") if a["alarm"] == "no_subscribers"]  # noqa: E731
        assert _wait(lambda: bool(raised()), 60), d.text()[-3000:]
        assert _wait(lambda: (state / "outbox.sqlite3").exists() and outbox_rows(state) == count, 60), \
            f"{outbox_rows(state)} of {count} rows kept\n{d.text()[-3000:]}"
        kept = outbox_rows(state)
        assert _wait(lambda: any(s["mqtt"].get("no_subscribers", 0) > 0 for s in watcher.on("/stats")), 30)
        consumer = Consumer(broker.port, pki, [f"{BASE}/result"], client_id="mes-late").connect()
        ok = _wait(lambda: generated <= consumer.part_ids(), 60)  # type: ignore[union-attr]
        cleared = _wait(lambda: any(a["state"] == "cleared" for a in raised()), 30)
        entry = tally("no consumer session: PUBACK 0x10 kept and retried", generated, consumer.on("/result"),
                      kept_in_outbox=kept)
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert cleared, [a for a in watcher.on("/alarm")]
        assert _wait(lambda: outbox_rows(state) == 0, 30)
        assert stop_daemon(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        watcher.disconnect()
        if consumer is not None:
            consumer.disconnect()
        broker.kill()
    check(entry)


def test_mqtt_311_warns_loudly_at_start(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    """Under MQTT 3.1.1 a PUBACK cannot say "denied" or "nobody subscribed": error log + alarm, once."""
    sub = Subscriber(broker, [f"{BASE}/alarm", f"{BASE}/result"])
    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "count": 3, "fps": 10, "stop_at_end": False},
                   mqtt={"protocol": "3.1.1"}, evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    try:
        wait_results(sub, 3, 60)
        assert sub.wait_for(lambda ms: any(a["alarm"] == "mqtt_unverified_acks" and a["state"] == "raised"
                                           for a in alarms(sub)), 10), d.text()
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
    errors = [line for line in d.text().splitlines() if "ERROR" in line and "3.1.1" in line]
    assert len(errors) == 1, d.text()


@pytest.mark.parametrize("mode", ["retry", "deliver"])
def test_puback_0x10_follows_the_config_choice(mode: str, tmp_path: Path, broker: Broker) -> None:
    """The sink alone against a real broker with nobody subscribed: 0x10 is kept (retry) or acked (deliver)."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    raised: list[tuple[str, bool, str]] = []
    settings = MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.3,
                          no_subscribers=mode)
    sink = MqttSink(MqttSettings(settings, client_id=f"t-{mode}"), outbox, BASE, {},
                    on_alarm=lambda *a: raised.append(a))
    sink.start()
    try:
        outbox.add("ev-1", f"{BASE}/result", b'{"event_id": "ev-1"}')
        sink.notify_new()
        assert _wait(lambda: sink.counters()["no_subscribers"] >= (2 if mode == "retry" else 1), 15)
        if mode == "retry":
            assert outbox.count() == 1 and ("no_subscribers", True) in [(n, a) for n, a, _ in raised]
            sub = Subscriber(broker, [f"{BASE}/result"])
            try:
                assert _wait(lambda: outbox.count() == 0, 15)
                assert sub.wait_for(lambda ms: len(ms) == 1, 5)
            finally:
                sub.close()
            assert _wait(lambda: ("no_subscribers", False) in [(n, a) for n, a, _ in raised], 5)
        else:
            assert _wait(lambda: outbox.count() == 0, 5) and not raised
    finally:
        sink.stop(drain_timeout=0)
        outbox.close()


def test_queue_overflow_is_visible_to_monitoring(tmp_path: Path) -> None:
    """What docs/deploy.md says to alarm on when a consumer's queue overflows: Mosquitto drops silently
    for the publisher, but logs it and counts it in $SYS/broker/publish/messages/dropped."""
    b = Broker(tmp_path / "broker", persistence=True, extra=("max_queued_messages 5", "sys_interval 1")).start()
    try:
        away = Subscriber(b, [f"{BASE}/result"], client_id="mes-away", session_expiry=3600)
        away.close()  # offline with a persistent session: the broker queues for it, up to 5
        pub = Subscriber(b, ["$SYS/broker/publish/messages/dropped"])
        for i in range(20):
            pub.publish(f"{BASE}/result", json.dumps({"i": i}))  # every PUBACK is a success
        assert pub.wait_for(lambda ms: any(int(m.payload) >= 10 for m in ms), 15), pub.messages
        pub.close()
        assert "Outgoing messages are being dropped for client mes-away" in b.log_text()
    finally:
        b.kill()
