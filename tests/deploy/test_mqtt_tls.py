"""The plant broker example (deploy/mosquitto/) with TLS, passwords and the ACL, against edge.mqtt.

A real Mosquitto runs deploy/mosquitto/mosquitto.conf with only paths and ports rewritten, and a
PKI made here with the openssl CLI: a CA, a server certificate for localhost (DNS:localhost,
IP:127.0.0.1), one for another host name, an unrelated CA and a client certificate. The station
side is the daemon's own MqttSink, so these tests check what runs on the line: it delivers with
the right CA and password, and it refuses (never silently downgrades) everything else.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge.config import MqttConfig
from edge.mqtt import MqttSettings, MqttSink
from edge.outbox import Outbox
from tests.broker import MOSQUITTO, MOSQUITTO_PASSWD, free_port

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "deploy" / "mosquitto" / "acl.example"

pytestmark = pytest.mark.skipif(
    not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists() and shutil.which("openssl")),
    reason="needs mosquitto, mosquitto_passwd and openssl",
)

STATION, OTHER = "line1/station3", "line1/station4"  # user names = "<line>/<station>" (acl.example)
USERS = {STATION: "s3-secret", OTHER: "s4-secret", "dashboard": "dash-secret", "plc-line1": "plc-secret"}
BASE = "inspection/" + STATION
REFUSAL_WAIT = 2.0  # long enough for several reconnect attempts at reconnect_min=0.2


# --- PKI -------------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _leaf(d: Path, name: str, cn: str, ext: str, ca: str = "ca") -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "wrongca")
    _leaf(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(d, "elsewhere", "broker.elsewhere.invalid",
          "subjectAltName=DNS:broker.elsewhere.invalid\nextendedKeyUsage=serverAuth")
    _leaf(d, "client", "line1-station3", "extendedKeyUsage=clientAuth")
    return d


# --- broker running the example config ------------------------------------------------------------

class TlsBroker:
    """deploy/mosquitto/mosquitto.conf with paths and ports rewritten; also opens its optional
    localhost plaintext listener so the no-downgrade test has a plaintext port to try."""

    def __init__(self, workdir: Path, pki: Path, cert: str = "server", require_certificate: bool = False) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port = free_port(), free_port()
        self.log = self.dir / "mosquitto.log"
        passwd = self.dir / "passwd"
        for i, (user, password) in enumerate(USERS.items()):
            subprocess.run([MOSQUITTO_PASSWD, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                           check=True, capture_output=True)
        shutil.copy(ACL, self.dir / "acl")
        replace = {
            "password_file": str(passwd), "acl_file": str(self.dir / "acl"),
            "listener": f"{self.tls_port} 127.0.0.1", "#listener": f"{self.plain_port} 127.0.0.1",
            "cafile": str(pki / "ca.crt"), "certfile": str(pki / f"{cert}.crt"), "keyfile": str(pki / f"{cert}.key"),
            "require_certificate": "true" if require_certificate else "false",
            "persistence": "false", "persistence_location": f"{self.dir}/", "log_dest": f"file {self.log}",
        }
        out, plain_section = [], False
        for line in CONF.read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key == "#listener":
                plain_section = True
            if key in replace:
                line = f"{key.lstrip('#')} {replace[key]}"
            elif plain_section and key == "#protocol":
                line = line.lstrip("#")
            out.append(line)
        if os.geteuid() == 0:
            out.append("user root")  # mosquitto would drop to 'mosquitto', which cannot read the tmp dir
        out.append("log_type all")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(out) + "\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        if not _wait(lambda: self.proc.poll() is None and _listening(self.tls_port) and _listening(self.plain_port),
                     10):
            self.stop()
            raise RuntimeError(f"mosquitto did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    b = TlsBroker(tmp_path_factory.mktemp("broker"), pki)
    yield b
    b.stop()


# --- helpers ---------------------------------------------------------------------------------------

def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


class Station:
    """The daemon's MqttSink with its own outbox, as a station would run it."""

    def __init__(self, tmp: Path, port: int, *, user: str = STATION, password: str | None = None,
                 tls_ca: Path | None = None, host: str = "localhost", base: str = BASE,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.alarms: list[tuple[str, bool, str]] = []
        self.triggers: list[bytes] = []
        self.outbox = Outbox(tmp / f"outbox-{port}-{time.monotonic_ns()}.sqlite3")
        settings = MqttSettings(
            MqttConfig(host=host, port=port, username=user, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                       reconnect_min_s=0.2, reconnect_max_s=0.5),
            client_id=f"test-{user.replace('/', '-')}-{time.monotonic_ns()}",
            password=USERS.get(user) if password is None else password,
        )
        self.sink = MqttSink(settings, self.outbox, base, {"station": base.rsplit("/", 1)[-1], "line": "line1"},
                             on_alarm=lambda *a: self.alarms.append(a), on_trigger=lambda t: self.triggers.append(t.payload))

    def send(self, event_id: str, topic: str = f"{BASE}/result") -> None:
        self.outbox.add(event_id, topic, f'{{"event_id": "{event_id}"}}'.encode())
        self.sink.notify_new()

    def __enter__(self) -> Station:
        self.sink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop(drain_timeout=0)
        self.outbox.close()


class Reader:
    """A dashboard-style paho client over TLS that records what it receives."""

    def __init__(self, port: int, ca: Path, user: str, topic: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"reader-{time.monotonic_ns()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(user, USERS[user])
        self.client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1) if topic else self.ready.set()
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect("localhost", port, keepalive=10)
        self.client.loop_start()
        assert self.ready.wait(10), "reader could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _assert_refused(station: Station) -> None:
    time.sleep(REFUSAL_WAIT)
    assert not station.sink.connected
    assert station.outbox.count() == 1, "the event must stay in the outbox"


# --- tests -----------------------------------------------------------------------------------------

def test_delivers_with_right_ca_and_password(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    reader = Reader(broker.tls_port, pki / "ca.crt", "dashboard", "inspection/#")
    try:
        with Station(tmp_path, broker.tls_port, tls_ca=pki / "ca.crt") as st:
            st.send("ev-ok")
            assert _wait(lambda: st.outbox.count() == 0, 10), broker.log_text()[-2000:]
            assert _wait(lambda: any(t == f"{BASE}/result" and b"ev-ok" in p for t, p in reader.messages), 5)
            assert any(t == f"{BASE}/status" for t, _ in reader.messages)  # birth message allowed by the ACL
    finally:
        reader.close()


def test_refuses_wrong_ca(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    with Station(tmp_path, broker.tls_port, tls_ca=pki / "wrongca.crt") as st:
        st.send("ev-wrong-ca")
        _assert_refused(st)


def test_refuses_host_name_mismatch(pki: Path, tmp_path: Path) -> None:
    b = TlsBroker(tmp_path / "elsewhere", pki, cert="elsewhere")  # valid chain, issued for another name
    try:
        with Station(tmp_path, b.tls_port, tls_ca=pki / "ca.crt") as st:
            st.send("ev-mismatch")
            _assert_refused(st)
    finally:
        b.stop()


def test_refuses_wrong_password(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    with Station(tmp_path, broker.tls_port, tls_ca=pki / "ca.crt", password="not-the-password") as st:
        st.send("ev-bad-pw")
        _assert_refused(st)


def test_never_falls_back_to_plaintext(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    # tls_ca set but pointed at the plaintext listener: the TLS handshake fails, nothing is sent.
    with Station(tmp_path, broker.plain_port, tls_ca=pki / "ca.crt") as st:
        st.send("ev-plain")
        _assert_refused(st)
    assert "ev-plain" not in broker.log_text()
    assert f"as {st.sink.settings.client_id}" not in broker.log_text()  # no MQTT session was ever opened


def test_mutual_tls_needs_client_certificate(pki: Path, tmp_path: Path) -> None:
    b = TlsBroker(tmp_path / "mtls", pki, require_certificate=True)
    try:
        with Station(tmp_path, b.tls_port, tls_ca=pki / "ca.crt") as st:
            st.send("ev-no-cert")
            _assert_refused(st)
        with Station(tmp_path, b.tls_port, tls_ca=pki / "ca.crt", tls_cert=pki / "client.crt",
                     tls_key=pki / "client.key") as st:
            st.send("ev-cert")
            # The broker took it (PUBACK); with no consumer session here that is 0x10, kept for retry.
            assert _wait(lambda: st.sink.counters()["no_subscribers"] >= 1, 10), b.log_text()[-2000:]
    finally:
        b.stop()


def test_acl_keeps_a_station_to_its_own_topics(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    other = "inspection/" + OTHER
    reader = Reader(broker.tls_port, pki / "ca.crt", "dashboard", "inspection/#")
    plc = Reader(broker.tls_port, pki / "ca.crt", "plc-line1")
    try:
        with Station(tmp_path, broker.tls_port, tls_ca=pki / "ca.crt") as st:
            st.send("ev-spoof", topic=f"{other}/result")  # posing as station4
            st.send("ev-own")
            assert _wait(lambda: st.sink.counters()["rejected"] >= 1, 10), broker.log_text()[-2000:]
            assert _wait(lambda: st.outbox.count() == 1, 10)  # own event acked, spoofed one kept
            assert [r.event_id for r in st.outbox.pending()] == ["ev-spoof"]
            assert ("publish_rejected", True) in [(n, active) for n, active, _ in st.alarms]
            # The line's PLC gateway may trigger this station; the station receives it.
            plc.client.publish(f"{BASE}/trigger", b'{"part_id": "P-1"}', qos=1).wait_for_publish(5)
            assert _wait(lambda: st.triggers == [b'{"part_id": "P-1"}'], 5)
        time.sleep(0.3)
        assert not any(t.startswith(other) for t, _ in reader.messages)
        assert any(t == f"{BASE}/result" and b"ev-own" in p for t, p in reader.messages)
    finally:
        reader.close()
        plc.close()
