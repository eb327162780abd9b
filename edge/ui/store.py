"""The page's own SQLite index: recent result events, reviews and the alarm history.

The daemon's outbox forgets an event once the broker has it, so the page keeps its own copy of
what it saw on <base>/result (de-duplicated by event id: delivery is at-least-once). Reviews are
the durable record of what a person said about a part; they are never pruned with the events.
`python -m training review-export` reads this file, so the schema is part of the contract.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REVIEW_ACTIONS = ("confirm_fail", "false_alarm", "escape")
DB_NAME = "ui.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, seq INTEGER, part_id TEXT NOT NULL, capture_ts REAL NOT NULL,
    verdict TEXT NOT NULL, total_area INTEGER, latency_ms REAL, model_version TEXT,
    evidence TEXT, sharpness REAL, body TEXT NOT NULL, received_ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(capture_ts);
CREATE INDEX IF NOT EXISTS events_verdict_ts ON events(verdict, capture_ts);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, action TEXT NOT NULL,
    reviewer TEXT NOT NULL, ts REAL NOT NULL, model_version TEXT, box TEXT, note TEXT,
    event TEXT NOT NULL, message TEXT NOT NULL, published_ts REAL);
CREATE INDEX IF NOT EXISTS reviews_event ON reviews(event_id);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, alarm TEXT NOT NULL, state TEXT NOT NULL,
    message TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(ValueError):
    """A request the index cannot honour (unknown event, bad review); the message says which."""


@dataclass(frozen=True)
class PartQuery:
    """Gallery filter; all fields optional. `part` matches a substring of the part id."""

    verdict: str | None = None
    part: str | None = None
    since_ts: float | None = None
    until_ts: float | None = None
    page: int = 0
    per_page: int = 24


class Store:
    """One connection guarded by a lock: writes come from the MQTT thread, reads from the web workers."""

    def __init__(self, path: str | Path, keep_events: int = 50_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_events = keep_events
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._added = 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- events ----------------------------------------------------------------------------------
    def add_events(self, events: Sequence[tuple[dict[str, Any], bytes | None]]) -> list[dict[str, Any]]:
        """Index (event, payload as received) in one transaction; returns the events that were new (not
        redeliveries). Without the payload the event is encoded again."""
        added = []
        now = time.time()
        with self._tx() as db:
            for event, raw in events:
                quality = event.get("image_quality")
                timings = event.get("timings_ms")
                row = (str(event["event_id"]), int(event.get("seq", 0)), str(event["part_id"]),
                       float(event["capture_ts"]), str(event["verdict"]), int(event.get("total_defect_area") or 0),
                       timings.get("capture_to_result") if isinstance(timings, dict) else None,
                       str(event["model"].get("version", "")), event.get("evidence"),
                       quality.get("sharpness") if isinstance(quality, dict) else None,
                       raw.decode() if raw is not None else json.dumps(event, separators=(",", ":")), now)
                if db.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row).rowcount == 1:
                    added.append(event)
            self._added += len(added)
            if self._added >= 500:  # prune in batches, not per event
                self._added = 0
                db.execute("DELETE FROM events WHERE event_id IN (SELECT event_id FROM events "
                           "ORDER BY capture_ts DESC LIMIT -1 OFFSET ?)", (self.keep_events,))
        return added

    def event(self, event_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM events WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM events ORDER BY capture_ts DESC, seq DESC LIMIT 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def parts(self, q: PartQuery) -> tuple[list[dict[str, Any]], int]:
        """One gallery page (newest first) and the number of matching parts."""
        where: list[str] = []
        args: list[str | float] = []
        if q.verdict:
            where.append("verdict = ?")
            args.append(q.verdict)
        if q.part:
            where.append("instr(part_id, ?) > 0")  # substring, with no LIKE wildcards to escape
            args.append(q.part)
        if q.since_ts is not None:
            where.append("capture_ts >= ?")
            args.append(q.since_ts)
        if q.until_ts is not None:
            where.append("capture_ts < ?")
            args.append(q.until_ts)
        sql_where = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = int(self._db.execute(f"SELECT count(*) FROM events {sql_where}", args).fetchone()[0])
            rows = self._db.execute(
                f"SELECT event_id, seq, part_id, capture_ts, verdict, total_area, latency_ms, model_version, evidence "
                f"FROM events {sql_where} ORDER BY capture_ts DESC, seq DESC LIMIT ? OFFSET ?",
                [*args, q.per_page, q.page * q.per_page]).fetchall()
        return [dict(r) for r in rows], total

    def health(self, since_ts: float, bucket_s: float) -> dict[str, Any]:
        """Line health since `since_ts`: fail rate per time bucket, defect areas, sharpness per part."""
        with self._lock:
            buckets = self._db.execute(
                "SELECT CAST(capture_ts / ? AS INTEGER) AS b, count(*), sum(verdict = 'fail'), sum(verdict = 'error') "
                "FROM events WHERE capture_ts >= ? GROUP BY b ORDER BY b", (bucket_s, since_ts)).fetchall()
            areas = [int(r[0]) for r in self._db.execute(
                "SELECT total_area FROM events WHERE capture_ts >= ? AND verdict = 'fail'", (since_ts,))]
            sharp = [(float(r[0]), float(r[1])) for r in self._db.execute(
                "SELECT capture_ts, sharpness FROM events WHERE capture_ts >= ? AND sharpness IS NOT NULL "
                "ORDER BY capture_ts DESC LIMIT 500", (since_ts,))]
        return {"buckets": [{"ts": b * bucket_s, "parts": n, "fail": int(f or 0), "error": int(e or 0)}
                            for b, n, f, e in buckets],
                "areas": areas, "sharpness": sharp[::-1]}

    # -- reviews ---------------------------------------------------------------------------------
    def add_review(self, event_id: str, action: str, reviewer: str, box: list[int] | None = None,
                   note: str = "") -> dict[str, Any]:
        """Store a review of an indexed event; returns the review as published on <base>/review."""
        if action not in REVIEW_ACTIONS:
            raise StoreError(f"review action must be one of {REVIEW_ACTIONS}, got {action!r}")
        event = self.event(event_id)
        if event is None:
            raise StoreError(f"no event {event_id!r} in the page's index")
        if action == "confirm_fail" and event["verdict"] != "fail":
            raise StoreError(f"only a failed part can be confirmed as a defect (this one is {event['verdict']})")
        if action == "false_alarm" and event["verdict"] != "fail":
            raise StoreError(f"only a failed part can be a false alarm (this one is {event['verdict']})")
        if action == "escape" and event["verdict"] != "pass":
            raise StoreError(f"only a passed part can be an escape (this one is {event['verdict']})")
        w, h = int(event["image"]["width"]), int(event["image"]["height"])
        if box is not None and not (len(box) == 4 and box[2] > 0 and box[3] > 0 and box[0] >= 0 and box[1] >= 0
                                    and box[0] + box[2] <= w and box[1] + box[3] <= h):
            raise StoreError(f"box must be [x, y, width, height] inside the {w}x{h} frame, got {box}")
        ts = time.time()
        note = note[:1000]
        message = {"event_id": event_id, "part_id": event["part_id"], "action": action, "reviewer": reviewer,
                   "ts": round(ts, 3), "model": event["model"], "box": box, "note": note,
                   "station": event["station"], "verdict": event["verdict"], "evidence": event.get("evidence")}
        with self._tx() as db:
            cur = db.execute("INSERT INTO reviews(event_id, action, reviewer, ts, model_version, box, note, event, "
                             "message) VALUES (?,?,?,?,?,?,?,?,?)",
                             (event_id, action, reviewer, ts, str(event["model"].get("version", "")),
                              None if box is None else json.dumps(box), note,
                              json.dumps(event, separators=(",", ":")), ""))
            review_id = int(cur.lastrowid or 0)
            message = {"review_id": review_id, **message}
            db.execute("UPDATE reviews SET message = ? WHERE id = ?", (json.dumps(message, separators=(",", ":")),
                                                                      review_id))
        return message

    def unpublished(self) -> list[tuple[int, bytes]]:
        """Reviews the broker has not acknowledged yet (e.g. stored while it was down), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, message FROM reviews WHERE published_ts IS NULL ORDER BY id").fetchall()
        return [(int(r[0]), str(r[1]).encode()) for r in rows]

    def mark_published(self, review_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE reviews SET published_ts = ? WHERE id = ?", (time.time(), review_id))

    def reviews(self, event_id: str | None = None) -> list[dict[str, Any]]:
        """Reviews, oldest first; of one event or all. The last review of an event is the one that counts."""
        sql = "SELECT id, event_id, action, reviewer, ts, model_version, box, note, event, published_ts FROM reviews"
        with self._lock:
            rows = (self._db.execute(sql + " WHERE event_id = ? ORDER BY id", (event_id,)) if event_id
                    else self._db.execute(sql + " ORDER BY id")).fetchall()
        return [{**dict(r), "box": None if r["box"] is None else json.loads(r["box"]), "event": json.loads(r["event"])}
                for r in rows]

    # -- alarms ----------------------------------------------------------------------------------
    def add_alarm(self, alarm: str, state: str, message: str, ts: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO alarms(ts, alarm, state, message) VALUES (?,?,?,?)",
                       (time.time() if ts is None else ts, alarm, state, message))
            db.execute("DELETE FROM alarms WHERE id <= (SELECT max(id) FROM alarms) - 10000")

    def alarm_history(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, alarm, state, message FROM alarms ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [dict(r) for r in rows]


def open_store_readonly(path: str | Path) -> sqlite3.Connection:
    """For tools (review-export): read the index without creating or changing it."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"{p}: no review database (the page keeps it as <state_dir>/{DB_NAME})")
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db
