"""Durable on-disk outbox: an event is committed here before it is published.

Nothing-is-lost rule: the pipeline `add`s a result (fsynced, SQLite WAL with
synchronous=FULL) before the MQTT sink ever sees it, and the sink `ack`s (deletes) it
only after a successful PUBACK. A crash at any point therefore leads at worst to a
duplicate delivery (same event_id, consumers de-duplicate), never to a lost verdict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config import OutboxConfig, default_of

log = logging.getLogger(__name__)

# a row under its own seq: recovery copies salvaged rows, `restore` puts acknowledged ones back
_INSERT_WITH_SEQ = ("INSERT OR IGNORE INTO outbox (seq, event_id, topic, payload, qos, created, attempts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; on any error roll back and re-raise (a failed COMMIT, e.g. disk
    full, has rolled back already), so nothing is half-written."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise

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


class OutboxUnwritable(RuntimeError):
    """The outbox file or its folder is read-only: a deployment error that no restart fixes."""


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

    def __init__(self, path: str | Path, max_events: int = default_of(OutboxConfig, "max_events")) -> None:
        if max_events <= 0:
            raise ValueError(f"max_events must be > 0, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.recovery: str | None = None  # what a corrupt file's salvage found (for the outbox_recovered alarm)
        try:
            if _truncated_to_nothing(self.path):
                raise sqlite3.DatabaseError("the file is empty (0 bytes): truncated by a crash or a copy?")
            self._db: sqlite3.Connection | None = _open(self.path)
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):
                _raise_if_read_only(self.path, e)
                raise
            self._db = self._recover(e)
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._count:
            log.info("outbox %s reopened with %d undelivered event(s)", self.path, self._count)

    def _recover(self, error: sqlite3.DatabaseError) -> sqlite3.Connection:
        """A corrupt file would crash every start: move it aside (with -wal/-shm), start a new one
        and copy into it every row that can still be read, saying what was recovered and lost."""
        aside = move_aside(self.path)
        db = _open(self.path)
        rows, unreadable, note = salvage(aside)
        before = db.total_changes
        with _transaction(db):
            db.executemany(_INSERT_WITH_SEQ, rows)
        kept = db.total_changes - before
        lost = (f"unreadable or missing seq {_ranges(unreadable)} (up to {sum(b - a + 1 for a, b in unreadable)} "
                f"events lost)" if unreadable else note or "nothing unreadable")
        self.recovery = (f"outbox {self.path} was corrupt ({error}); moved to {aside}; recovered {kept} "
                         f"undelivered event(s); {lost}")
        log.error("%s", self.recovery)
        return db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is closed")
        return self._db

    def add(self, event_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Store an event durably; False if event_id is already stored (idempotent re-inspection)."""
        (stored,) = self.add_many([(event_id, topic, payload, qos)])
        if stored is None:
            raise OutboxFull(f"outbox {self.path} holds {self.count()} events (max_events={self.max_events})")
        return stored

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
            with _transaction(db):
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
            self._count = count
        return out

    def restore(self, rows: Sequence[OutboxRow]) -> int:
        """Put acknowledged rows back under their own seq (so they are resent in their old order),
        durably, in one transaction; rows whose seq or event_id is stored again are left alone.
        Returns how many came back. Used when a broker may have lost what it acknowledged
        (edge.mqtt: `mqtt.replay_acked_s`); the outbox's max_events does not hold them back."""
        if not rows:
            return 0
        with self._lock:
            db = self._conn()
            before = db.total_changes
            with _transaction(db):
                db.executemany(_INSERT_WITH_SEQ, [(r.seq, r.event_id, r.topic, bytes(r.payload), r.qos, r.created,
                                                   r.attempts) for r in rows])
            restored = db.total_changes - before
            self._count += restored
        return restored

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
        """Delete several acknowledged rows in one transaction, without an fsync of its own.

        A delete need not be durable: one lost in a power cut only brings the row back, and it is
        sent again with the same event_id (the promise is at-least-once). The next add's fsync (or
        a checkpoint) makes it durable anyway. Waiting for the disk here held the outbox lock, and
        the result thread with it, once per PUBACK batch: half the disk waits at full speed."""
        params = [(int(s),) for s in seqs]
        if not params:
            return
        with self._lock:
            db = self._conn()
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: the commit is ordered, not fsynced
            try:
                before = db.total_changes
                with _transaction(db):
                    db.executemany("DELETE FROM outbox WHERE seq = ?", params)
                deleted = db.total_changes - before
            finally:
                db.execute("PRAGMA synchronous=FULL")
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


