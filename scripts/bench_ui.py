#!/usr/bin/env python3
"""Does an open station page slow the inspection? Pipeline throughput with the page closed vs open.
(The daemon's preview feed, edge/preview.py, runs in both: it is on by default.)

    .venv/bin/python scripts/bench_ui.py [--model PKG] [--frames N] [--size WxH] [--viewers N] [--rounds N]

Runs scripts/bench_pipeline.py's throughput run (the daemon pipeline in-process, synthetic pooled
parts, evidence on, MQTT publish acknowledged by a real Mosquitto) alternately without and with the
page: `python -m edge ui` as its own process at the unit's priority (nice 10, as
deploy/edge-ui@.service sets), indexing every result it receives, with --viewers browsers' worth of
load: each viewer holds the live view's server-sent-event stream at its full rate and fetches the
image of every update it gets (the preview JPEG), as the page in a browser does. Prints each run and the ratio
open / closed (mean of the closed runs around each open one). Target >= 0.95 (issue 17). The tiny
test model runs in microseconds, so it is the worst case for the page (most events per second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_pipeline as bp  # noqa: E402

from tests.broker import Broker, free_port  # noqa: E402
from tests.daemon_proc import station, write_config  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402

IMG = re.compile(r'src="(/(?:evidence/[0-9a-f-]{36}/overlay|live/preview\.jpg\?n=\d+))"')


class Viewer(threading.Thread):
    """One open live view: reads the SSE stream, fetches each update's overlay image."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.updates = self.images = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/live/stream", timeout=5) as stream:
                    for raw in stream:
                        if self.stop.is_set():
                            return
                        line = raw.decode(errors="replace")
                        if line.startswith("event: live"):
                            self.updates += 1
                        m = IMG.search(line)
                        if m:
                            with contextlib.suppress(OSError):  # a 404 placeholder: a part without evidence
                                urllib.request.urlopen(self.url + m.group(1), timeout=5).read()
                            self.images += 1
            except OSError:
                time.sleep(0.2)  # page not up yet


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """utime + stime of a process (0 without one or once it is gone)."""
    if proc is None:
        return 0.0
    with contextlib.suppress(OSError, ValueError):
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def view(url: str, n: int) -> int:
    """--view: N live views until SIGTERM; prints "ready" at the first update, then what they saw (JSON)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    viewers = [Viewer(url, stop) for _ in range(n)]
    for v in viewers:
        v.start()
    while not stop.is_set() and not any(v.updates for v in viewers):
        time.sleep(0.05)
    print("ready", flush=True)
    stop.wait()
    print(json.dumps({"updates": sum(v.updates for v in viewers), "images": sum(v.images for v in viewers)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--view", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="model package (default: the tiny test package)")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--size", default="128x96", help="frame WxH")
    ap.add_argument("--viewers", type=int, default=2, help="open live views")
    ap.add_argument("--rounds", type=int, default=2, help="open runs (each between two closed runs)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if args.view:
        return view(args.view, args.viewers)
    work = Path(os.environ.get("BENCH_DIR") or "/tmp/bench-ui")
    work.mkdir(parents=True, exist_ok=True)
    size = bp.parse_size(args.size)
    pkg = args.model or make_tiny_package(work / "pkg")
    m = {"num_requests": 0, "threads": 0, "hint": "THROUGHPUT"}
    broker = Broker(work / "broker").start()
    port = free_port()
    evidence = work / f"state-{size[0]}x{size[1]}-0.1-full" / "evidence"
    ui_cfg = write_config(work / "ui.yaml", station(work, pkg, broker, {"type": "synthetic"}, state_dir=str(work / "ui"),
                                                    evidence={"dir": str(evidence)}, ui={"port": port}))
    runs: list[dict[str, Any]] = []

    def run(open_page: bool) -> float:
        ui, viewers = None, None
        if open_page:
            ui = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "edge", "ui", "--config", str(ui_cfg)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            # the browsers' side in its own process: their work must not take the pipeline's GIL
            viewers = subprocess.Popen([sys.executable, __file__, "--view", f"http://127.0.0.1:{port}",
                                        "--viewers", str(args.viewers)], stdout=subprocess.PIPE, text=True)
            assert viewers.stdout is not None
            viewers.stdout.readline()  # "ready": the first live update arrived
        load0 = bp.loadavg()
        cpu0, t0 = cpu_seconds(ui), time.monotonic()
        try:
            r = bp.pipeline_run(work, pkg, broker, size, args.frames, 0.1, m, 0, args.timeout)
        finally:
            ui_cpu, seen = None, {"updates": 0, "images": 0}
            if ui is not None and viewers is not None:
                ui_cpu = round((cpu_seconds(ui) - cpu0) / (time.monotonic() - t0), 3)
                viewers.terminate()  # SIGTERM: it prints what it saw and exits
                seen = json.loads(viewers.communicate(timeout=15)[0] or "{}") or seen
                ui.terminate()
                ui.wait(15)
        row = {"page": "open" if open_page else "closed", "fps": r["fps"], "loadavg": [load0, bp.loadavg()], "ui_cpu_share": ui_cpu,
               "updates_seen": seen["updates"], "images_fetched": seen["images"]}
        runs.append(row)
        bp.log(f"page {row['page']}: {r['fps']} parts/s, viewer updates {row['updates_seen']}, "
               f"images {row['images_fetched']}, page process CPU {ui_cpu} core(s) during the run")
        return float(r["fps"] or 0)

    try:
        closed = [run(False)]
        ratios = []
        for _ in range(args.rounds):
            opened = run(True)
            closed.append(run(False))
            ratios.append(opened / ((closed[-2] + closed[-1]) / 2))
    finally:
        broker.kill()
    summary = {"size": args.size, "frames": args.frames, "viewers": args.viewers, **bp.machine_row(),
               "ratios": [round(x, 3) for x in ratios], "min_ratio": round(min(ratios), 3),
               "median_ratio": round(statistics.median(ratios), 3), "target": 0.95,
               "met": min(ratios) >= 0.95, "runs": runs}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
