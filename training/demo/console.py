"""The demo's console: numbered stages with their elapsed time, and lines printed whole from several
threads (the conveyor listener, the children's output). Its own module so that run.py and station.py
both use it without importing each other."""

from __future__ import annotations

import threading
import time


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
