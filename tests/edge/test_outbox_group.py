"""Group commit: several results share one transaction (one fsync), with the same promises as add()."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.outbox import Outbox


def test_add_many_stores_in_order_skips_duplicates_and_reports_full(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path, max_events=100) as ob:
        assert ob.add("e0", "t", b"0")
        items = [(f"e{i}", "t", str(i).encode(), 1) for i in range(102)]
        got = ob.add_many(items)
        assert got[0] is False  # e0 was stored before: idempotent
        assert got[1:100] == [True] * 99 and ob.count() == 100
        assert got[100:] == [None, None]  # full: not stored, the caller holds these parts
        assert ob.add_many([("e5", "t", b"5", 1)]) == [False]  # a duplicate is recognised even when full
    with Outbox(path, max_events=100) as ob:  # durable: every stored row is there after reopening, in order
        rows = ob.pending(limit=1000)
        assert [r.event_id for r in rows] == [f"e{i}" for i in range(100)]
        assert [r.payload for r in rows[1:3]] == [b"1", b"2"]


def test_add_many_is_all_or_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as ob:
        with pytest.raises(ValueError, match="qos"):
            ob.add_many([("a", "t", b"1", 1), ("b", "t", b"2", 7)])
        with pytest.raises(Exception):  # noqa: B017 - sqlite refuses a non-text topic: the batch rolls back
            ob.add_many([("a", "t", b"1", 1), ("b", object(), b"2", 1)])  # type: ignore[list-item]
        assert ob.count() == 0 and ob.pending() == []
        assert ob.add_many([("a", "t", b"1", 1)]) == [True]
