"""Durable on-disk outbox: an event is committed here before it is published.

Nothing-is-lost rule: the pipeline `add`s a result (fsynced, SQLite WAL with
synchronous=FULL) before the MQTT sink ever sees it, and the sink `ack`s (deletes) it
only after a successful PUBACK. A crash at any point therefore leads at worst to a
duplicate delivery (same event_id, consumers de-duplicate), never to a lost verdict.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT    NOT NULL UNIQUE,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    created  REAL    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""
# AUTOINCREMENT (not a bare rowid) so seq never goes backwards after the table empties:
# the sender's "after_seq" cursor relies on new rows always getting larger numbers.


class OutboxFull(RuntimeError):
    """The outbox is at capacity; the caller must treat the part as undeliverable (never drop silently)."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    event_id: str
    topic: str
    payload: bytes
    qos: int
    created: float
    attempts: int


class Outbox:
    """Thread-safe SQLite outbox (one connection guarded by a lock; the pipeline adds, the MQTT thread acks)."""

    def __init__(self, path: str | Path, max_events: int = 100_000) -> None:
        if max_events <= 0:
            raise ValueError(f"max_events must be > 0, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, every statement is its own durable transaction.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._count:
            log.info("outbox %s reopened with %d undelivered event(s)", self.path, self._count)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is closed")
        return self._db

    def add(self, event_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Store an event durably; False if event_id is already stored (idempotent re-inspection)."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        with self._lock:
            db = self._conn()
            if self._count >= self.max_events:
                if db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)).fetchone():
                    return False
                raise OutboxFull(f"outbox {self.path} holds {self._count} events (max_events={self.max_events})")
            cur = db.execute(
                "INSERT OR IGNORE INTO outbox (event_id, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?)",
                (event_id, topic, bytes(payload), qos, time.time()),
            )
            if cur.rowcount == 0:
                return False
            self._count += 1
            return True

    def add_many(self, items: Sequence[tuple[str, str, bytes, int]]) -> list[bool | None]:
        """Group commit: store (event_id, topic, payload, qos) items in ONE transaction, one fsync.

        Per item: True = stored, False = already stored (idempotent re-inspection), None = not
        stored because the outbox is full (the caller holds that part and retries). Either the
        whole transaction is durable when this returns, or it raises and nothing was stored.
        """
        for _, _, _, qos in items:
            if qos not in (0, 1, 2):
                raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        out: list[bool | None] = []
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                count, now = self._count, time.time()
                for event_id, topic, payload, qos in items:
                    if count >= self.max_events:
                        dup = db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
                        out.append(False if dup else None)
                        continue
                    cur = db.execute("INSERT OR IGNORE INTO outbox (event_id, topic, payload, qos, created) "
                                     "VALUES (?, ?, ?, ?, ?)", (event_id, topic, bytes(payload), qos, now))
                    out.append(cur.rowcount > 0)
                    count += cur.rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count = count
        return out

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[OutboxRow]:
        """Undelivered rows with seq > after_seq, oldest first."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT seq, event_id, topic, payload, qos, created, attempts FROM outbox "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def get(self, seq: int) -> OutboxRow | None:
        """One row by seq (None once it has been acked)."""
        with self._lock:
            r = self._conn().execute(
                "SELECT seq, event_id, topic, payload, qos, created, attempts FROM outbox WHERE seq = ?", (seq,)
            ).fetchone()
        return _row(r) if r else None

    def ack(self, seq: int) -> None:
        """Delete a row the broker has acknowledged."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete several acknowledged rows in one transaction (one fsync instead of one per row)."""
        params = [(int(s),) for s in seqs]
        if not params:
            return
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany("DELETE FROM outbox WHERE seq = ?", params)
                deleted = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count -= deleted

    def mark_attempt(self, seq: int) -> None:
        """Count a failed/rejected delivery attempt (drives retry backoff and shows up in diagnostics)."""
        with self._lock:
            self._conn().execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))

    def count(self) -> int:
        with self._lock:
            return self._count

    def fill_ratio(self) -> float:
        """0..1, for the backlog_growing alarm and metrics."""
        with self._lock:
            return self._count / self.max_events

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row(r: Any) -> OutboxRow:
    return OutboxRow(
        seq=int(r[0]), event_id=str(r[1]), topic=str(r[2]), payload=bytes(r[3]),
        qos=int(r[4]), created=float(r[5]), attempts=int(r[6]),
    )
