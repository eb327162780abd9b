#!/usr/bin/env python3
"""Pipeline benchmark: the whole station against the bare model on good and bad days, at the default size and at
5 MP; memory over a long run; zero loss under faults.

    .venv/bin/python scripts/bench_pipeline.py [--model MODEL_DIR] [--frames N] [--big-frames N] [--quick]
        [--fail-rates 0,0.1,1] [--sizes default,2448x2048] [--rss-size WxH] [--set SECTION.FIELD=VALUE] [--json FILE]

(a) throughput  synthetic parts (source `pool`: copies of pre-generated parts, as a camera hands over new
                buffers) -> daemon pipeline (edge.daemon.run_pipeline, in-process, evidence ON as by default) ->
                MQTT publish acknowledged by a real Mosquitto, against the bare model's async throughput
                (edge.inference.Inferencer.submit: preprocess, tiles, stitch) on the very same frames with the
                same OpenVINO settings. One row per frame size x fail rate; per size the runs alternate bare,
                pipeline 0 %, bare, pipeline 10 %, bare, pipeline 100 %, bare (a row's reference is the mean of
                the bare runs around it). Target >= 95 %. Every row carries cpu model, cores, load average at
                its start and end.
                Fail rates do not depend on what a model thinks of synthetic frames: bench_failrate.py wraps
                edge.flow.postprocess_map (as AckProbe wraps MqttSink methods). The real postprocess runs on the
                real map (its cost is paid), then exactly `rate` of the parts, spread evenly, fail with one
                disc-shaped region (radius min(h, w)/40, ~8,000 px at 5 MP) and its full-frame mask; the others
                pass with no region. Rules, event, outbox, MQTT and the evidence writer (frame + overlay + mask
                PNG, thinning) run as in production. Not measured: the postprocess cost of the map a real
                defect would give.
                Latency = capture (frame handed over by the source) -> PUBACK, p50/p95/p99, at full speed
                (queueing included) and paced at half the measured throughput (a line at 50 % load); the paced
                p99 is compared with the bare model's time for one frame (one frame at a time, median).
                Target (5 MP) <= 2x.
(b) memory      the real daemon (`python -m edge run`, synthetic source, the same fail-rate wrapper through a
                sitecustomize.py) over --rss-frames frames (10,000) at --rss-size, stopped after --rss-seconds:
                RSS (psutil) sampled; max <= 250 MB, growth < 5 % from the 10-20 % mark to the last 10 %.
(c) zero loss   the real daemon on a hot folder fed --loss-parts parts (2,000) while a TCP proxy cuts the
                broker connection three times and the daemon is SIGKILLed and restarted once; every part
                id must reach a subscriber (persistent session), duplicates only with the same event_id.

Default model: the tiny OpenVINO package of the tests (built on the fly, no torch). It runs in
microseconds, so it measures the pipeline's own overhead; pass --model with an exported package
for the real ratio. Uses the test helpers (tests/broker.py, tests/faults/) and needs `mosquitto`.
Everything is bounded (--timeout, default 3600 s): the script stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from edge.config import SyntheticSourceConfig, validate_config  # noqa: E402
from edge.daemon import run_pipeline  # noqa: E402
from edge.inference import Inferencer  # noqa: E402
from edge.mqtt import MqttSink  # noqa: E402
from edge.sources.synthetic import SyntheticSource  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.daemon_proc import Daemon, station, write_config  # noqa: E402
from tests.faults.harness import BASE, Feeder, PersistentSubscriber, persistent_broker, tally  # noqa: E402
from tests.faults.tcp_proxy import TcpProxy  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_failrate import ForcedVerdicts  # noqa: E402
from thread_cpu import ThreadCpu  # noqa: E402

T0 = time.monotonic()
CAPTURE_TS = re.compile(rb'"capture_ts":([0-9.]+)')
TIMINGS = re.compile(rb'"timings_ms":\s*(\{[^}]*\})')  # the event's own stage times
TAGS = re.compile(rb'"(verdict|evidence_status)":"([a-z]+)"')
BIG = "2448x2048"  # 5 MP mono, an industrial camera's frame
OVERRIDES: dict[str, dict[str, Any]] = {}  # --set: station config sections merged into every run
POOL = 8  # distinct good and defective parts of the synthetic source (copies are handed over)
STARTUP_PARTS = 5  # paced latency is also reported without the first parts (the bare frame time skips 2 warm-up frames)
_children: list[Any] = []  # Daemon / Broker objects to kill on a timeout


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.percentile(np.asarray(xs), q))


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def machine_row() -> dict[str, Any]:
    """What every result row carries: the cpu model and its cores."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count()}


