"""The station's persistent sequence number (`seq` in every event): increasing across restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class SeqStore:
    """Per-station sequence number that keeps increasing across restarts.

    Numbers are reserved in blocks written atomically to a small JSON file, so there is one
    fsync per block rather than per part. After a crash the unused rest of a block is
    skipped: numbers may jump but never repeat or go back.
    """

    BLOCK = 256

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._next = int(json.loads(path.read_text())["reserved"])
        except FileNotFoundError:
            self._next = 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Not worth stopping a line for: epoch milliseconds are above any count reached so far.
            self._next = int(time.time() * 1000)
            log.error("%s unreadable (%s); sequence continues at %d", path, e, self._next)
        self._reserved = self._next
        try:
            self._reserve()
        except OSError as e:  # disk full at start: start anyway; next() retries and the part waits
            log.error("cannot reserve sequence numbers in %s: %s; parts wait until it can be written", path, e)

    def _reserve(self) -> None:
        """Write the next block's end; only once it is durable may its numbers be handed out."""
        reserved = self._next + self.BLOCK
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"reserved": reserved}, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._reserved = reserved

    def next(self) -> int:
        """The next number; OSError (disk full) when a new block cannot be reserved - retry later."""
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            n = self._next
            self._next += 1
            return n
