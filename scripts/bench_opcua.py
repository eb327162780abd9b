#!/usr/bin/env python3
"""OPC UA handshake benchmark: what the PLC handshake costs on top of inspecting a part.

    .venv/bin/python scripts/bench_opcua.py [--model DIR] [--parts N] [--security basic256sha256|none]
        [--poll-ms 2] [--camera-fps 200] [--json FILE]

The real daemon (`python -m edge run`, synthetic camera as fast as the path takes frames, triggered
mode, a real Mosquitto) and the PLC simulator of the tests (tests/opcua/plc.py: asyncua client,
Basic256Sha256 SignAndEncrypt by default, cyclic reads every --poll-ms like a PLC task):

(a) latency     N sequential cycles: StartJob -> ResultsPending > 0 -> read Result -> Acknowledge.
                handshake = StartJob called -> Result read by the PLC (PLC clock; the Acknowledge after it
                is in the parts/s figures). Reported p50/p99 of
                handshake, of handshake minus the part's inference time (Result.InferenceMs: what the issue's
                "overhead" means), and of handshake minus the station's own trigger -> result time
                (Result.ResultTime - TriggerTime: the OPC UA transport alone - method call, wake-up, reads).
(b) parts/s     the PLC cycling as fast as it can (one job at a time), the PLC keeping opcua.max_jobs jobs
                queued (acknowledging as results come), and the same station free-running (pipeline.mode
                free_run, synthetic count N, first to last MQTT result).

Default model: the tiny package of the tests (inference in microseconds: the figures are the overhead).
Prints machine, cores and load average; everything is bounded (--timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.opcua.certs import make_station_certs  # noqa: E402
from tests.broker import Broker, Subscriber, free_port  # noqa: E402
from tests.daemon_proc import BASE, Daemon, station, write_config  # noqa: E402
from tests.opcua.plc import Plc, connect_when_up  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 2), "p99": round(pct(values, 99), 2), "mean": round(statistics.fmean(values), 2)}


async def latency_run(plc: Plc, n: int, prefix: str) -> dict[str, Any]:
    handshake, minus_inf, transport, inference = [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        status, text = await plc.start_job(f"{prefix}-{i:05d}")
        if status != 0:
            raise RuntimeError(f"StartJob refused: {status} {text}")
        r = await plc.wait_result()
        ms = (time.perf_counter() - t0) * 1000  # StartJob called -> the PLC has read the result
        await plc.acknowledge(r["Counter"])
        station_ms = (r["ResultTime"] - r["TriggerTime"]).total_seconds() * 1000
        handshake.append(ms)
        inference.append(r["InferenceMs"])
        minus_inf.append(ms - r["InferenceMs"])
        transport.append(ms - station_ms)
    return {"cycles": n, "handshake_ms": summary(handshake), "inference_ms": summary(inference),
            "handshake_minus_inference_ms": summary(minus_inf), "opcua_transport_ms": summary(transport)}


async def queued_run(plc: Plc, n: int, depth: int) -> float:
    """Keep `depth` jobs in the station; acknowledge each result as it shows. Parts per second."""
    started = done = 0
    t0 = time.perf_counter()
    while done < n:
        while started < n and started - done < depth:
            status, _ = await plc.start_job(f"q-{started:05d}")
            if status != 0:
                break  # Busy: results wait for acknowledgement
            started += 1
        r = await plc.wait_result()
        await plc.acknowledge(r["Counter"])
        done += 1
    return n / (time.perf_counter() - t0)


def free_run(tmp: Path, pkg: Path, broker: Broker, n: int) -> float:
    sub = Subscriber(broker, [f"{BASE}/result"])
    data = station(tmp / "free", pkg, broker, {"type": "synthetic", "fps": 0, "count": n, "pool": 8},
                   mqtt={"no_subscribers": "deliver"}, evidence={"enabled": False})
    daemon = Daemon(write_config(tmp / "free.yaml", data), tmp / "free.log")
    try:
        daemon.wait(600)
    finally:
        daemon.kill()
    arrivals = sub.messages
    sub.close()
    if len(arrivals) < n:
        raise RuntimeError(f"free run: {len(arrivals)} of {n} results")
    ts = sorted(json.loads(m.payload)["created_ts"] for m in arrivals)
    return (n - 1) / (ts[-1] - ts[0])


async def plc_runs(url: str, certs: Path | None, n: int, depth: int, poll_s: float) -> dict[str, Any]:
    plc = await connect_when_up(url, certs, poll_s=poll_s)
    try:
        await plc.wait_state(1, 60)
        await latency_run(plc, 20, "warm")  # warm-up: first compiled requests, first sessions
        out = await latency_run(plc, n, "lat")
        t0 = time.perf_counter()
        for i in range(n):
            await plc.cycle(f"fast-{i:05d}")
        out["plc_cycling_parts_per_s"] = round(n / (time.perf_counter() - t0), 1)
        out["plc_queued_parts_per_s"] = round(await queued_run(plc, n, depth), 1)
        return out
    finally:
        await plc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model package (default: the tests' tiny package)")
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--security", choices=["basic256sha256", "none"], default="basic256sha256")
    ap.add_argument("--poll-ms", type=float, default=2.0, help="PLC cyclic read period")
    ap.add_argument("--max-jobs", type=int, default=4)
    ap.add_argument("--camera-fps", type=float, default=200.0, help="synthetic camera rate in triggered mode (a "
                    "trigger waits for the next frame: up to 1/fps)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # the client's own certificate has no host name
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as d:
        tmp = Path(d)
        pkg = args.model or make_tiny_package(tmp / "pkg")
        broker = Broker(tmp / "broker").start()
        port = free_port()
        section: dict[str, Any] = {"enabled": True, "endpoint": f"opc.tcp://127.0.0.1:{port}/edge/",
                                   "max_jobs": args.max_jobs}
        certs = None
        if args.security == "none":
            section.update(security_policy="None", allow_anonymous=True)
        else:
            paths = make_station_certs(tmp / "certs", ["plc"], ["127.0.0.1"])
            section.update({k: str(v) for k, v in paths.items()})
            certs = tmp / "certs/clients/plc"
        data = station(tmp / "plc", pkg, broker, {"type": "synthetic", "fps": args.camera_fps, "count": 0, "pool": 8},
                       pipeline={"mode": "triggered", "trigger_max_age_s": 0},
                       mqtt={"no_subscribers": "deliver"}, evidence={"enabled": False}, opcua=section)
        load0 = os.getloadavg()
        daemon = Daemon(write_config(tmp / "plc.yaml", data), tmp / "plc.log")
        try:
            result = asyncio.run(asyncio.wait_for(
                plc_runs(section["endpoint"], certs, args.parts, args.max_jobs, args.poll_ms / 1000), args.timeout))
        finally:
            daemon.kill()
        result["free_running_parts_per_s"] = round(free_run(tmp, pkg, broker, max(args.parts, 300)), 1)
        broker.stop()
    result.update(security=args.security, poll_ms=args.poll_ms, camera_fps=args.camera_fps, max_jobs=args.max_jobs,
                  model=str(args.model or "tiny test package"), cpu=platform.processor() or platform.machine(),
                  cores=os.cpu_count(), loadavg_start=[round(x, 2) for x in load0],
                  loadavg_end=[round(x, 2) for x in os.getloadavg()])
    result["plc_cycling_vs_free_running"] = round(result["plc_cycling_parts_per_s"] /
                                                  result["free_running_parts_per_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