def machine() -> dict[str, Any]:
    import openvino as ov

    return {**machine_row(), "loadavg_start": loadavg(),
            "python": platform.python_version(), "openvino": ov.__version__, "opencv": cv2.__version__,
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)}


# -- frames ---------------------------------------------------------------------------------------------
def pool_size(size: tuple[int, int]) -> int:
    """Distinct parts per kind: 8, but at most ~8 MB of them (at 5 MP one good and one defective part,
    10 MB, about a camera driver's buffer ring; the pool is in the measured RSS)."""
    return max(1, min(POOL, (8 << 20) // (size[0] * size[1])))


def synthetic(size: tuple[int, int], count: int, fps: float) -> dict[str, Any]:
    """The source of every run: pooled synthetic parts (copies per part, like a camera's new buffers)."""
    return {"type": "synthetic", "width": size[0], "height": size[1], "fps": fps, "count": count,
            "defect_rate": 0.1, "seed": 0, "stop_at_end": True, "pool": pool_size(size)}


def make_frames(size: tuple[int, int]) -> list[np.ndarray]:
    """The very frames the pipeline's synthetic source hands over (same class, config and seed)."""
    src = SyntheticSource(SyntheticSourceConfig(**synthetic(size, 2 * POOL, 0)))
    src.open()
    frames = [f.image for f in iter(lambda: src.read(1.0), None) if f.image is not None]
    assert len(frames) == 2 * POOL
    return frames


# -- (a) bare model ------------------------------------------------------------------------------------
def bare_throughput(pkg: Path, frames: list[np.ndarray], count: int, m: dict[str, Any]) -> dict[str, Any]:
    inf = Inferencer(pkg, num_requests=m["num_requests"], threads=m["threads"] or None, hint=m["hint"])
    done = [0]
    lock = threading.Lock()

    def cb(prob: Any, err: Any, ud: Any, part: Any = None) -> None:
        with lock:
            done[0] += 1

    for f in frames[: 2 * inf.num_requests]:  # warm-up
        inf.submit(f, None, cb)
    inf.wait_all()
    done[0] = 0
    with ThreadCpu() as cpu:
        t0 = time.monotonic()
        for i in range(count):
            inf.submit(frames[i % len(frames)], None, cb)
        inf.wait_all()
        dt = time.monotonic() - t0
    assert done[0] == count, (done[0], count)
    inf.close()
    return {"frames": count, "seconds": round(dt, 3), "fps": round(count / dt, 2), "num_requests": inf.num_requests,
            "cpu_ms_per_frame_by_thread": cpu.per_name(count)}


def bare_frame_time(pkg: Path, frames: list[np.ndarray], count: int, m: dict[str, Any]) -> dict[str, Any]:
    """The bare model's time for one frame: submit (preprocess) -> stitched map, one frame at a time."""
    inf = Inferencer(pkg, num_requests=m["num_requests"], threads=m["threads"] or None, hint=m["hint"])
    done = threading.Event()
    took: list[float] = []
    for i in range(count + 2):  # two warm-up frames
        done.clear()
        t0 = time.monotonic()
        inf.submit(frames[i % len(frames)], None, lambda prob, err, ud, part=None: done.set())
        if not done.wait(60):
            raise TimeoutError("bare model: one frame took over 60 s")
        if i >= 2:
            took.append(time.monotonic() - t0)
    inf.close()
    return {"frames": count, "p50_ms": ms(pct(took, 50)), "p99_ms": ms(pct(took, 99)), "max_ms": ms(max(took))}


# -- (a) the pipeline in-process, with PUBACK times ------------------------------------------------------
class AckProbe:
    """Wraps MqttSink._publish/_acked (class level) to time capture -> PUBACK per event."""

    def __init__(self) -> None:
        self.capture: dict[int, float] = {}
        self.latency: list[float] = []
        self.by_capture: list[tuple[float, float, dict[str, float]]] = []  # (capture time, -> PUBACK, stages)
        self.first_capture = float("inf")
        self.last_ack = 0.0
        self.acked = 0
        self.tags: dict[str, int] = {}  # verdict / evidence_status counts of the published events
        self.stages: dict[int, dict[str, float]] = {}  # the event's timings_ms, by outbox seq
        self.stage_rows: list[dict[str, float]] = []  # ... + "publish" (result -> PUBACK), per acked event
        self._orig = (MqttSink._publish, MqttSink._acked)

    def __enter__(self) -> AckProbe:
        probe = self
        orig_publish, orig_acked = self._orig

        def _publish(sink: MqttSink, row: Any, inflight: Any) -> bool:
            m = CAPTURE_TS.search(row.payload)
            if m:
                c = float(m.group(1))
                probe.capture[row.seq] = c
                probe.first_capture = min(probe.first_capture, c)
                t = TIMINGS.search(row.payload)
                if t:
                    probe.stages[row.seq] = json.loads(t.group(1))
                for tag in TAGS.findall(row.payload):
                    key = tag[0].decode() + "=" + tag[1].decode()
                    probe.tags[key] = probe.tags.get(key, 0) + 1
            return orig_publish(sink, row, inflight)

        def _acked(sink: MqttSink, seqs: list[int]) -> None:
            now = time.time()
            for s in seqs:
                c = probe.capture.pop(s, None)
                if c is not None:
                    probe.latency.append(now - c)
                    st = probe.stages.pop(s, None)
                    if st and "capture_to_result" in st:
                        st = {**st, "publish": (now - c) * 1000 - st["capture_to_result"]}
                        probe.stage_rows.append(st)
                    probe.by_capture.append((c, now - c, st or {}))
            probe.acked += len(seqs)
            probe.last_ack = now
            orig_acked(sink, seqs)

        MqttSink._publish = _publish  # type: ignore[method-assign,assignment]
        MqttSink._acked = _acked  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        MqttSink._publish, MqttSink._acked = self._orig  # type: ignore[method-assign]


def pipeline_run(work: Path, pkg: Path, broker: Broker, size: tuple[int, int], count: int, fail_rate: float,
                 m: dict[str, Any], fps: float, timeout: float) -> dict[str, Any]:
    """The daemon pipeline in-process on `count` synthetic parts (fps 0 = as fast as it takes them), with
    `fail_rate` of them forced to fail (bench_failrate.py); evidence on, as configured by default."""
    state = work / f"state-{size[0]}x{size[1]}-{fail_rate}-{'paced' if fps else 'full'}"
    shutil.rmtree(state, ignore_errors=True)
    data = station(work, pkg, broker, synthetic(size, count, fps),
                   model={"num_requests": m["num_requests"], "threads": m["threads"], "hint": m["hint"]},
                   pipeline={"drain_timeout_s": 60}, state_dir=str(state),
                   # no consumer in this run: a PUBACK 0x10 counts as delivered (the default keeps and retries)
                   mqtt={"no_subscribers": "deliver"})
    cfg = validate_config(overridden(data))
    stop = threading.Event()
    code: list[int] = []
    forced = ForcedVerdicts(fail_rate).install()
    try:
        with AckProbe() as probe, ThreadCpu() as cpu:
            t = threading.Thread(target=lambda: code.append(run_pipeline(cfg, stop)), name="pipeline", daemon=True)
            t.start()
            deadline = time.monotonic() + timeout
            last = 0.0
            while t.is_alive() and time.monotonic() < deadline:
                t.join(0.5)
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    log(f"    pipeline{' (paced)' if fps else ''}: {probe.acked}/{count} acknowledged")
            if t.is_alive():
                stop.set()
                t.join(60)
                raise TimeoutError("pipeline run did not finish in time")
    finally:
        forced.uninstall()
    dt = probe.last_ack - probe.first_capture
    lat = probe.latency
    return {"frames": count, "acknowledged": probe.acked, "exit_code": code[0] if code else None,
            "seconds": round(dt, 3), "fps": round(probe.acked / dt, 2) if dt > 0 else None,
            "events": dict(sorted(probe.tags.items())),
            "latency_ms": {"p50": ms(pct(lat, 50)), "p95": ms(pct(lat, 95)), "p99": ms(pct(lat, 99)),
                           "max": ms(max(lat) if lat else None), "n": len(lat)},
            "stages_ms": stage_percentiles(probe.stage_rows), "slowest": slowest(probe.by_capture),
            "cpu_ms_per_part_by_thread": cpu.per_name(max(probe.acked, 1)),
            "latency_after_start_ms": after_start(probe.by_capture)}


def after_start(by_capture: list[tuple[float, float, dict[str, float]]], skip: int = STARTUP_PARTS) -> dict[str, Any]:
    """Capture -> PUBACK percentiles without the first `skip` parts of the run: the steady state, as the bare
    frame time is taken after its warm-up frames. Reported beside the whole run's figures, never instead."""
    lat = [x[1] for x in sorted(by_capture)[skip:]]
    return {"skipped_first": skip, "p50": ms(pct(lat, 50)), "p99": ms(pct(lat, 99)),
            "max": ms(max(lat) if lat else None), "n": len(lat)}


def slowest(by_capture: list[tuple[float, float, dict[str, float]]], n: int = 3) -> list[dict[str, Any]]:
    """The `n` slowest parts with their place in the run (0 = first captured: start-up or steady state?)
    and their stage times."""
    runs = sorted(by_capture, key=lambda r: r[0])
    ranked = sorted(range(len(runs)), key=lambda i: -runs[i][1])[:n]
    return [{"index": i, "ms": round(runs[i][1] * 1000, 1), "stages": {k: round(v, 1) for k, v in runs[i][2].items()}}
            for i in ranked]


def stage_percentiles(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each stage of the events' timings_ms (queue, inference, postprocess, capture_to_result)
    and of publish (result -> PUBACK: outbox commit, MQTT): where a slow part's time went."""
    keys = sorted({k for r in rows for k in r})
    return {k: {"p50": round(float(np.percentile(v, 50)), 1), "p99": round(float(np.percentile(v, 99)), 1)}
            for k in keys if (v := [r[k] for r in rows if k in r])}


def overridden(data: dict[str, Any]) -> dict[str, Any]:
    """A station config with the --set overrides merged in."""
    return {**data, **{k: {**data.get(k, {}), **v} for k, v in OVERRIDES.items()}}


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def throughput_size(work: Path, pkg: Path, broker: Broker, size: tuple[int, int], count: int, rates: list[float],
                    m: dict[str, Any], paced_s: float, timeout: float) -> list[dict[str, Any]]:
    """One row per fail rate at one frame size: bare runs before and after each pipeline run (their mean is
    that row's reference), so the rows of one size are side by side; then paced runs for the latency."""
    frames = make_frames(size)
    cpu = machine_row()
    single = bare_frame_time(pkg, frames, max(10, min(50, count // 10)), m)
    log(f"  {size[0]}x{size[1]}: bare model, one frame at a time: {single}")
    bare = [bare_throughput(pkg, frames, count, m)]
    log(f"    bare model: {bare[-1]['fps']} frames/s")
    rows: list[dict[str, Any]] = []
    for rate in rates:
        load0 = loadavg()
        full = pipeline_run(work, pkg, broker, size, count, rate, m, 0, timeout)
        bare.append(bare_throughput(pkg, frames, count, m))
        ref = (bare[-2]["fps"] + bare[-1]["fps"]) / 2
        ratio = (full["fps"] or 0) / ref
        rows.append({"size": f"{size[0]}x{size[1]}", "fail_rate": rate, **cpu, "loadavg_start": load0,
                     "loadavg_end": loadavg(), "bare_before": bare[-2], "bare_after": bare[-1],
                     "bare_fps": round(ref, 2), "pipeline": full, "ratio": round(ratio, 3), "target": 0.95,
                     "met": ratio >= 0.95, "bare_frame": single})
        log(f"    fail {100 * rate:.0f} %: pipeline {full['fps']} vs bare {ref:.2f} frames/s = {100 * ratio:.1f} %, "
            f"events {full['events']}, capture->PUBACK p50/p99 {full['latency_ms']['p50']}/"
            f"{full['latency_ms']['p99']} ms at full speed; bare {bare[-1]['fps']} frames/s after")
        log(f"      CPU ms per part by thread: pipeline {full['cpu_ms_per_part_by_thread']}; "
            f"bare {bare[-1]['cpu_ms_per_frame_by_thread']}")
    for row in rows:
        rate_fps = max(0.5, round(0.5 * (row["pipeline"]["fps"] or 1.0), 1))
        n = max(10, min(count, int(rate_fps * paced_s)))
        paced = pipeline_run(work, pkg, broker, size, n, row["fail_rate"], m, rate_fps, timeout)
        p99, single_ms = paced["latency_ms"]["p99"], single["p50_ms"]
        row["paced"] = {**paced, "rate_fps": rate_fps}
        row["paced_p99_over_bare_frame"] = round(p99 / single_ms, 2) if p99 and single_ms else None
        row["latency_met"] = bool(p99 and single_ms and p99 <= 2 * single_ms)
        steady = paced["latency_after_start_ms"]["p99"]
        row["paced_p99_after_start_over_bare_frame"] = round(steady / single_ms, 2) if steady and single_ms else None
        log(f"    fail {100 * row['fail_rate']:.0f} % paced at {rate_fps}/s: capture->PUBACK p50/p99 "
            f"{paced['latency_ms']['p50']}/{p99} ms = {row['paced_p99_over_bare_frame']} x the bare frame "
            f"({single_ms} ms), events {paced['events']}")
        log(f"      without the first {STARTUP_PARTS} parts: p50/p99 {paced['latency_after_start_ms']['p50']}/{steady} ms "
            f"= {row['paced_p99_after_start_over_bare_frame']} x the bare frame")
        log("      stages p50/p99 ms: " + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in paced["stages_ms"].items()))
        log("      slowest parts (place in the run: ms, stages): " + "; ".join(
            f"#{w['index']}: {w['ms']} {w['stages']}" for w in paced["slowest"]))
    return rows


# -- (b) memory of the real daemon ------------------------------------------------------------------------
def failing_daemon_env(work: Path, fail_rate: float) -> dict[str, str]:
    """Environment for a daemon subprocess whose parts fail at `fail_rate` (bench_failrate.py), through a
    sitecustomize.py that Python imports at start-up from PYTHONPATH."""
    shim = work / "failrate-shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
                                           "import bench_failrate\nbench_failrate.install_from_env()\n")
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{shim}", "BENCH_FAIL_RATE": str(fail_rate)}


def rss_run(work: Path, pkg: Path, broker: Broker, size: tuple[int, int], frames: int, fail_rate: float,
            m: dict[str, Any], max_s: float, timeout: float) -> dict[str, Any]:
    """The real daemon on `frames` synthetic parts, `fail_rate` of them failing (evidence on); stopped by
    SIGTERM after `max_s` seconds if it has not finished by then (the result says how far it got)."""
    state = work / "state-rss"
    shutil.rmtree(state, ignore_errors=True)
    data = station(work, pkg, broker, synthetic(size, frames, 0),
                   model={"num_requests": m["num_requests"], "threads": m["threads"], "hint": m["hint"]},
                   pipeline={"drain_timeout_s": 60}, state_dir=str(state))
    cfg = write_config(work / "rss.yaml", overridden(data))
    sub = PersistentSubscriber(broker.host, broker.port, [f"{BASE}/result"])
    d = Daemon(cfg, work / "rss-daemon.log", env=failing_daemon_env(work, fail_rate))
    load0 = loadavg()
    cut = time.monotonic() + max_s
    stopped_early = False
    _children.append(d)
    proc = psutil.Process(d.proc.pid)
    samples: list[tuple[float, int, float]] = []  # (t, results so far, rss MB)
    hwm = 0.0
    deadline = time.monotonic() + timeout
    last = 0.0
    try:
        while d.proc.poll() is None and time.monotonic() < deadline:
            try:
                rss = proc.memory_info().rss / 2**20
                for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) / 1024)
            except (psutil.Error, OSError):
                break
            n = len(sub.results())
            samples.append((time.monotonic(), n, rss))
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log(f"    rss: {n}/{frames} frames, {rss:.1f} MB")
            if not stopped_early and time.monotonic() > cut:
                stopped_early = True
                log(f"    rss: {max_s:.0f} s are up at {n} frames: SIGTERM")
                d.signal(signal.SIGTERM)
            time.sleep(0.2)
        if d.proc.poll() is None:
            d.proc.kill()
            raise TimeoutError("rss run did not finish in time")
        code = d.wait(10)
        sub.wait_count(frames, 5 if stopped_early else 30)
    finally:
        sub.close()
        if d.proc.poll() is None:
            d.proc.kill()
    n_final = len(sub.results())
    reached = max((n for _, n, _ in samples), default=0)  # the share of the run is of what it reached
    warm = [r for _, n, r in samples if 0.10 * reached <= n <= 0.20 * reached]
    end = [r for _, n, r in samples if n >= 0.90 * reached]
    after_warm = statistics.median(warm) if warm else None
    at_end = statistics.median(end) if end else None
    growth = (at_end / after_warm - 1) if after_warm and at_end else None
    t_first = next((t for t, n, _ in samples if n > 0), None)
    t_last = samples[-1][0] if samples else None
    return {"frames": frames, "results": n_final, "stopped_after_s": max_s if stopped_early else None,
            "size": f"{size[0]}x{size[1]}", "fail_rate": fail_rate, **machine_row(), "loadavg_start": load0,
            "loadavg_end": loadavg(), "exit_code": code, "samples": len(samples),
            "rss_max_mb": round(max(r for _, _, r in samples), 1) if samples else None, "vm_hwm_mb": round(hwm, 1),
            "rss_after_warmup_mb": round(after_warm, 1) if after_warm else None,
            "rss_end_mb": round(at_end, 1) if at_end else None,
            "growth_pct": round(100 * growth, 2) if growth is not None else None,
            "daemon_fps": round(n_final / (t_last - t_first), 2) if t_first and t_last and t_last > t_first else None}


# -- (c) zero loss under faults -------------------------------------------------------------------------
def loss_run(work: Path, pkg: Path, size: tuple[int, int], parts: int, rate: float, m: dict[str, Any],  # noqa: PLR0915 - one scripted fault scenario, read top to bottom
             timeout: float) -> dict[str, Any]:
    broker = persistent_broker(work / "broker-loss").start()
    _children.append(broker)
    proxy = TcpProxy(broker.port).start()
    sub = PersistentSubscriber(broker.host, broker.port)
    inbox = work / "inbox-loss"
    shutil.rmtree(inbox, ignore_errors=True)
    inbox.mkdir()
    state = work / "state-loss"
    shutil.rmtree(state, ignore_errors=True)
    data = station(work, pkg, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                       "poll_interval_s": 0.05},
                   model={"num_requests": m["num_requests"], "threads": m["threads"], "hint": m["hint"]},
                   mqtt={"port": proxy.port, "keepalive": 5}, state_dir=str(state))
    cfg = write_config(work / "loss.yaml", data)
    w, h = size
    feeder = Feeder(inbox, parts, rate, size=(h, w)).start()
    d = Daemon(cfg, work / "loss-daemon0.log")
    _children.append(d)
    faults: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout

    feed_s = parts / rate
    t_feed = time.monotonic()
    last_fault = [t_feed]

    def wait_fed(share: float) -> None:
        """Until `share` of the feeding time has passed, and at least 4 s since the last fault ended."""
        due = max(t_feed + share * feed_s, last_fault[0] + 4.0)
        while time.monotonic() < min(due, deadline):
            time.sleep(0.05)

    def recovered_after(t: float) -> float | None:
        took = sub.recovery(t, min(60.0, max(1.0, deadline - time.monotonic())))
        return None if took is None else round(took, 3)

    try:
        for i, share in enumerate((0.15, 0.40, 0.65)):
            wait_fed(share)
            proxy.set_mode("cut")
            log(f"    loss: cut {i + 1}/3 at {len(feeder.ids())} parts fed, {len(sub.part_ids())} delivered")
            time.sleep(2.0)
            proxy.set_mode("pass")
            t_up = time.monotonic()
            faults.append({"fault": f"cut {i + 1} (2 s)", "recover_s": recovered_after(t_up)})
            last_fault[0] = time.monotonic()
        wait_fed(0.80)
        log(f"    loss: SIGKILL daemon at {len(feeder.ids())} parts fed, {len(sub.part_ids())} delivered")
        d.proc.kill()
        d.wait(10)
        time.sleep(0.5)
        d = Daemon(cfg, work / "loss-daemon1.log")
        _children.append(d)
        t_up = time.monotonic()
        faults.append({"fault": "daemon SIGKILL + restart (restart -> first delivery)",
                       "recover_s": recovered_after(t_up)})
        feeder.join(max(1.0, deadline - time.monotonic()))
        last = 0.0
        while time.monotonic() < deadline and not sub.wait_parts(feeder.ids, 1.0):
            if time.monotonic() - last > 5:
                last = time.monotonic()
                log(f"    loss: {len(sub.part_ids())}/{parts} delivered")
        time.sleep(1.0)  # late duplicates
        d.signal(signal.SIGTERM)
        code = d.wait(60)
    finally:
        feeder.stop()
        if d.proc.poll() is None:
            d.proc.kill()
        sub.close()
        proxy.close()
        broker.kill()
    entry = tally("2,000 parts, 3 connection cuts + 1 daemon SIGKILL", feeder.ids(), sub.results())
    entry.update({"faults": faults, "exit_code": code, "feed_rate": rate})
    return entry


# -- main ----------------------------------------------------------------------------------------------
def main() -> int:  # noqa: PLR0915 - argument parsing and the report of three benchmarks
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model package (default: the tiny test package, built now)")
    ap.add_argument("--frames", type=int, default=2000, help="frames per throughput run (a) at the default size")
    ap.add_argument("--big-frames", type=int, default=300, help="frames per throughput run (a) at other sizes")
    ap.add_argument("--fail-rates", default="0,0.1,1", help="comma list: shares of parts forced to fail in (a)")
    ap.add_argument("--sizes", default=f"default,{BIG}", help="comma list of WxH for (a); 'default' = --size")
    ap.add_argument("--paced-seconds", type=float, default=60, help="length of each paced latency run (a)")
    ap.add_argument("--rss-frames", type=int, default=10_000, help="frames for the memory run (b)")
    ap.add_argument("--rss-size", help="frame WxH of the memory run (b) (default: --size)")
    ap.add_argument("--rss-fail-rate", type=float, default=0.1, help="share of parts forced to fail in (b)")
    ap.add_argument("--rss-seconds", type=float, default=1800, help="stop the memory run (b) after this long")
    ap.add_argument("--loss-parts", type=int, default=2000, help="parts for the zero-loss run (c)")
    ap.add_argument("--size", help="default frame WxH (default: 2 x 1.5 tiles of the model)")
    ap.add_argument("--num-requests", type=int, default=0, help="OpenVINO infer requests (0 = optimal)")
    ap.add_argument("--threads", type=int, default=0, help="OpenVINO threads (0 = default)")
    ap.add_argument("--hint", default="THROUGHPUT", choices=["THROUGHPUT", "LATENCY"])
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run: (a) 500 frames, 60 at other "
                    "sizes, paced 15 s; (b) 1,500 frames, at most 120 s; (c) 300 parts")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: throughput,rss,loss")
    ap.add_argument("--json", type=Path, help="write the results here (default <work>/bench_pipeline.json)")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary folder, kept)")
    ap.add_argument("--timeout", type=float, default=3600, help="hard limit for the whole run, seconds")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="station config override for every daemon of (a) and (b), e.g. evidence.queue_mb=32 "
                    "(YAML value; repeatable)")
    args = ap.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        OVERRIDES.setdefault(section, {})[name] = yaml.safe_load(value)
    if args.quick:
        args.frames, args.rss_frames, args.loss_parts = min(args.frames, 500), min(args.rss_frames, 1500), \
            min(args.loss_parts, 300)
        args.big_frames, args.paced_seconds = min(args.big_frames, 60), min(args.paced_seconds, 15)
        args.rss_seconds = min(args.rss_seconds, 120)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.json or work / "bench_pipeline.json"

    def on_timeout() -> None:
        log(f"TIMEOUT after {args.timeout:.0f} s: stopping")
        for c in _children:
            with contextlib.suppress(Exception):
                c.proc.kill() if isinstance(c, Daemon) else c.kill()
        os._exit(3)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # runs the finally blocks: daemons and brokers are stopped

    signal.signal(signal.SIGTERM, on_signal)
    watchdog = threading.Timer(args.timeout, on_timeout)
    watchdog.daemon = True
    watchdog.start()

    pkg = args.model or make_tiny_package(work / "tiny-package")
    meta = json.loads((pkg / "package.json").read_text())
    tile = int(meta["input"]["tile"])
    size = parse_size(args.size) if args.size else (2 * tile, 3 * tile // 2)
    sizes = [size if v.strip() == "default" else parse_size(v) for v in args.sizes.split(",") if v.strip()]
    rates = [float(v) for v in args.fail_rates.split(",") if v.strip()]
    settings = {"num_requests": args.num_requests, "threads": args.threads, "hint": args.hint}
    result: dict[str, Any] = {
        "machine": machine(), "work": str(work),
        "model": {"path": str(pkg), "name": meta["name"], "version": meta["version"],
                  "precision": meta.get("precision"), "tile": tile, "tiny_test_package": args.model is None},
        "frame_size": f"{size[0]}x{size[1]}", "openvino_settings": settings, "config_overrides": OVERRIDES, "args": vars(args) | {"model": str(pkg)},
    }
    log(f"model {meta['name']} {meta['version']} ({meta.get('precision')}, tile {tile}) from {pkg}; "
        f"frames {size[0]}x{size[1]}; work {work}")
    log(f"machine: {result['machine']}")

    def save() -> None:
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2, default=str))

    broker = Broker(work / "broker").start()
    _children.append(broker)
    try:
        if "throughput" not in skip:
            rows: list[dict[str, Any]] = []
            result["throughput"] = rows
            for sz in sizes:
                count = args.frames if sz == size else args.big_frames
                log(f"(a) throughput and latency at {sz[0]}x{sz[1]}, {count} frames per run, fail rates {rates}")
                rows += throughput_size(work, pkg, broker, sz, count, rates, settings, args.paced_seconds,
                                        args.timeout / 4)
                save()
            log("(a) RESULT size fail% pipeline/bare ratio | p50/p99 capture->PUBACK full speed | paced p99 / "
                f"bare frame (without the first {STARTUP_PARTS} parts) | load start->end")
            for r in rows:
                p, q = r["pipeline"]["latency_ms"], r.get("paced", {}).get("latency_ms", {})
                log(f"    {r['size']:>10} {100 * r['fail_rate']:5.0f} % {r['pipeline']['fps']:8.2f} / "
                    f"{r['bare_fps']:8.2f} = {100 * r['ratio']:5.1f} % | {p['p50']}/{p['p99']} ms | "
                    f"{q.get('p99')} ms / {r['bare_frame']['p50_ms']} ms = {r.get('paced_p99_over_bare_frame')} x "
                    f"({r.get('paced_p99_after_start_over_bare_frame')} x) | "
                    f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]}")
        if "rss" not in skip:
            rsz = parse_size(args.rss_size) if args.rss_size else size
            log(f"(b) resident memory of the daemon over {args.rss_frames} frames at {rsz[0]}x{rsz[1]}, "
                f"{100 * args.rss_fail_rate:.0f} % failing, at most {args.rss_seconds:.0f} s")
            rss = rss_run(work, pkg, broker, rsz, args.rss_frames, args.rss_fail_rate, settings, args.rss_seconds,
                          timeout=args.timeout / 2)
            rss["met"] = bool(rss["rss_max_mb"] is not None and rss["rss_max_mb"] <= 250
                              and rss["growth_pct"] is not None and rss["growth_pct"] < 5)
            result["rss"] = rss
            log(f"(b) RESULT max {rss['rss_max_mb']} MB (VmHWM {rss['vm_hwm_mb']}), after warm-up "
                f"{rss['rss_after_warmup_mb']} MB -> end {rss['rss_end_mb']} MB = {rss['growth_pct']} % "
                f"(targets <= 250 MB, < 5 %); {rss['results']}/{rss['frames']} results at {rss['daemon_fps']}/s")
            save()
        if "loss" not in skip:
            first: dict[str, Any] = next((r for r in result.get("throughput", []) if r["size"] == f"{size[0]}x{size[1]}"), {})
            fps = first.get("pipeline", {}).get("fps") or result.get("rss", {}).get("daemon_fps") or 40.0
            # Parts must keep coming through all four faults (>= 4 s apart): feed for at least 40 s.
            rate = round(min(50.0, 0.6 * fps, args.loss_parts / 40.0), 1)
            log(f"(c) zero loss: {args.loss_parts} parts at {rate}/s, 3 cuts + 1 daemon SIGKILL")
            loss = loss_run(work, pkg, size, args.loss_parts, rate, settings, timeout=args.timeout / 2)
            loss["met"] = loss["missing"] == 0 and loss["duplicates_with_other_event_id"] == 0
            result["zero_loss"] = loss
            log(f"(c) RESULT generated {loss['generated']} delivered {loss['delivered']} missing {loss['missing']} "
                f"duplicates {loss['duplicates']} (other event_id: {loss['duplicates_with_other_event_id']}); "
                f"faults {loss['faults']}")
            save()
    finally:
        broker.kill()
        save()
        watchdog.cancel()
    log(f"wrote {out_json}")
    met = [v.get("met") for k, v in result.items() if isinstance(v, dict) and "met" in v]
    met += [r["met"] for r in result.get("throughput", [])]
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
