"""Fences against a second daemon: one per state dir, one per MQTT client id on this machine.

Two daemons on one state dir would share the outbox and the sequence file (events with
repeated seq numbers, parts committed twice); two with one client id make the broker kick
each other off in a loop ("session taken over"), so results trickle out and triggers go to
whichever happens to be connected. Both are refused at start with exit 78 (restarting does
not help). `flock` locks vanish with the process, so a SIGKILLed daemon never leaves a stale one.
A client-id clash across machines cannot be fenced here: the MQTT sink raises an alarm when the
broker reports the takeover (MQTT 5 reason code 0x8E).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

STATE_LOCK = "daemon.lock"


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it and what it guards."""


class ProcessLock:
    """An exclusive `flock` on a file holding the owner's pid, kept until release() or process exit."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> ProcessLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeld(f"{self.what} is in use by another edge daemon (pid {holder}; lock file {self.path}); "
                           f"stop that one first or give this station its own state_dir / mqtt.client_id") from None
        try:  # the pid is for people; the flock is the fence, so a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            log.warning("cannot write the pid into %s: %s", self.path, e)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def runtime_dir() -> Path:
    """Machine-wide directory for the client-id locks: systemd's $RUNTIME_DIRECTORY, else
    /run/edge-inspect when it exists and is writable, else the temp dir."""
    env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    for candidate in (env, "/run/edge-inspect"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def state_lock(state_dir: Path) -> ProcessLock:
    return ProcessLock(state_dir / STATE_LOCK, f"state dir {state_dir}").acquire()


def client_id_lock(host: str, port: int, client_id: str) -> ProcessLock:
    """Keyed by broker address and client id (hashed: ids may hold any character)."""
    key = f"{host}:{port}/{client_id}"
    name = f"edge-mqtt-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    return ProcessLock(runtime_dir() / name, f"MQTT client id {client_id!r} on {host}:{port}").acquire()
