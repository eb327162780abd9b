"""Per-thread CPU accounting shared by bench_outbox.py and bench_pipeline.py (see ThreadCpu)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


class ThreadCpu:
    """CPU seconds per thread of this process (from /proc/self/task), sampled while the round runs: where
    the time goes, in a unit that the machine's other load does not inflate (unlike wall time)."""

    def __init__(self) -> None:
        self.cpu: dict[int, tuple[str, float]] = {}  # tid -> (name, cpu seconds)
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ThreadCpu:
        self._base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> dict[int, tuple[str, float]]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        out = {}
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
                tid = int(task.name)
                name = names.get(tid) or f"native:{comm}"
                out[tid] = (name, (int(rest[11]) + int(rest[12])) / self._tick)
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for tid, (name, cpu) in self._sample().items():  # keep a thread's Python name once seen
                self.cpu[tid] = (self.cpu[tid][0] if name.startswith("native:") and tid in self.cpu else name, cpu)

    def per_name(self, parts: int) -> dict[str, float]:
        """CPU milliseconds per part, summed by thread name (OpenVINO workers by their native name)."""
        totals: dict[str, float] = {}
        for tid, (name, cpu) in self.cpu.items():
            cpu -= self._base.get(tid, ("", 0.0))[1]
            key = "openvino/native" if name.startswith("native:") else name.split(" (")[0]
            totals[key] = totals.get(key, 0.0) + cpu
        return {k: round(v * 1000 / parts, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0}
