"""`python -m training demo --out demo-out`: the whole product on built-in synthetic parts.

    1 data      synthetic textured parts with exact defect masks (training.synth)
    2 train     `python -m training train` on configs/train/synthetic-demo.yaml, time-budgeted
    3 export    `python -m training export`: OpenVINO IR, INT8 behind the accuracy gate
    4 station   a local Mosquitto on a free port + the real daemon (`python -m edge run`)
    5 conveyor  new parts with known truth dropped into the daemon's hot folder; every verdict
                is printed as it arrives over MQTT (a real paho subscriber in this process)
    6 summary   SIGTERM the daemon (must exit 0), then accuracy against the truth, throughput,
                latency, lost events -> demo-out/summary.json + failed_parts.png

Everything lands in OUT: data/, run/ (checkpoints, curves.png, val_grid.png), model/,
conveyor/ (truth.json, the hot folder), station.yaml, state/ (outbox, evidence), broker/,
logs/ (train, export, daemon, mosquitto). The broker and the daemon are stopped at the end,
also on Ctrl-C or a failed stage. Exit 0 = every part got its verdict over MQTT and the
daemon stopped cleanly; 1 = a stage failed (the message names the log); 130 = interrupted.
`--model PKG` skips stages 1-3 and runs the station on an existing model package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "train" / "synthetic-demo.yaml"
OWNED = ("data", "run", "model", "conveyor", "state", "broker", "logs")  # recreated on every run
LINE, STATION = "demo", "station1"
TOPIC_PREFIX = "inspection"


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


class Interrupted(BaseException):
    """SIGTERM / SIGINT: unwind through every `finally` so the broker and daemon are stopped."""


# ----------------------------------------------------------------------------------- printing
class Progress:
    def __init__(self, total_stages: int) -> None:
        self.t0 = time.monotonic()
        self.total = total_stages
        self.n = 0
        self.lock = threading.Lock()
        self.stage_times: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:d}:{s % 60:02d}"

    def stage(self, name: str, what: str) -> None:
        self._close_stage()
        self.n += 1
        self._stage = (name, time.monotonic())
        self.say(f"\n== [{self.n}/{self.total}] {what}   (elapsed {self.elapsed()})")

    def _close_stage(self) -> None:
        if self._stage is not None:
            name, t = self._stage
            self.stage_times[name] = round(time.monotonic() - t, 1)
            self._stage = None

    def finish(self) -> None:
        self._close_stage()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


# ----------------------------------------------------------------------------------- children
def _stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
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


def run_logged(cmd: Sequence[str], log_path: Path, progress: Progress, prefix: str = "   ") -> int:
    """Run a command, streaming its output (stdout + stderr) to the console and to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                # tqdm redraws with carriage returns: show only the last state of such a line
                shown = line.rsplit("\r", 1)[-1].rstrip()
                if shown:
                    progress.say(prefix + shown)
            return proc.wait()
        finally:
            _stop_process(proc)


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("   | " + line for line in lines[-n:])


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
        _stop_process(self.proc, timeout=5.0)


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
    from training.synth import _assignments, make_part  # the dataset's own assignment of defect types

    staged, masks = folder / "staged", folder / "truth_masks"
    staged.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, kind in enumerate(_assignments(count, seed, defect_fraction)):
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
def station_yaml(out: Path, model: Path, hot: Path, port: int) -> str:
    """The daemon's config for this demo (every key is checked by edge.config at start)."""
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
    import yaml

    return ("# Written by `python -m training demo`; run by `python -m edge run --config <this file>`.\n"
            + yaml.safe_dump(cfg, sort_keys=False))


# ----------------------------------------------------------------------------------- summary
def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "max": round(float(a.max()), 2)}


