#!/usr/bin/env python3
"""Outbox ceiling: results stored per second by the whole station with a trivial model, group commit off vs on.

    .venv/bin/python scripts/bench_outbox.py [--parts N] [--rounds R] [--size WxH] [--json FILE]

The real pipeline (edge.daemon.run_pipeline, in-process) with the tiny OpenVINO package of the tests
(microseconds per frame, so the pipeline's own cost shows), a synthetic source at fps 0 (parts as fast
as the pipeline takes them), evidence off, and a real Mosquitto with mqtt.no_subscribers: deliver (no
consumer). Rounds alternate off, on, off, on... in one run so both see the same machine and load.
"off" is outbox.group_commit_max 1 (one transaction and fsync per result, as before group commit),
"on" the configured group (default 64 results, 2 ms). Rate = rows stored / (last store - first store),
counted at Outbox.add_many; "acked/s" is the same for PUBACKs (the MQTT sender's side).
Target: >= 1,500 results/s with grouping on. Needs `mosquitto`; bounded by --timeout per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge.config import validate_config  # noqa: E402
from edge.daemon import run_pipeline  # noqa: E402
from edge.inference import Inferencer  # noqa: E402
from edge.mqtt import MqttSink  # noqa: E402
from edge.outbox import Outbox  # noqa: E402
from edge.sources.synthetic import synth_part  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.daemon_proc import station  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_pipeline import machine_row  # noqa: E402
from thread_cpu import ThreadCpu  # noqa: E402


def machine() -> dict[str, Any]:
    return {**machine_row(), "python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version}


class Probe:
    """Counts rows stored (Outbox.add_many) and rows acked (MqttSink._acked) with their times."""

    def __init__(self) -> None:
        self.stored = self.groups = self.acked = 0
        self.first_store = self.last_store = self.first_ack = self.last_ack = 0.0
        self._orig = (Outbox.add_many, MqttSink._acked, Outbox.add)

    def stored_now(self, n: int) -> None:
        now = time.monotonic()
        self.first_store = self.first_store or now
        self.last_store = now
        self.stored += n
        self.groups += 1

    def __enter__(self) -> Probe:
        probe = self
        orig_add_many, orig_acked, orig_add = self._orig

        def add_many(ob: Outbox, items: Any) -> list[bool | None]:
            out = orig_add_many(ob, items)
            probe.stored_now(sum(1 for a in out if a))
            return out

        def add(ob: Outbox, *a: Any, **kw: Any) -> bool:  # the code before group commit stored with add()
            out = orig_add(ob, *a, **kw)
            probe.stored_now(int(out))
            return out

        def _acked(sink: MqttSink, seqs: list[int]) -> None:
            orig_acked(sink, seqs)
            now = time.monotonic()
            probe.first_ack = probe.first_ack or now
            probe.last_ack = now
            probe.acked += len(seqs)

        Outbox.add_many = add_many  # type: ignore[method-assign]
        MqttSink._acked = _acked  # type: ignore[method-assign]
        Outbox.add = add  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Outbox.add_many, MqttSink._acked, Outbox.add = self._orig  # type: ignore[method-assign]


def bare_model(pkg: Path, size: tuple[int, int], count: int) -> dict[str, Any]:
    """The same trivial model alone (Inferencer.submit, same settings and frames as the rounds): the
    reference the pipeline's ceiling cannot pass, and its CPU per frame."""
    rng = np.random.default_rng(1)
    frames = [synth_part(size[1], size[0], i % 10 == 0, rng) for i in range(32)]
    inf = Inferencer(pkg, num_requests=2, threads=1)
    done = [0]

    def cb(prob: Any, err: Any, ud: Any, part: Any = None) -> None:
        done[0] += 1

    for f in frames:  # warm-up
        inf.submit(f, None, cb)
    inf.wait_all()
    t0, c0 = time.monotonic(), time.process_time()
    for i in range(count):
        inf.submit(frames[i % len(frames)], None, cb)
    inf.wait_all()
    dt = time.monotonic() - t0
    return {"frames": count, "fps": round(count / dt, 1),
            "cpu_ms_per_frame": round((time.process_time() - c0) * 1000 / count, 3),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def rate(n: int, t0: float, t1: float) -> float | None:
    return round(n / (t1 - t0), 1) if n > 1 and t1 > t0 else None


def one_round(work: Path, pkg: Path, broker: Broker, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    state = work / f"state-{mode}"
    shutil.rmtree(state, ignore_errors=True)
    w, h = args.size
    group = ({"group_commit_max": 1} if mode == "off" else {} if mode == "default" else
             {"group_commit_max": args.group_max, "group_commit_ms": args.group_ms})
    data = station(work, pkg, broker, {"type": "synthetic", "width": w, "height": h, "fps": 0, "count": args.parts,
                                       "defect_rate": 0.1, "seed": 1, "stop_at_end": True},
                   model={"num_requests": 2, "threads": 1}, evidence={"enabled": False},
                   outbox={"max_events": max(1000, 2 * args.parts), **group},
                   pipeline={"drain_timeout_s": 60}, state_dir=str(state),
                   mqtt={"no_subscribers": "deliver"})  # no consumer: a PUBACK 0x10 counts as delivered
    cfg = validate_config(data)
    stop = threading.Event()
    code: list[int] = []
    load = [round(x, 2) for x in os.getloadavg()]
    with Probe() as probe, ThreadCpu() as cpu:
        t = threading.Thread(target=lambda: code.append(run_pipeline(cfg, stop)), name="main-loop", daemon=True)
        t0, c0 = time.monotonic(), time.process_time()
        t.start()
        t.join(args.timeout)
        if t.is_alive():
            stop.set()
            t.join(60)
            raise TimeoutError(f"round {mode} did not finish in {args.timeout} s")
        process_ms = round((time.process_time() - c0) * 1000 / args.parts, 3)
    return {"mode": mode, "group_commit_max": group.get("group_commit_max"), "parts": args.parts,
            "stored": probe.stored, "transactions": probe.groups,
            "rows_per_transaction": round(probe.stored / probe.groups, 2) if probe.groups else None,
            "stored_per_s": rate(probe.stored, probe.first_store, probe.last_store),
            "acked": probe.acked, "acked_per_s": rate(probe.acked, probe.first_ack, probe.last_ack),
            "cpu_ms_per_part": process_ms, "cpu_ms_per_part_by_thread": cpu.per_name(args.parts),
            "wall_s": round(time.monotonic() - t0, 2), "exit_code": code[0] if code else None,
            "loadavg_before": load, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=5000, help="parts per round (default 5000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode, interleaved off/on (default 3)")
    ap.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(64, 64),
                    help="synthetic frame WxH (default 64x64: one tile of the tiny model)")
    ap.add_argument("--group-max", type=int, default=64, help="outbox.group_commit_max when on (default 64)")
    ap.add_argument("--group-ms", type=float, default=2.0, help="outbox.group_commit_ms when on (default 2)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["off", "on"],
                    help="modes in each round, in order (default off,on; 'on' alone to profile it; 'default' sets "
                         "no group fields: the tree's own default, e.g. a checkout from before group commit)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per round before giving up")
    ap.add_argument("--json", type=Path, help="write the results here (default <work>/bench_outbox.json)")
    ap.add_argument("--work", type=Path, help="work folder (default a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_outbox-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, python {info['python']}, sqlite {info['sqlite']}; "
          f"{args.parts} parts/round at {args.size[0]}x{args.size[1]}, {args.rounds} rounds per mode", flush=True)
    pkg = make_tiny_package(work / "pkg")
    broker = Broker(work / "broker").start()
    rows: list[dict[str, Any]] = []
    bare = [bare_model(pkg, args.size, args.parts)]
    print(f"bare model before: {bare[0]['fps']} frames/s, cpu {bare[0]['cpu_ms_per_frame']} ms/frame, "
          f"load {bare[0]['loadavg']}", flush=True)
    try:
        for r in range(args.rounds):
            for mode in args.modes:
                row = {"round": r + 1, **one_round(work, pkg, broker, mode, args)}
                rows.append(row)
                print(f"round {row['round']} {mode:>3}: {row['stored_per_s']} stored/s "
                      f"({row['rows_per_transaction']} rows/transaction), {row['acked_per_s']} acked/s, "
                      f"{row['stored']}/{row['parts']} stored, load {row['loadavg_before']}; "
                      f"cpu {row['cpu_ms_per_part']} ms/part: {row['cpu_ms_per_part_by_thread']}", flush=True)
    finally:
        broker.kill()
    bare.append(bare_model(pkg, args.size, args.parts))
    print(f"bare model after: {bare[1]['fps']} frames/s, cpu {bare[1]['cpu_ms_per_frame']} ms/frame, "
          f"load {bare[1]['loadavg']}", flush=True)
    summary: dict[str, Any] = {"bare_model_fps_mean": round((bare[0]["fps"] + bare[1]["fps"]) / 2, 1)}
    for mode in args.modes:
        xs = [r["stored_per_s"] for r in rows if r["mode"] == mode and r["stored_per_s"]]
        acks = [r["acked_per_s"] for r in rows if r["mode"] == mode and r["acked_per_s"]]
        summary[mode] = {"stored_per_s_median": statistics.median(xs) if xs else None,
                         "acked_per_s_median": statistics.median(acks) if acks else None}
    off, on = (summary.get(m, {}).get("stored_per_s_median") for m in ("off", "on"))
    summary["ratio_on_off"] = round(on / off, 2) if off and on else None
    summary["on_vs_bare_model"] = round(on / summary["bare_model_fps_mean"], 3) if on else None
    summary["target_1500_met"] = bool(on and on >= 1500)
    print(f"median stored/s: off {off}, on {on}, ratio {summary['ratio_on_off']} "
          f"(target >= 1500 with grouping on: {'met' if summary['target_1500_met'] else 'NOT met'}); "
          f"bare trivial model {summary['bare_model_fps_mean']} frames/s")
    out = args.json or work / "bench_outbox.json"
    out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                               "bare_model": bare, "rounds": rows, "summary": summary}, indent=2))
    print(f"json: {out}")
    lost = [r for r in rows if r["stored"] != r["parts"] or r["exit_code"] != 0]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
