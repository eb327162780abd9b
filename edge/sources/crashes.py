"""Crash counter of the hot folder: a file that was being inspected during N daemon crashes in
a row is quarantined instead of being inspected again.

A poison the code does not foresee (a decoder segfault, an OOM kill) stops the process before
any `except` can run; after the restart the same file comes first again, and the service
crash-loops until systemd gives up. So every file handed out leaves a record under
`<state_dir>/folder-inflight/` that its commit removes. Records found at start belong to a
run that died: each such file's count goes up (`<state_dir>/folder-crashes.json`).

Several files are in flight at once, so one crash also counts innocent neighbours. The
folder source therefore inspects every file with a count alone (nothing else in flight):
from the second crash on only the culprit is counted, and a clean inspection resets a count.
Records are not fsynced: they must survive the process dying, not the machine losing power.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from edge.text import safe_text

log = logging.getLogger(__name__)


def _key(name: str) -> str:
    """The file name's bytes as hex: exact for names that are not UTF-8, and valid JSON."""
    return os.fsencode(name).hex()


class CrashLedger:
    """Not thread-safe: the folder source calls it under its own lock."""

    def __init__(self, state_dir: Path) -> None:
        self.records = Path(state_dir) / "folder-inflight"
        self.path = Path(state_dir) / "folder-crashes.json"
        self.counts: dict[str, int] = {}
        self._broken = False

    def open(self, present: set[str] | None = None) -> None:
        """Fold the records of a run that died into the counts (once: then they are deleted).

        `present`: the names in the folder now. A count for a file that is gone is dropped: a crash
        between moving a file out and deleting its record counts a file that was already done, and
        a name that comes back later is a new part."""
        self.records.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.counts = {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            self.counts = {}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.error("%s unreadable (%s); crash counts start again from 0", self.path, e)
            self.counts = {}
        found = sorted(self.records.iterdir())
        for rec in found:
            try:
                key = rec.read_text(encoding="ascii").strip()
                bytes.fromhex(key)
            except (OSError, ValueError):
                continue
            self.counts[key] = self.counts.get(key, 0) + 1
            name = os.fsdecode(bytes.fromhex(key))
            log.warning("file %s was being inspected when the daemon died (%d time(s) in a row)",
                        safe_text(name), self.counts[key])
        here = None if present is None else {_key(n) for n in present}
        gone = [] if here is None else [k for k in self.counts if k not in here]
        for key in gone:
            log.info("crash count of %s dropped: the file is no longer in the folder",
                     safe_text(os.fsdecode(bytes.fromhex(key))))
            del self.counts[key]
        if found or gone:
            self._save()
            for rec in found:
                with contextlib.suppress(OSError):
                    rec.unlink()

    def count(self, name: str) -> int:
        """Crashes in a row this file was in flight for (0: never, or inspected cleanly since)."""
        return self.counts.get(_key(name), 0)

    def handed_out(self, name: str) -> None:
        """Record before the file is read: if the process dies now, the next start knows."""
        try:
            (self.records / self._record_name(name)).write_text(_key(name), encoding="ascii")
        except OSError as e:
            self._warn(e)

    def committed(self, name: str) -> None:
        """The file's result is durable: no longer in flight, and its crash count is over."""
        try:
            (self.records / self._record_name(name)).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self._warn(e)
        if self.counts.pop(_key(name), None) is not None:
            self._save()

    @staticmethod
    def _record_name(name: str) -> str:
        return hashlib.sha256(os.fsencode(name)).hexdigest()[:32]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.counts, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError as e:
            self._warn(e)

    def _warn(self, e: OSError) -> None:
        if not self._broken:  # a full state disk must not stop inspection, nor flood the journal
            log.error("crash counter in %s cannot be written (%s); poison files are not quarantined meanwhile",
                      self.records.parent, e)
            self._broken = True
