"""Helpers to run the station daemon as tests do: station configs, a real `python -m edge run`
subprocess, and readers of what a real subscriber received. Shared by tests/edge and tests/faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from edge.config import validate_config
from edge.daemon import Pipeline
from tests.broker import Broker, Subscriber
from tests.tiny_package import make_part

ROOT = Path(__file__).resolve().parents[1]
BASE = "inspection/l1/s1"


def station(tmp_path: Path, pkg: Path, broker: Broker | None, source: dict[str, Any], **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "station": {"line": "l1", "name": "s1"},
        "source": source,
        "model": {"path": str(pkg), "num_requests": 2, "threads": 1},
        "mqtt": {"host": "127.0.0.1", "port": broker.port if broker else 1, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5},
        "metrics": {"enabled": False},
        "state_dir": str(tmp_path / "state"),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def results(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(f"{BASE}/result")]


def alarms(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(f"{BASE}/alarm")]


def wait_results(sub: Subscriber, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    topic = f"{BASE}/result"
    assert sub.wait_for(lambda ms: sum(m.topic == topic for m in ms) >= n, timeout), \
        f"only {len(results(sub))} of {n} results"
    return results(sub)


def expected(part_id: str) -> str:
    return {"g": "pass", "o": "pass", "d": "fail", "n": "fail"}.get(part_id[0], "error")


def write_parts(folder: Path, names: list[str], size: tuple[int, int] = (96, 128)) -> None:
    for i, name in enumerate(names):
        if name.startswith("bad"):
            (folder / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif name.startswith("black"):
            cv2.imwrite(str(folder / f"{name}.png"), np.zeros(size, np.uint8))
        elif name.startswith("white"):  # blown out, with a little sensor noise
            cv2.imwrite(str(folder / f"{name}.png"), 255 - (np.arange(size[0] * size[1]) % 3).reshape(size).astype(np.uint8))
        else:
            cv2.imwrite(str(folder / f"{name}.png"), make_part(size, defect=name.startswith("d"), seed=i))


class Daemon:
    """`python -m edge run` as a real subprocess; its log goes to a file shown on failure."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=ROOT,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Test teardown: SIGKILL the daemon if it is still running (a failed assertion left it up)."""
        if self.proc.poll() is None:
            self.proc.kill()


@contextmanager
def running(data: dict[str, Any]) -> Iterator[Pipeline]:
    """An in-process pipeline with its main loop in a thread."""
    stop = threading.Event()
    p = Pipeline(validate_config(data), stop)
    p.start()
    t = threading.Thread(target=p.run, daemon=True)
    t.start()
    try:
        yield p
    finally:
        stop.set()
        t.join(10)
        p.shutdown()