def move_aside(path: str | Path) -> Path:
    """Rename a corrupt SQLite file with its -wal/-shm to <name>.corrupt-<time> (kept for a person to
    look at) so the next open starts a new one; shared by the outbox and the trigger store."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    while aside.exists():  # corrupt twice within a second: keep both copies
        aside = aside.with_name(aside.name + "x")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{aside}{suffix}")
    return aside


def _open(path: Path) -> sqlite3.Connection:
    """Connect (autocommit: every statement is its own durable transaction) and check the file.

    Raises sqlite3.DatabaseError for a corrupt file. When the shared-memory index cannot be made
    (disk full), fall back to exclusive locking, which keeps it in memory: reads work and writes
    fail (the pipeline holds parts with an alarm) instead of the daemon failing to start."""
    exclusive = False
    while True:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            if exclusive:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.execute(_SCHEMA)
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if exclusive or _is_corrupt(e) or "locked" in str(e):  # locked: another process, not the disk
                raise
            log.warning("outbox %s: %s; opening it with exclusive locking (disk full?)", path, e)
            exclusive = True
        except BaseException:
            db.close()
            raise


def _raise_if_read_only(path: Path, error: Exception) -> None:
    for p in (path.parent, path):
        if p.exists() and not os.access(p, os.W_OK):
            raise OutboxUnwritable(f"outbox {path}: {p} is read-only ({error}); the outbox needs a writable "
                                   "file and folder (state_dir / outbox.path)") from error


def _truncated_to_nothing(path: Path) -> bool:
    """SQLite would take a 0-byte file for a new, empty database and silently forget its events;
    it never leaves one itself (the first write makes page 1), so one with no WAL beside it was cut."""
    wal = Path(f"{path}-wal")
    return path.exists() and path.stat().st_size == 0 and not (wal.exists() and wal.stat().st_size > 0)


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB, or our own failed quick_check (a plain DatabaseError)."""
    code = getattr(e, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF in (11, 26)) or type(e) is sqlite3.DatabaseError


_COLUMNS = "seq, event_id, topic, payload, qos, created, attempts"
_SALVAGE_QUERIES = 20_000  # bisection budget: a corrupt root page makes every range fail


def salvage(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]], str | None]:
    """Every readable row of a corrupt outbox, read by seq range and bisecting around bad pages.

    Returns (rows, unreadable seq ranges, note when the extent of the loss is unknown)."""
    _pad_truncated(path)
    try:
        db = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
    except sqlite3.Error as e:
        return [], [], f"the file cannot be opened ({e}): the number of lost events is unknown"
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone():
            db.close()
            return [], [], "no outbox table in the file: the number of lost events is unknown"
        hi = 0
        for q in ("SELECT max(seq) FROM outbox", "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"):
            with contextlib.suppress(sqlite3.Error):
                hi = max(hi, int((db.execute(q).fetchone() or [0])[0] or 0))
    except sqlite3.Error as e:
        db.close()
        return [], [], f"nothing readable ({e}): the number of lost events is unknown"
    try:
        rows, lost = _read_by_ranges(db, hi)
    finally:
        db.close()
    if not hi:
        return sorted(rows), _merge(lost), "the highest seq was unreadable: events past the readable ones may be lost"
    # A zeroed page can read as an empty one: seq numbers used (<= hi) but absent from the undelivered
    # span (from the first row or bad range on) are counted as lost too - acks delete mostly in order.
    seen = {r[0] for r in rows}
    start = min([*seen, *(a for a, _ in lost)], default=hi + 1)
    lost += [(s, s) for s in range(start, hi + 1) if s not in seen]
    return sorted(rows), _merge(lost), None


def _read_by_ranges(db: sqlite3.Connection, hi: int) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]]]:
    """(plausible rows, lost seq ranges) of seq 1..hi, bisecting around ranges that do not read."""
    rows: list[tuple[Any, ...]] = []
    bad: list[tuple[int, int]] = []
    damaged: list[int] = []
    todo, budget = [(1, hi or 1 << 31)], _SALVAGE_QUERIES
    while todo:
        a, b = todo.pop()
        budget -= 1
        try:
            if budget < 0:
                raise sqlite3.DatabaseError("salvage query budget used up")
            got = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE seq BETWEEN ? AND ?", (a, b)).fetchall()
            for r in got:  # a damaged page can yield stray cells or cut payloads
                if _plausible(r, a, b):
                    rows.append(r)
                elif isinstance(r[0], int) and a <= r[0] <= b:
                    damaged.append(r[0])
        except sqlite3.Error:
            if a == b or budget < 0:
                bad.append((a, b))
            else:  # lower half popped first: rows come out in order
                mid = (a + b) // 2
                todo += [(mid + 1, b), (a, mid)]
    return rows, bad + [(s, s) for s in damaged]


def _plausible(r: tuple[Any, ...], lo: int, hi: int) -> bool:
    seq, event_id, topic, payload, qos = r[:5]
    if not (isinstance(seq, int) and lo <= seq <= hi and isinstance(event_id, str) and bool(event_id)
            and isinstance(topic, str) and bool(topic) and isinstance(payload, bytes) and qos in (0, 1, 2)):
        return False
    try:  # every event is a JSON object: one cut short (zeroed overflow page) is not sent as if whole
        return isinstance(json.loads(payload), dict)
    except ValueError:
        return False


def _pad_truncated(path: Path) -> None:
    """A file cut short makes SQLite refuse its whole schema (root pages past the end): pad it with
    zero pages to the size its header records, so only the missing pages are unreadable."""
    try:
        with open(path, "r+b") as f:
            head = f.read(100)
            if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
                return
            page = int.from_bytes(head[16:18], "big")
            want = (65536 if page == 1 else page) * int.from_bytes(head[28:32], "big")
            size = f.seek(0, 2)
            if size < want:
                f.truncate(want)
                log.warning("outbox %s is cut short (%d of %d bytes); padded with zeros to salvage it", path, size, want)
    except OSError as e:
        log.warning("cannot pad %s for salvage: %s", path, e)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _ranges(ranges: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges[:10])
    return shown + (f" and {len(ranges) - 10} more" if len(ranges) > 10 else "")


def _row(r: Any) -> OutboxRow:
    return OutboxRow(
        seq=int(r[0]), event_id=str(r[1]), topic=str(r[2]), payload=bytes(r[3]),
        qos=int(r[4]), created=float(r[5]), attempts=int(r[6]),
    )
