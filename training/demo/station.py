"""The demo's station: a private Mosquitto, the conveyor (parts with known truth fed into the
daemon's hot folder), the MQTT subscriber that collects verdicts, and the daemon's station.yaml.

Used by `training.demo.run` (stages 4-5); the scoring and pictures are in `training.demo.report`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.demo.console import Progress

LINE, STATION = "demo", "station1"
TOPIC_PREFIX = "inspection"


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


# ----------------------------------------------------------------------------------- processes
def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal one child we started and wait; SIGKILL if it does not go. Returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A private Mosquitto on a free localhost port, config and log in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        self.conf, self.log = self.dir / "mosquitto.conf", self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        found = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if not found:
            raise DemoError("mosquitto is not installed: run `bash scripts/setup.sh` (apt-get install mosquitto)")
        return found

    def start(self, timeout: float = 10.0) -> Broker:
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false",
                 f"log_dest file {self.log}", "log_type error", "log_type warning", "log_type notice",
                 "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto switches to 'mosquitto' and cannot write its log
        self.conf.write_text("\n".join(lines) + "\n")
        with open(self.dir / "mosquitto.stderr", "wb") as err:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen([self.executable(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"mosquitto exited with code {self.proc.returncode}; see {self.dir}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise DemoError(f"mosquitto did not accept connections on port {self.port}; see {self.dir}")

    def stop(self) -> None:
        stop_process(self.proc, timeout=5.0)


# ----------------------------------------------------------------------------------- conveyor
@dataclass
class Part:
    part_id: str
    truth: str  # "good" or a defect type
    file: Path  # pre-rendered image (outside the hot folder)
    mask_file: Path | None

    @property
    def defective(self) -> bool:
        return self.truth != "good"


def render_conveyor(folder: Path, count: int, seed: int, size: tuple[int, int], color: str,
                    defect_fraction: float) -> list[Part]:
    """Pre-render `count` new parts (a seed the model never saw) with their truth, neutral part ids."""
    from training.core.synth import (  # the dataset's own assignment of defect types
        defect_assignments,
        make_part,
    )

    staged, masks = folder / "staged", folder / "truth_masks"
    staged.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, kind in enumerate(defect_assignments(count, seed, defect_fraction)):
        rng = np.random.default_rng([seed, i])
        image, mask = make_part(rng, size, color, None if kind == "good" else kind)
        pid = f"part-{i + 1:04d}"
        img_path = staged / f"{pid}.png"
        cv2.imwrite(str(img_path), image)
        mask_path = None
        if mask.any():
            mask_path = masks / f"{pid}.png"
            cv2.imwrite(str(mask_path), mask * 255)
        parts.append(Part(pid, kind, img_path, mask_path))
    truth = {p.part_id: p.truth for p in parts}
    (folder / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return parts


def feed(parts: Sequence[Part], hot: Path, rate: float, stop: threading.Event, sent: list[tuple[str, float]]) -> None:
    """Drop parts into the hot folder at `rate` parts/s (0 = all at once): write a hidden temp
    file, then rename, so the daemon never sees half a file."""
    t0 = time.monotonic()
    for i, p in enumerate(parts):
        if stop.is_set():
            return
        if rate > 0:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
        tmp = hot / f".{p.part_id}.png.tmp"
        shutil.copyfile(p.file, tmp)
        os.replace(tmp, hot / f"{p.part_id}.png")
        sent.append((p.part_id, time.time()))


# ----------------------------------------------------------------------------------- MQTT
@dataclass
class Received:
    event: dict[str, Any]
    received_ts: float


@dataclass
class Listener:
    """A real paho MQTT 5 subscriber on <base>/#; prints one line per result as it arrives."""

    host: str
    port: int
    base: str
    truth: dict[str, str]
    progress: Progress
    results: dict[str, Received] = field(default_factory=dict)  # event_id -> first copy
    by_part: dict[str, str] = field(default_factory=dict)  # part_id -> event_id
    duplicates: int = 0
    alarms: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    bad_payloads: int = 0
    reviews: list[dict[str, Any]] = field(default_factory=list)  # from the station page, <base>/review

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-listener-{os.getpid()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600  # a reconnect keeps the session: QoS 1 results queue at the broker
        self.client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.close()
            raise DemoError(f"could not subscribe to {self.base}/# on {self.host}:{self.port}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(f"{self.base}/#", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            body = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            with self.cond:
                self.bad_payloads += 1
            return
        if kind == "status":
            with self.cond:
                self.status = body
                self.cond.notify_all()
        elif kind == "review":
            with self.cond:
                self.reviews.append(body)
        elif kind == "alarm":
            with self.cond:
                self.alarms.append(body)
            self.progress.say(f"   ALARM {body.get('alarm')} {body.get('state')}: {body.get('message')}")
        elif kind == "result":
            with self.cond:
                eid = body.get("event_id", "")
                if eid in self.results:
                    self.duplicates += 1  # at-least-once delivery: consumers drop duplicates by event id
                    return
                self.results[eid] = Received(body, now)
                self.by_part.setdefault(body.get("part_id", ""), eid)
                n = len(self.by_part)
                self.cond.notify_all()
            self.progress.say(self.line(body, n))

    def line(self, ev: dict[str, Any], n: int) -> str:
        verdict = ev.get("verdict", "?")
        truth = self.truth.get(ev.get("part_id", ""), "?")
        if verdict == "error":
            mark = "ERROR: " + str(ev.get("error"))[:60]
        elif (verdict == "fail") == (truth != "good"):
            mark = "ok"
        else:
            mark = "MISSED DEFECT" if verdict == "pass" else "FALSE ALARM"
        lat = ev.get("timings_ms", {}).get("capture_to_result")
        lat_s = f"{lat:7.1f} ms" if isinstance(lat, (int, float)) else "      ? ms"
        return (f"   {n:4d}/{len(self.truth)}  {ev.get('part_id', '?'):<10} {verdict.upper():<5} "
                f"{len(ev.get('regions', [])):2d} region(s) {lat_s}   truth {truth:<8} {mark}")

    def wait_results(self, n: int, timeout: float, alive: Any) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.by_part) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return False
                self.cond.wait(min(left, 0.5))
            return True

    def wait_status(self, state: str, timeout: float, alive: Any) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.status.get("state") != state:
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return None
                self.cond.wait(min(left, 0.5))
            return dict(self.status)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop_stop()


# ----------------------------------------------------------------------------------- station
def station_yaml(out: Path, model: Path, hot: Path, port: int, ui: dict[str, Any] | None = None) -> str:
    """The daemon's config for this demo (every key is checked by edge.config at start); `ui`: the page's section."""
    cfg = {
        "station": {"line": LINE, "name": STATION},
        "source": {"type": "folder", "path": str(hot), "settle_s": 0.2, "poll_interval_s": 0.1},
        "model": {"path": str(model)},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": TOPIC_PREFIX, "client_id": "edge-demo-station1",
                 "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        "evidence": {"enabled": True, "quota_mb": 200},
        # the demo's defect mix (about 40% defective) is far above a real line's: keep alarms quiet
        "alarms": {"consecutive_fails": 10, "fail_rate_window": 50, "fail_rate_max": 0.8},
        "metrics": {"enabled": True, "port": 0, "stats_interval_s": 5},
        "pipeline": {"drain_timeout_s": 15},
        "state_dir": str(out / "state"),
    }
    if ui:
        cfg["ui"] = ui
    import yaml

    return ("# Written by `python -m training demo`; run by `python -m edge run --config <this file>`.\n"
            + yaml.safe_dump(cfg, sort_keys=False))
