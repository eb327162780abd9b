"""Timing helpers shared by `training bench` and the export's short speed report.

Side by side or not at all: this machine is shared and noisy, so engines are timed in rotating
rounds (`interleaved_latency`), each round paying its own warm-up call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from tqdm import tqdm

from edge.inference import compile_config, core


def compile_ov(xml: Path, threads: int, hint: str = "LATENCY", precision: str | None = None) -> ov.CompiledModel:
    """`precision`: an explicit INFERENCE_PRECISION_HINT (f32, bf16), "auto" (the daemon's rule,
    edge.inference.compile_config) or None for the plugin's default."""
    c = core()
    return c.compile_model(c.read_model(str(xml)), "CPU", compile_config(hint, precision, threads))


def ov_runner(compiled: ov.CompiledModel, tile: np.ndarray) -> Callable[[], None]:
    req = compiled.create_infer_request()
    return lambda: req.infer({0: tile}, share_inputs=True)


def torch_runner(module: torch.nn.Module, tile: np.ndarray) -> Callable[[], None]:
    x = torch.from_numpy(tile)

    def run() -> None:
        with torch.inference_mode():
            module(x)

    return run


def interleaved_latency(runners: dict[str, Callable[[], None]], seconds: float, reps: int = 5,
                        min_rounds: int = 3, progress: bool = True) -> dict[str, list[float]]:
    """Rounds of `reps` timed calls per engine, rotating the order; one untimed call first
    each time so an engine does not pay for the previous one's cache or thread wake-up."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for fn in runners.values():  # warm-up: first calls allocate and JIT
        for _ in range(3):
            fn()
    t_end = time.perf_counter() + seconds
    rounds = 0
    with tqdm(desc="latency rounds", unit="round", file=sys.stderr, disable=not progress) as bar:
        while rounds < min_rounds or time.perf_counter() < t_end:
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                fn = runners[name]
                fn()
                for _ in range(reps):
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
            rounds += 1
            bar.update(1)
    return times


def median_latency_ms(fn: Callable[[], None], seconds: float = 1.0, min_runs: int = 10) -> float:
    """Median of one engine alone (used by export's short report)."""
    return float(np.median(interleaved_latency({"m": fn}, seconds, reps=5, min_rounds=max(1, min_runs // 5),
                                         progress=False)["m"]))


def async_throughput(queues: dict[str, tuple[ov.AsyncInferQueue, int]], tile: np.ndarray, seconds: float,
                     rounds: int = 3) -> dict[str, float]:
    """Tiles/s with every request kept busy; models alternate in `rounds` slices for fairness."""
    done = {k: 0 for k in queues}
    spent = {k: 0.0 for k in queues}
    slice_s = max(seconds / (rounds * max(1, len(queues))), 0.2)
    for queue, n in queues.values():  # warm-up all requests
        for _ in range(n):
            queue.start_async({0: tile})
        queue.wait_all()
    for _ in tqdm(range(rounds), desc="throughput rounds", unit="round", file=sys.stderr):
        for name, (queue, _n) in queues.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < slice_s:
                queue.start_async({0: tile})  # blocks while all requests are busy
                done[name] += 1
            queue.wait_all()
            spent[name] += time.perf_counter() - t0
    return {k: done[k] / spent[k] for k in queues}