def score(parts: Sequence[Part], results: dict[str, Received], by_part: dict[str, str],
          sent: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Everything the summary says about the conveyor run, from the events received over MQTT."""
    events = {pid: results[eid].event for pid, eid in by_part.items()}
    recv = {pid: results[eid].received_ts for pid, eid in by_part.items()}
    sent_ids = {pid for pid, _ in sent}
    counts = {"pass": 0, "fail": 0, "error": 0}
    tp = fn = fp = tn = 0
    for p in parts:
        ev = events.get(p.part_id)
        if ev is None:
            continue
        v = ev["verdict"]
        counts[v] = counts.get(v, 0) + 1
        flagged = v == "fail"
        if p.defective:
            tp, fn = tp + flagged, fn + (not flagged)  # an error on a defective part is not a catch
        else:
            fp, tn = fp + flagged, tn + (v == "pass")
    n_def = sum(p.defective for p in parts if p.part_id in events)
    n_good = sum(not p.defective for p in parts if p.part_id in events)
    received = len(events)
    lat = [float(ev["timings_ms"]["capture_to_result"]) for ev in events.values()]
    e2e = [(recv[pid] - float(ev["capture_ts"])) * 1000 for pid, ev in events.items()]
    t_first = min((t for _, t in sent), default=0.0)
    t_last = max(recv.values(), default=t_first)
    span = max(1e-6, t_last - t_first)
    per_type: dict[str, dict[str, int]] = {}
    for p in parts:
        ev = events.get(p.part_id)
        if ev is not None:
            d = per_type.setdefault(p.truth, {"parts": 0, "fail": 0})
            d["parts"] += 1
            d["fail"] += ev["verdict"] == "fail"
    return {
        "parts_sent": len(sent), "parts_received": received,
        "events_lost": len(sent_ids - set(events)), "unexpected_events": len(set(events) - sent_ids),
        "counts": counts,
        "truth": {"good": n_good, "defective": n_def},
        "accuracy": {
            "image_accuracy": round((tp + tn) / received, 4) if received else None,
            "defect_recall": round(tp / n_def, 4) if n_def else None,
            "false_alarms": fp, "false_alarm_rate": round(fp / n_good, 4) if n_good else None,
            "missed_defects": fn, "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
            "per_truth": per_type,
        },
        "throughput_parts_per_s": round(received / span, 2),
        "window_s": round(span, 2),
        "latency_ms": {"capture_to_result": percentiles(lat), "file_to_mqtt": percentiles(e2e)},
    }


def contact_sheet(parts: Sequence[Part], events: dict[str, dict[str, Any]], evidence_root: Path, done: Path,
                  png: Path, title: str, max_tiles: int = 40, cols: int = 8) -> int:
    """Tiles of parts with the predicted defect overlay (red: mask + boxes) and the truth outline
    (green); the daemon's own evidence mask when there is one, else the event's boxes alone."""
    tiles = []
    for p in parts[:max_tiles]:
        ev = events[p.part_id]
        img = cv2.imread(str(done / f"{p.part_id}.png"), cv2.IMREAD_UNCHANGED)
        if img is None:
            img = cv2.imread(str(p.file), cv2.IMREAD_UNCHANGED)
        if img is None:
            continue
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        pred = None
        if ev.get("evidence"):
            m = cv2.imread(str(evidence_root / f"{ev['evidence']}.mask.png"), cv2.IMREAD_GRAYSCALE)
            if m is not None and m.shape[:2] == img.shape[:2]:
                pred = m > 0
        if pred is not None:
            img[pred] = (0.45 * img[pred] + 0.55 * np.array([0, 0, 255])).astype(np.uint8)
        for r in ev.get("regions", []):
            x, y, w, h = (int(v) for v in r["bbox"])
            cv2.rectangle(img, (x - 2, y - 2), (x + w + 1, y + h + 1), (0, 0, 255), 1)
        if p.mask_file is not None:
            tm = cv2.imread(str(p.mask_file), cv2.IMREAD_GRAYSCALE)
            if tm is not None:
                contours, _ = cv2.findContours((tm > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(img, contours, -1, (0, 220, 0), 1)
        scale = max(1, 192 // max(img.shape[:2]))
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        caption = np.full((34, img.shape[1], 3), 255, np.uint8)
        cv2.putText(caption, f"{p.part_id} {ev['verdict']}", (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
        ok = (ev["verdict"] == "fail") == p.defective
        cv2.putText(caption, f"truth {p.truth}, {len(ev.get('regions', []))} reg", (3, 28), cv2.FONT_HERSHEY_SIMPLEX,
                    0.42, (0, 120, 0) if ok else (0, 0, 200), 1, cv2.LINE_AA)
        tiles.append(np.vstack([img, caption]))
    if not tiles:
        return 0
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = min(cols, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    pad = 4
    sheet = np.full((40 + rows * (th + pad), cols * (tw + pad) + pad, 3), 255, np.uint8)
    cv2.putText(sheet, title, (pad, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = 40 + r * (th + pad), pad + c * (tw + pad)
        sheet[y : y + t.shape[0], x : x + t.shape[1]] = t
    png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(png), sheet)
    return len(tiles)


def fmt_lat(p: dict[str, float | None]) -> str:
    if p["p50"] is None:
        return "n/a"
    return f"p50 {p['p50']:.1f} / p95 {p['p95']:.1f} / p99 {p['p99']:.1f} ms (max {p['max']:.1f})"


def print_summary(s: dict[str, Any], say: Any) -> None:
    c, a = s["conveyor"]["counts"], s["conveyor"]["accuracy"]
    cv = s["conveyor"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    gate = s["model"].get("gate") or {}
    fallback = f"; INT8 failed its accuracy gate ({gate.get('reason')})" if gate.get("fallback") else ""
    lines = [
        f"model              {s['model'].get('name')} {s['model'].get('version')} ({s['model'].get('precision')}"
        f"{fallback})",
        f"parts              {cv['parts_sent']} sent ({cv['truth']['good']} good, {cv['truth']['defective']} defective)"
        f", {cv['parts_received']} verdicts received over MQTT",
        f"verdicts           pass {c.get('pass', 0)}, fail {c.get('fail', 0)}, error {c.get('error', 0)}",
        f"image accuracy     {pct(a['image_accuracy'])}",
        f"defect recall      {pct(a['defect_recall'])} ({a['confusion']['tp']} of {cv['truth']['defective']} "
        f"defective parts failed; {a['missed_defects']} missed)",
        f"false alarms       {a['false_alarms']} of {cv['truth']['good']} good parts ({pct(a['false_alarm_rate'])})",
        f"throughput         {cv['throughput_parts_per_s']:.1f} parts/s over {cv['window_s']:.1f} s "
        f"(conveyor pace {'unpaced' if not s['settings']['rate'] else str(s['settings']['rate']) + ' parts/s'})",
        f"latency            capture->result {fmt_lat(cv['latency_ms']['capture_to_result'])}",
        f"                   file->MQTT (incl. hot-folder settle) {fmt_lat(cv['latency_ms']['file_to_mqtt'])}",
        f"events lost        {cv['events_lost']} (duplicates dropped by event id: {cv['duplicates']})",
        f"daemon exit        {s['daemon_exit_code']} after SIGTERM",
        f"wall time          {s['wall_time_s']:.0f} s (stages: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
        + f"; load average {s['load_average_start']:.1f} at start, {s['load_average'][0]:.1f} at end, "
        f"{s['cpus']} CPUs)",
    ]
    for k, v in s["pictures"].items():
        if v:
            lines.append(f"{k:<18} {v}")
    say("\n".join("   " + line for line in lines))


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m training demo", description=__doc__, formatter_class=Fmt)
    p.add_argument("--out", default="demo-out", help="output folder (its demo subfolders are recreated)")
    p.add_argument("--train-parts", type=int, default=200, help="synthetic training parts")
    p.add_argument("--size", type=int, default=128, help="part side in pixels (training and conveyor)")
    p.add_argument("--train-minutes", type=float, default=3.0, help="training time budget")
    p.add_argument("--epochs", type=int, default=100, help="epoch cap (the time budget usually ends the run first)")
    p.add_argument("--train-config", default=str(DEFAULT_TRAIN_CONFIG), help="training recipe")
    p.add_argument("--calib-size", type=int, default=200, help="INT8 calibration tiles")
    p.add_argument("--parts", type=int, default=120, help="parts sent down the conveyor")
    p.add_argument("--defect-fraction", type=float, default=0.4, help="share of defective conveyor parts")
    p.add_argument("--rate", type=float, default=20.0, help="conveyor pace, parts/s (0 = all at once)")
    p.add_argument("--seed", type=int, default=0, help="data, training and conveyor seed")
    p.add_argument("--model", help="existing model package: skip data, training and export")
    p.add_argument("--result-timeout", type=float, default=120.0, help="seconds to wait for the last verdict")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parts < 1 or args.train_parts < 10 or args.size < 32 or args.rate < 0:
        print("error: need --parts >= 1, --train-parts >= 10, --size >= 32, --rate >= 0", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except Interrupted as e:
        print(f"\ndemo interrupted ({e}); everything it started was stopped; partial results and logs "
              f"in {args.out}/", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("summary.json", "failed_parts.png", "missed_parts.png", "station.yaml"):
        (out / name).unlink(missing_ok=True)
    logs = out / "logs"
    logs.mkdir()
    prog = Progress(3 if args.model else 6)
    py = sys.executable
    size = (args.size, args.size)
    load0, cpus = os.getloadavg()[0], os.cpu_count() or 1
    prog.say(f"demo: output in {out}  (python {sys.version.split()[0]}, {cpus} CPU(s), load average {load0:.1f})")
    if load0 > 0.5 * cpus and not args.model:
        prog.say(f"   note: this machine is busy (load {load0:.1f} on {cpus} CPUs). Training runs on a time budget,\n"
                 "   so it gets fewer steps and the model will be less accurate than on an idle machine.")

    if args.model:
        model_dir = Path(args.model).resolve()
        color = "gray"
        with contextlib.suppress(OSError, ValueError, KeyError):
            color = json.loads((model_dir / "package.json").read_text())["input"]["color"]
    else:
        # ------------------------------------------------------------------ 1 data
        prog.stage("data", f"synthetic dataset: {args.train_parts} parts {args.size}x{args.size}")
        from training.synth import generate_dataset

        counts = generate_dataset(out / "data", args.train_parts, args.seed, size=size, progress=False)
        prog.say("   wrote " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + f" -> {out / 'data'}")
        color = "gray"

        # ------------------------------------------------------------------ 2 train
        prog.stage("train", f"train the U-Net ({Path(args.train_config).name}, budget {args.train_minutes:g} min)")
        cmd = [py, "-m", "training", "train", "--config", args.train_config, "--data", str(out / "data"),
               "--out", str(out / "run"), "--time-budget", f"{args.train_minutes:g}", "--epochs", str(args.epochs),
               "--seed", str(args.seed)]
        rc = run_logged(cmd, logs / "train.log", prog)
        best = out / "run" / "best.pt"
        if rc != 0 or not best.is_file():
            raise DemoError(f"training failed (exit {rc}); log: {logs / 'train.log'}\n{log_tail(logs / 'train.log')}")

        # ------------------------------------------------------------------ 3 export
        prog.stage("export", "export: OpenVINO IR, INT8 quantization behind the accuracy gate")
        model_dir = out / "model"
        cmd = [py, "-m", "training", "export", "--checkpoint", str(best), "--out", str(model_dir),
               "--calib-data", str(out / "data"), "--calib-size", str(args.calib_size), "--seed", str(args.seed)]
        rc = run_logged(cmd, logs / "export.log", prog)
        if rc != 0 or not (model_dir / "package.json").is_file():
            raise DemoError(f"export failed (exit {rc}); log: {logs / 'export.log'}\n{log_tail(logs / 'export.log')}")

    # ---------------------------------------------------------------------- 4 station
    prog.stage("station", "station: local MQTT broker + edge daemon on a hot folder")
    conveyor = out / "conveyor"
    parts = render_conveyor(conveyor, args.parts, args.seed + 1000, size, color, args.defect_fraction)
    truth = {p.part_id: p.truth for p in parts}
    n_def = sum(p.defective for p in parts)
    prog.say(f"   conveyor: {len(parts)} new parts ({len(parts) - n_def} good, {n_def} defective; "
             f"truth in {conveyor / 'truth.json'})")
    hot = conveyor / "incoming"
    hot.mkdir(parents=True)
    broker = Broker(out / "broker")
    daemon: subprocess.Popen[bytes] | None = None
    listener: Listener | None = None
    feeder: threading.Thread | None = None
    stop_feed = threading.Event()
    sent: list[tuple[str, float]] = []
    daemon_rc: int | None = None
    daemon_log = logs / "daemon.log"
    try:
        broker.start()
        prog.say(f"   mosquitto on {broker.host}:{broker.port} (config {broker.conf})")
        base = f"{TOPIC_PREFIX}/{LINE}/{STATION}"
        listener = Listener(broker.host, broker.port, base, truth, prog)
        prog.say(f"   subscribed to {base}/# (paho, MQTT 5, QoS 1)")
        station = out / "station.yaml"
        station.write_text(station_yaml(out, model_dir, hot, broker.port))
        with open(daemon_log, "wb") as dlog:
            daemon = subprocess.Popen([py, "-m", "edge", "run", "--config", str(station)], cwd=REPO,
                                      stdout=dlog, stderr=subprocess.STDOUT, start_new_session=True)
        prog.say(f"   daemon: python -m edge run --config {station}  (pid {daemon.pid}, log {daemon_log})")
        status = listener.wait_status("online", 120, lambda: daemon.poll() is None)
        if status is None:
            early = daemon.poll()
            raise DemoError((f"daemon exited with code {early} before going online" if early is not None
                             else "daemon did not come online within 120 s")
                            + f"; log: {daemon_log}\n{log_tail(daemon_log)}")
        model_info = status.get("model", {})
        prog.say(f"   daemon online: model {model_info.get('name')} {model_info.get('version')} "
                 f"({model_info.get('precision')}), rules {status.get('rules')}")

        # ------------------------------------------------------------------ 5 conveyor
        pace = f"{args.rate:g} parts/s" if args.rate else "all at once"
        prog.stage("conveyor", f"conveyor: {len(parts)} parts into the hot folder ({pace}); verdicts over MQTT")
        prog.say(f"   {'n':>9}  {'part':<10} {'VERDICT':<5} {'regions':>10} {'latency':>10}   truth")
        t_feed = time.monotonic()
        feeder = threading.Thread(target=feed, args=(parts, hot, args.rate, stop_feed, sent), name="feeder",
                                  daemon=True)
        feeder.start()
        feed_time = len(parts) / args.rate if args.rate else 0.0
        complete = listener.wait_results(len(parts), feed_time + args.result_timeout,
                                         lambda: daemon.poll() is None)
        feeder.join(timeout=5)
        conveyor_s = time.monotonic() - t_feed
        if not complete:
            early = daemon.poll()
            prog.say(f"   !! only {len(listener.by_part)} of {len(parts)} verdicts arrived"
                     + (f"; the daemon exited with code {early}" if early is not None else " in time"))

        # ------------------------------------------------------------------ 6 stop + summary
        prog.stage("summary", "stop the daemon (SIGTERM), summary and pictures")
        daemon_rc = _stop_process(daemon, signal.SIGTERM, timeout=60)
        daemon = None
        prog.say(f"   daemon exited with code {daemon_rc}")
        listener.wait_status("offline", 5, lambda: True)
        time.sleep(0.3)  # a last duplicate in flight, if any
    finally:
        stop_feed.set()
        if feeder is not None:
            feeder.join(timeout=5)
        _stop_process(daemon, signal.SIGTERM, timeout=30)
        if listener is not None:
            listener.close()
        broker.stop()
        with contextlib.suppress(OSError):
            if broker.log.exists():
                shutil.copyfile(broker.log, logs / "mosquitto.log")

    conv = score(parts, listener.results, listener.by_part, sent)
    conv["duplicates"] = listener.duplicates
    conv["conveyor_s"] = round(conveyor_s, 1)
    conv["alarms"] = listener.alarms
    events = {pid: listener.results[eid].event for pid, eid in listener.by_part.items()}
    evidence_root = out / "state" / "evidence"
    done = hot / "done"
    failed = [p for p in parts if events.get(p.part_id, {}).get("verdict") == "fail"]
    missed = [p for p in parts if p.defective and events.get(p.part_id, {}).get("verdict") == "pass"]
    pictures: dict[str, str | None] = {"failed parts": None, "missed defects": None}
    if contact_sheet(failed, events, evidence_root, done, out / "failed_parts.png",
                     f"failed parts ({len(failed)}): red = model's defect mask/boxes, green = true defect outline"):
        pictures["failed parts"] = str(out / "failed_parts.png")
    if contact_sheet(missed, events, evidence_root, done, out / "missed_parts.png",
                     f"defective parts that passed ({len(missed)}); green = true defect outline"):
        pictures["missed defects"] = str(out / "missed_parts.png")
    for name, label in (("curves.png", "training curves"), ("val_grid.png", "validation grid")):
        path = out / "run" / name
        pictures[label] = str(path) if path.is_file() else None
    package = {}
    with contextlib.suppress(OSError, ValueError):
        package = json.loads((model_dir / "package.json").read_text())
    prog.finish()
    summary = {
        "ok": False,
        "model": {"path": str(model_dir), "name": package.get("name"), "version": package.get("version"),
                  "precision": package.get("precision"), "gate": package.get("metrics", {}).get("gate"),
                  "validation": {k: package.get("metrics", {}).get(k) for k in ("fp32", "int8", "fp16")
                                 if k in package.get("metrics", {})}},
        "conveyor": conv,
        "daemon_exit_code": daemon_rc,
        "wall_time_s": round(time.monotonic() - prog.t0, 1),
        "stage_seconds": prog.stage_times,
        "load_average_start": round(load0, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "pictures": pictures,
        "logs": str(logs),
        "settings": {k: v for k, v in vars(args).items()},
    }
    problems = []
    if conv["events_lost"]:
        problems.append(f"{conv['events_lost']} part(s) sent but no verdict received")
    if daemon_rc != 0:
        problems.append(f"the daemon exited with code {daemon_rc} after SIGTERM (expected 0); log {daemon_log}")
    summary["ok"] = not problems
    summary["problems"] = problems
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, prog.say)
    prog.say(f"   summary            {out / 'summary.json'}")
    if problems:
        raise DemoError("; ".join(problems) + (f"\n{log_tail(daemon_log)}" if daemon_rc != 0 else ""))
    prog.say(f"\ndemo OK in {prog.elapsed()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
