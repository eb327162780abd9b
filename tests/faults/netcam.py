"""A network camera for tests: ffmpeg serving an MPEG-TS stream on 127.0.0.1 (what OpenCV's FFmpeg
backend reads from an IP camera), restarted after each client like a camera taking the next connection."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

import cv2

from tests.broker import free_port
from tests.tiny_package import make_part

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"


class NetCamera:
    """An IP camera: ffmpeg streams a still part image as MPEG-TS at 25 fps to whoever connects to
    tcp://127.0.0.1:port. ffmpeg serves one client and exits when it goes away (a SIGKILLed
    daemon), so a thread starts it again, like a camera accepting the next connection."""

    def __init__(self, workdir: Path, fps: int = 25) -> None:
        self.port = free_port()
        self.image = workdir / "part.png"
        cv2.imwrite(str(self.image), make_part((96, 128), defect=False, seed=3))  # the tiny model passes it
        self.fps = fps
        self.served = 0  # ffmpeg runs that ended (a client came and went, or ffmpeg failed)
        self._log = workdir / "ffmpeg.log"
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="net-camera", daemon=True)

    @property
    def uri(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NetCamera:
        """Wait until ffmpeg listens. free_port's port is in the ephemeral range, so an outgoing
        connection of another test can take it before ffmpeg binds; ffmpeg then exits at once,
        and the camera moves to a new port (no client knows the port before start returns)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.listening():  # a client connecting earlier is refused and backs off
            if self.served:  # ffmpeg ended with no client: it could not bind
                self.served = 0
                self.port = free_port()
            if time.monotonic() > deadline:
                log = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
                raise TimeoutError(f"ffmpeg does not listen on port {self.port} after {timeout:.0f} s; "
                                   f"its last output:\n{log}")
            time.sleep(0.05)
        return self

    def listening(self) -> bool:
        """ffmpeg waits for a client (a LISTEN socket on the port; probing it would use up the one client)."""
        port = f":{self.port:04X} "
        with open("/proc/net/tcp") as f:
            return any(port in line and line.split()[3] == "0A" for line in f)

    def _run(self) -> None:
        with open(self._log, "ab") as log:
            self._serve(log)

    def _serve(self, log: BinaryIO) -> None:
        while not self._stop.is_set():
            self._proc = subprocess.Popen(
                [FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-loop", "1", "-framerate", str(self.fps),
                 "-i", str(self.image), "-pix_fmt", "yuv420p", "-q:v", "2", "-f", "mpegts",
                 f"{self.uri}?listen=1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log)
            self._proc.wait()
            self.served += 1
            self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._thread.join(5)
