"""Shared pieces of the fault suite and the pipeline benchmark: a persistent-session subscriber that
timestamps what it receives, a feeder that drips parts into a hot folder like a line does, the
ledger that turns "what was generated" and "what arrived" into the report figures, and faults
that need a little machinery (a full disk, a stalling camera).

Where messages can be lost that is NOT the daemon's fault, and how the suite rules it out:
a QoS 1 result the broker acknowledged is the broker's responsibility. If the broker dies before
handing it to the subscriber, a broker without persistence forgets it, and a subscriber with a
clean session would not get the copies queued while it was away. So the fault broker runs with
persistence saved on every change (`autosave_on_changes`), and the subscriber keeps a persistent
session (fixed client id, clean_start=False, session expiry 1 h): whatever the broker accepted is
delivered once both are back, and a missing part is a daemon (outbox) failure. The remaining
window - the broker killed between sending PUBACK and its next save or its write to the online
subscriber's socket - is microseconds wide on loopback and is reported, not hidden, if hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Broker
from tests.tiny_package import make_part

BASE = "inspection/l1/s1"
PERSISTENT_BROKER = ("autosave_interval 1", "autosave_on_changes true")


def persistent_broker(workdir: Path, **kwargs: Any) -> Broker:
    """A Mosquitto that saves its state on every change, so a SIGKILL keeps queued messages."""
    return Broker(workdir, persistence=True, extra=PERSISTENT_BROKER, **kwargs)


@dataclass(frozen=True)
class Msg:
    t: float  # time.monotonic() at receipt
    topic: str
    payload: bytes
    retain: bool


class PersistentSubscriber:
    """A real paho MQTT 5 client with a persistent session; records every message with its receipt time."""

    def __init__(self, host: str, port: int, topics: Iterable[str] = (f"{BASE}/#",), client_id: str = "",
                 session_expiry: int = 3600) -> None:
        self.messages: list[Msg] = []
        self._results: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._topics = list(topics)
        self.subscribed = threading.Event()
        self.connects = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"fault-sub-{os.getpid()}-{id(self):x}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_disconnect = lambda *a: self.subscribed.clear()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        self.client.connect_async(host, port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.close()
            raise TimeoutError("subscriber could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: Any, props: object) -> None:
        if not rc.is_failure:
            self.connects += 1
            client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        m = Msg(time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain))
        with self._cond:
            self.messages.append(m)
            if m.topic.endswith("/result"):
                event = json.loads(m.payload)
                event["_t"] = m.t
                self._results.append(event)
            self._cond.notify_all()

    def results(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._results)

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self._cond:
            return [{**json.loads(m.payload), "_t": m.t} for m in self.messages if m.topic.endswith(suffix)]

    def alarms(self, name: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.on("/alarm") if (name is None or a["alarm"] == name)
                and (state is None or a["state"] == state)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def part_ids(self) -> set[str]:
        with self._cond:
            return {e["part_id"] for e in self._results}

    def wait_parts(self, wanted: Callable[[], set[str]] | set[str], timeout: float) -> bool:
        """Until every wanted part id has arrived (wanted may grow: pass a callable)."""
        get = wanted if callable(wanted) else (lambda: wanted)
        return self.wait_for(lambda: get() <= {e["part_id"] for e in self._results}, timeout)

    def wait_count(self, n: int, timeout: float) -> bool:
        return self.wait_for(lambda: len(self._results) >= n, timeout)

    def wait_alarm(self, name: str, state: str, timeout: float, after: float = 0.0) -> float | None:
        """Receipt time of the first `name` alarm in `state` received after `after` (monotonic), or None."""
        found: list[float] = []

        def seen() -> bool:
            found[:] = [a["_t"] for a in self.alarms(name, state) if a["_t"] >= after]
            return bool(found)

        return found[0] if self.wait_for(seen, timeout) else None

    def first_result_after(self, t: float) -> float | None:
        times = [e["_t"] for e in self.results() if e["_t"] >= t]
        return min(times) if times else None

    def recovery(self, t: float, timeout: float) -> float | None:
        """Seconds from `t` (monotonic) to the first result received after it; None on timeout."""
        self.wait_for(lambda: self.first_result_after(t) is not None, timeout)
        first = self.first_result_after(t)
        return None if first is None else first - t

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tally(case: str, generated: Iterable[str], results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Report figures: parts generated/delivered/missing, duplicates (and any with another event_id)."""
    gen = set(generated)
    ids: dict[str, list[str]] = defaultdict(list)
    for e in results:
        ids[e["part_id"]].append(e["event_id"])
    missing = sorted(gen - set(ids))
    unexpected = sorted(set(ids) - gen)
    return {
        "case": case,
        "generated": len(gen),
        "delivered": len(gen & set(ids)),
        "missing": len(missing),
        "missing_ids": missing[:20],
        "messages": len(results),
        "duplicates": sum(len(v) - 1 for k, v in ids.items() if k in gen),
        "duplicates_with_other_event_id": sum(1 for v in ids.values() if len(set(v)) > 1),
        "unexpected": len(unexpected),
        **extra,
    }


