"""sd_notify over $NOTIFY_SOCKET with a plain datagram socket (no libsystemd dependency).

Type=notify lets systemd know when the station is really ready (model compiled, source
open), and WatchdogSec= restarts a daemon whose pipeline loop stopped pinging. Outside
systemd (no NOTIFY_SOCKET) every call is a no-op, so tests and manual runs need nothing.
"""

from __future__ import annotations

import logging
import os
import socket

from edge.redact import redact_uri

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1 and STATUS= messages; never raises."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # '@' marks a Linux abstract socket: the name starts with a NUL byte.
        self._address = "\0" + addr[1:] if addr.startswith("@") else addr
        self._watchdog_s = _watchdog_seconds(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec, as sd_watchdog_enabled advises), or None."""
        return self._watchdog_s / 2 if self._watchdog_s else None

    def notify(self, *lines: str) -> bool:
        if not self._address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(redact_uri("\n".join(lines)).encode("utf-8"), self._address)
            return True
        except OSError as e:  # a notify failure must never take the station down
            log.debug("sd_notify failed: %s", e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """WatchdogSec from $WATCHDOG_USEC, if it is meant for this process ($WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6
