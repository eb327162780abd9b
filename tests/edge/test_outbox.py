"""Outbox durability: rows survive reopen, in order; acks delete; duplicates and capacity are explicit."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edge.outbox import Outbox, OutboxFull


def test_rows_survive_reopen_in_order(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "outbox.db"
    ob = Outbox(path)
    for i in range(5):
        assert ob.add(f"e{i}", "t/result", f"p{i}".encode())
    ob.close()

    ob = Outbox(path)
    rows = ob.pending()
    assert [r.event_id for r in rows] == [f"e{i}" for i in range(5)]
    assert [r.payload for r in rows] == [f"p{i}".encode() for i in range(5)]
    assert all(r.topic == "t/result" and r.qos == 1 and r.attempts == 0 for r in rows)
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert ob.count() == 5
    ob.close()


def test_wal_and_full_sync(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    db = ob._conn()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ob.close()


def test_ack_removes_and_seq_never_reused(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add("a", "t", b"1")
    ob.add("b", "t", b"2")
    first = ob.pending()
    ob.ack(first[0].seq)
    assert [r.event_id for r in ob.pending()] == ["b"]
    ob.ack_many([first[1].seq])
    assert ob.count() == 0 and ob.pending() == []
    ob.close()
    ob = Outbox(tmp_path / "o.db")
    ob.add("c", "t", b"3")
    # a sender cursor at the last sent seq must still see rows added after the table emptied
    assert [r.event_id for r in ob.pending(after_seq=first[1].seq)] == ["c"]
    ob.close()


def test_pending_after_seq_and_limit(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    for i in range(10):
        ob.add(f"e{i}", "t", b"x")
    rows = ob.pending(limit=3)
    assert [r.event_id for r in rows] == ["e0", "e1", "e2"]
    assert [r.event_id for r in ob.pending(limit=2, after_seq=rows[-1].seq)] == ["e3", "e4"]
    assert ob.get(rows[0].seq) == rows[0]
    ob.mark_attempt(rows[0].seq)
    row = ob.get(rows[0].seq)
    assert row is not None and row.attempts == 1
    ob.close()


def test_duplicate_event_id_keeps_one_row(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    assert ob.add("same", "t", b"first")
    assert not ob.add("same", "t", b"second")
    assert ob.count() == 1 and ob.pending()[0].payload == b"first"
    ob.close()


def test_full_raises_never_drops(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_events=3)
    for i in range(3):
        ob.add(f"e{i}", "t", b"x")
    assert ob.fill_ratio() == 1.0
    with pytest.raises(OutboxFull):
        ob.add("e3", "t", b"x")
    assert not ob.add("e0", "t", b"x")  # a duplicate is still recognised when full
    ob.ack(ob.pending()[0].seq)
    assert ob.add("e3", "t", b"x")
    assert [r.event_id for r in ob.pending()] == ["e1", "e2", "e3"]
    ob.close()


def test_thread_safety_add_and_ack(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    n_threads, per = 4, 50
    acked: list[int] = []
    done = threading.Event()

    def producer(k: int) -> None:
        for i in range(per):
            ob.add(f"{k}-{i}", "t", b"x")

    def acker() -> None:
        while not done.is_set() or ob.count():
            rows = ob.pending(limit=10)
            ob.ack_many([r.seq for r in rows])
            acked.extend(r.seq for r in rows)

    producers = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    ack_thread = threading.Thread(target=acker)
    ack_thread.start()
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    ack_thread.join(timeout=30)
    assert ob.count() == 0
    assert len(acked) == len(set(acked)) == n_threads * per
    ob.close()
    # the count is derived from the file, not just memory
    assert sqlite3.connect(tmp_path / "o.db").execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_closed_outbox_refuses(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(RuntimeError):
        ob.add("x", "t", b"x")