def check(entry: dict[str, Any]) -> None:
    """The invariants every fault case must keep."""
    assert entry["missing"] == 0, f"{entry['case']}: parts lost: {entry['missing_ids']}"
    assert entry["duplicates_with_other_event_id"] == 0, f"{entry['case']}: a duplicate with another event_id"
    assert entry["unexpected"] == 0, f"{entry['case']}: results for parts nobody made"


# -- parts ----------------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll a condition that no message signals (files, processes); its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def write_atomic(folder: Path, name: str, data: bytes, mtime: float | None = None) -> Path:
    """Write under a temporary name the hot folder ignores, then rename (what line writers must do)."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    final = folder / name
    tmp.rename(final)
    return final


def part_png(i: int, size: tuple[int, int] = (96, 128), defect: bool | None = None) -> bytes:
    ok, buf = cv2.imencode(".png", make_part(size, defect=(i % 4 == 0) if defect is None else defect, seed=i))
    assert ok
    return buf.tobytes()


class Feeder:
    """Drips parts into a hot folder at `rate` per second from a thread, like a line would."""

    def __init__(self, folder: Path, count: int, rate: float, size: tuple[int, int] = (96, 128),
                 prefix: str = "p") -> None:
        self.folder, self.count, self.rate, self.size, self.prefix = folder, count, rate, size, prefix
        self.written: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Encoding is the slow part: a few templates, each written under many names.
        self._png = [part_png(i, size) for i in range(8)]
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        for i in range(self.count):
            due = t0 + i / self.rate if self.rate > 0 else 0.0
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            name = f"{self.prefix}{i:06d}"
            write_atomic(self.folder, f"{name}.png", self._png[i % len(self._png)])
            with self._lock:
                self.written.append(name)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self.written)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- a full disk -----------------------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, options: str) -> Any:
    """Mount a tmpfs with `options` (e.g. "size=16M") at `path` (root only); None when impossible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path, name: str = "filler.bin") -> Path:
    """Write a file until the filesystem is full, to the last byte (unbuffered: nothing is pending)."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return path


def use_all_inodes(folder: Path) -> list[Path]:
    """Create empty files until no inode is left: existing files can still grow, new ones cannot."""
    made: list[Path] = []
    while True:
        path = folder / f"inode-{len(made):05d}"
        try:
            path.touch()
        except OSError:
            return made
        made.append(path)


# -- a camera that stalls and disconnects -----------------------------------------------------------
class FifoCamera:
    """A 'camera' streaming YUV4MPEG2 grey frames into a FIFO (OpenCV/FFmpeg reads it like a device).

    `play(seconds)` streams frames, `stall(seconds)` keeps the pipe open but silent (a hung
    camera), `hang_up()` closes the pipe (an unplugged camera; OpenCV sees the end of stream).
    """

    def __init__(self, path: Path, size: tuple[int, int] = (96, 128), fps: float = 20.0) -> None:
        self.path, self.size, self.fps = path, size, fps
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        self._f: Any = None
        self.frames = 0

    def _open(self) -> None:
        if self._f is None:
            # Blocks until the reader (OpenCV) opens its end; O_RDWR would hide a missing reader.
            self._f = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in hang_up()
            h, w = self.size
            self._f.write(f"YUV4MPEG2 W{w} H{h} F{int(self.fps)}:1 Ip A1:1 Cmono\n".encode())

    def play(self, seconds: float, stop: threading.Event | None = None) -> None:
        self._open()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop and stop.is_set()):
            self._f.write(b"FRAME\n" + make_part(self.size, defect=False, seed=self.frames % 16).tobytes())
            self.frames += 1
            time.sleep(1.0 / self.fps)

    def hang_up(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None

    def close(self) -> None:
        self.hang_up()
        with contextlib.suppress(OSError):
            self.path.unlink()


# -- garbage files ------------------------------------------------------------------------------
def png_bomb(width: int, height: int, value: int = 170, channels: int = 1) -> bytes:
    """A valid PNG of width x height that compresses to almost nothing (a decompression bomb)."""
    import struct
    import zlib

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    row = b"\x00" + bytes([value]) * (width * channels)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok, ext
    return buf.tobytes()


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
