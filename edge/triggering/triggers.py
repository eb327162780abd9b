"""Durable trigger store: a trigger is on disk before the broker hears our acknowledgement.

Why: with MQTT manual acks, the broker keeps (and redelivers) a QoS 1 trigger until we PUBACK
it. Storing it first (SQLite WAL, synchronous=FULL, like the outbox) and acking after means a
daemon SIGKILL at any point either leaves the trigger with the broker (redelivered, DUP) or on
our disk - never nowhere. A row leaves the "open" states only once that part's result event is
durable in the outbox (`done`), so at restart every open row becomes an `error` result: a
frame taken after a restart shows another part and is never matched to an old trigger.

The same rows give de-duplication by part id across restarts (a redelivered or re-sent trigger
for a part that is open or was seen within the window is a duplicate) and the last PLC
sequence number, so a gap across a restart is detected too.

States: pending (accepted; the gate holds it in memory until a frame or its timeout, and the
row stays pending until the result is durable), rejected (must become an `error` result; the
reason is stored, not held in memory - this bounds the gate's footprint however many triggers
overflow), done (result durable; kept for the de-duplication window).

A store that cannot be read at start (a torn file) is moved aside and a new one is started, with
the `trigger_store` alarm: refusing to start would stop the line in a restart loop.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.config import PipelineConfig, default_of
from edge.outbox import move_aside
from edge.rules import NO_FRAME

log = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS triggers (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        part_id  TEXT    NOT NULL UNIQUE,
        received REAL    NOT NULL,
        plc_seq  INTEGER,
        state    TEXT    NOT NULL,
        kind     TEXT,
        reason   TEXT,
        done_ts  REAL
    )""",
    "CREATE INDEX IF NOT EXISTS triggers_state ON triggers (state, id)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
# AUTOINCREMENT: ids never repeat, so the gate's "rejected rows after id N" cursor stays valid.
_PURGE_EVERY_S = 10.0


@dataclass(frozen=True)
class TriggerMessage:
    """One trigger as the MQTT layer received it, with the flags that decide whether it can be trusted."""

    payload: bytes
    retain: bool = False  # replayed by the broker at subscribe time: not a part
    dup: bool = False  # the broker's redelivery of a message it sent us before (session resumed)
    resumed_s: float | None = None  # seconds since a CONNACK that resumed a stored session, else None


@dataclass(frozen=True)
class StoredTrigger:
    id: int
    part_id: str
    received: float  # station wall clock when the trigger arrived; also the key of its event id
    plc_seq: int | None
    state: str
    kind: str | None  # error kind of a rejected trigger (metrics label), e.g. no_frame, late_trigger
    reason: str | None


class TriggerStore:
    """Thread-safe (one connection and a lock): the MQTT thread adds, the result thread marks done."""

    def __init__(self, path: str | Path = ":memory:",
                 dedup_s: float = default_of(PipelineConfig, "trigger_dedup_s")) -> None:
        self.path, self.dedup_s = str(path), dedup_s
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.moved_aside: str | None = None  # where a corrupt store went (the gate raises an alarm)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:  # corrupt: a crash loop would stop the line for good
            self.moved_aside = str(move_aside(self.path))
            log.error("trigger store %s is unreadable (%s): moved aside to %s; triggers that were open "
                      "there get no error result, de-duplication starts empty", self.path, e, self.moved_aside)
            self._db = self._open()
        self._next_purge = 0.0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            for statement in _SCHEMA:
                db.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    def duplicate(self, part_id: str, now: float) -> bool:
        """True if this part id is open, or its trigger or result is younger than the dedup window."""
        with self._lock:
            row = self._db.execute("SELECT state, received, done_ts FROM triggers WHERE part_id = ?",
                                   (part_id,)).fetchone()
        if row is None:
            return False
        state, received, done_ts = row
        return state != "done" or now - max(received, done_ts or 0.0) < self.dedup_s

    def add(self, part_id: str, received: float, plc_seq: int | None, reason: str | None = None,
            kind: str = NO_FRAME) -> int:
        """Store a new trigger (pending, or rejected with `reason` and error `kind`) durably; returns its row id.

        A done row of the same part id outside the window is replaced; the last PLC sequence
        number is updated in the same transaction.
        """
        state = "pending" if reason is None else "rejected"
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM triggers WHERE part_id = ?", (part_id,))
                cur = db.execute("INSERT INTO triggers (part_id, received, plc_seq, state, kind, reason) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (part_id, received, plc_seq, state, kind, reason))
                if plc_seq is not None:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (plc_seq,))
                if time.monotonic() >= self._next_purge:
                    self._next_purge = time.monotonic() + _PURGE_EVERY_S
                    db.execute("DELETE FROM triggers WHERE state = 'done' AND MAX(received, done_ts) < ?",
                               (received - self.dedup_s,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)

    def rejected(self, after_id: int, limit: int) -> list[StoredTrigger]:
        """Rejected rows with id > after_id, oldest first (the gate turns them into error parts)."""
        with self._lock:
            rows = self._db.execute("SELECT id, part_id, received, plc_seq, state, kind, reason FROM triggers "
                                    "WHERE state = 'rejected' AND id > ? ORDER BY id LIMIT ?",
                                    (after_id, limit)).fetchall()
        return [StoredTrigger(*r) for r in rows]

    def done(self, part_id: str, received: float) -> None:
        """The part's result is durable in the outbox: the trigger is closed (kept for de-duplication)."""
        with self._lock:
            self._db.execute("UPDATE triggers SET state = 'done', done_ts = ? WHERE part_id = ? AND received = ?",
                             (time.time(), part_id, received))

    def recover(self, reason: str) -> int:
        """At start: every pending trigger of the previous run becomes rejected (its frame moment has passed)."""
        with self._lock:
            return self._db.execute("UPDATE triggers SET state = 'rejected', kind = ?, reason = ? "
                                    "WHERE state = 'pending'", (NO_FRAME, reason)).rowcount

    def open_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM triggers WHERE state != 'done'").fetchone()[0])

    def last_seq(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
