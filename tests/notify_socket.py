"""A stand-in for systemd's notify socket, shared by the tests that watch READY/WATCHDOG/STATUS."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET: what systemd sees of the daemon,
    every sd_notify datagram with its receipt time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def env(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}

    def count(self, line: str, start: float, end: float = float("inf")) -> int:
        with self._lock:
            return sum(1 for t, m in self.messages if start <= t <= end and line in m.splitlines())

    def wait(self, line: str, after: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(line, after):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def text(self) -> str:
        """Every datagram so far, one after another."""
        with self._lock:
            return "\n".join(m for _, m in self.messages)
