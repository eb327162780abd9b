"""A real Mosquitto broker per test, plus a collecting subscriber.

Tests talk to a real broker process (not a mock) so reconnects, PUBACK reason codes, retained
messages and Last Wills behave exactly as in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """`mosquitto -c <generated conf>` on a free localhost port; stop/kill/restart keep the port."""

    def __init__(self, workdir: Path, *, acl: str | None = None, passwords: dict[str, str] | None = None,
                 allow_anonymous: bool = True, persistence: bool = False, extra: Iterable[str] = ()) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.acl_file = self.dir / "acl" if acl is not None else None
        self.password_file = self.dir / "passwd" if passwords is not None else None
        if acl is not None:
            self.write_acl(acl)
        if passwords is not None:
            self.write_passwords(passwords)
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'true' if allow_anonymous else 'false'}",
                 f"persistence {'true' if persistence else 'false'}", f"persistence_location {self.dir}/",
                 f"log_dest file {self.log}", "log_type all"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to 'mosquitto' and cannot read our tmp dir
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        lines += list(extra)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def write_acl(self, text: str) -> None:
        assert self.acl_file is not None, "Broker was created without acl="
        self.acl_file.write_text(text.strip() + "\n")

    def write_passwords(self, users: dict[str, str]) -> None:
        """Plain user:password lines hashed in place by mosquitto_passwd -U."""
        assert self.password_file is not None, "Broker was created without passwords="
        self.password_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
        subprocess.run([MOSQUITTO_PASSWD, "-U", str(self.password_file)], check=True, capture_output=True)

    def start(self, timeout: float = 10.0) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port}\n{self.log_text()}")

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, kill: bool = False) -> Broker:
        (self.kill if kill else self.stop)()
        return self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads acl_file and password_file."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()


class Subscriber:
    """A real paho client that records every message it receives (thread-safe)."""

    def __init__(self, broker: Broker, topics: Iterable[str] = ("#",), *, username: str | None = None,
                 password: str | None = None, client_id: str = "", session_expiry: int = 0) -> None:
        """`session_expiry` > 0: a persistent session (clean_start=False), so a broker with persistence
        keeps queued messages for this subscriber across its own SIGKILL."""
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._topics = list(topics)
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{id(self):x}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        props = None
        if session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        self.client.connect_async(broker.host, broker.port, keepalive=10, clean_start=not session_expiry,
                                  properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.close()
            raise TimeoutError("subscriber could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if not getattr(rc, "is_failure", False):
            client.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object) -> None:
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object,
                       props: object) -> None:
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        up = tuple(getattr(msg.properties, "UserProperty", None) or ())
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), up))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> bool:
        """Wait until predicate(all messages so far) is true; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
