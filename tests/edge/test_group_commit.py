"""Group commit in the real pipeline (in-process, folder source, real outbox): results that are ready
together share one outbox transaction, a folder file moves only once its row is durable, and a group
the outbox can only partly take is held (never dropped) while the watchdog keeps being fed."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge.alarms import OUTBOX_ERROR
from edge.events import event_id_for
from edge.sources import Frame
from edge.sources.folder import FolderSource
from edge.text import safe_part_id
from tests.broker import Broker
from tests.daemon_proc import running, station
from tests.faults.harness import PersistentSubscriber, check, part_png, tally, write_atomic


class Transactions:
    """Rows inserted per outbox transaction, from SQLite's statement trace (an INSERT outside
    BEGIN/COMMIT is a transaction of its own, as Outbox.add runs it); `partial` counts transactions
    that stored some rows and found the outbox full for others."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.partial = 0
        self._open: list[int] | None = None  # [inserts, full-outbox look-ups] of the open transaction

    def __call__(self, sql: str) -> None:
        head = sql.lstrip().upper()
        if head.startswith("BEGIN"):
            self._open = [0, 0]
        elif head.startswith("COMMIT") and self._open is not None:
            if self._open[0]:
                self.rows.append(self._open[0])
                self.partial += bool(self._open[1])
            self._open = None
        elif head.startswith("INSERT"):
            if self._open is None:
                self.rows.append(1)
            else:
                self._open[0] += 1
        elif head.startswith("SELECT 1 FROM OUTBOX WHERE EVENT_ID") and self._open is not None:
            self._open[1] += 1


@contextmanager
def durable_commits(monkeypatch: pytest.MonkeyPatch, outbox_file: Path) -> Iterator[list[str]]:
    """The real FolderSource.commit, checking first (on a connection of its own, so only what is
    committed counts) that the part's event is in the outbox. Yields the parts moved too early."""
    early: list[str] = []
    commit = FolderSource.commit

    def checked(self: FolderSource, frame: Frame, ok: bool) -> None:
        event_id = event_id_for("l1/s1", safe_part_id(frame.part_id), frame.capture_ts)
        with sqlite3.connect(f"file:{outbox_file}?mode=ro", uri=True, timeout=10) as db:
            if not db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)).fetchone():
                early.append(frame.part_id)
        commit(self, frame, ok)

    monkeypatch.setattr(FolderSource, "commit", checked)
    yield early


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def files(folder: Path) -> set[str]:
    return {f.stem for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")} if folder.exists() else set()


def feed_while_held(pipe: Any, inbox: Path, names: list[str], first: int = 0) -> None:
    """Write parts while the outbox is busy (its lock held, as during a slow fsync), so their results
    are all waiting when it frees up; then let it go."""
    flow = pipe.flow
    with pipe.outbox._lock:
        for i, name in enumerate(names):
            write_atomic(inbox, f"{name}.png", part_png(first + i))
        wait(lambda: flow.inflight == len(names), 60, f"{len(names)} parts waiting for the outbox")


def folder_station(tmp_path: Path, pkg: Path, broker: Broker, group_max: int, **sections: Any) -> dict[str, Any]:
    inbox = tmp_path / "in"
    inbox.mkdir()
    return station(tmp_path, pkg, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                           "poll_interval_s": 0.05},
                   outbox={"group_commit_max": group_max, "group_commit_ms": 2.0, **sections.pop("outbox", {})},
                   evidence={"enabled": False}, **sections)


@pytest.mark.parametrize("group_max", [64, 1])
def test_ready_results_share_one_transaction_and_files_move_only_once_durable(
        group_max: int, tmp_path: Path, tiny_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 results ready together: with grouping they are stored in a few transactions (one fsync each);
    group_commit_max 1 keeps one per result. Either way no file leaves the folder before its row is
    committed. The broker is down, so every row stays in the outbox to be looked at."""
    broker = Broker(tmp_path / "broker")  # never started: nothing listens on its port
    data = folder_station(tmp_path, tiny_package, broker, group_max)
    inbox, names = tmp_path / "in", [f"g{i:03d}" for i in range(20)]
    tx = Transactions()
    with durable_commits(monkeypatch, tmp_path / "state" / "outbox.sqlite3") as early, running(data) as pipe:
        assert pipe.outbox._db is not None
        pipe.outbox._db.set_trace_callback(tx)
        feed_while_held(pipe, inbox, names)
        wait(lambda: files(inbox / "done") == set(names), 60, "every part in done/")
        assert pipe.outbox.count() == 20
        seqs = [json.loads(r.payload)["seq"] for r in pipe.outbox.pending(limit=100)]  # in the order stored
        assert seqs == sorted(seqs) and len(set(seqs)) == 20, f"event seq not increasing in storage order: {seqs}"
    assert early == [], f"moved to done/ before their row was committed: {early}"
    assert sum(tx.rows) == 20, tx.rows
    if group_max == 1:
        assert tx.rows == [1] * 20
    else:
        assert max(tx.rows) >= 10 and len(tx.rows) <= 5, f"rows per transaction: {tx.rows}"


def test_a_group_the_full_outbox_takes_only_partly_is_held_not_lost(
        tmp_path: Path, tiny_package: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Broker down, outbox.max_events 100: 80 parts are stored, then 50 arrive together. Their group
    is stored as far as it fits (20), the other 30 are held: files stay in the folder, outbox_error is
    raised, the watchdog beat goes on. Once the broker is back every part is delivered exactly once."""
    caplog.set_level(logging.ERROR, logger="edge.flow")
    broker = Broker(tmp_path / "broker")  # started later: the outbox fills up meanwhile
    data = folder_station(tmp_path, tiny_package, broker, 64, outbox={"max_events": 100},
                          mqtt={"reconnect_max_s": 0.5})
    inbox = tmp_path / "in"
    first, burst = [f"a{i:03d}" for i in range(80)], [f"b{i:03d}" for i in range(50)]
    tx = Transactions()
    sub: PersistentSubscriber | None = None
    try:
        with durable_commits(monkeypatch, tmp_path / "state" / "outbox.sqlite3") as early, running(data) as pipe:
            assert pipe.outbox._db is not None and pipe.flow is not None
            flow = pipe.flow
            pipe.outbox._db.set_trace_callback(tx)
            for i, name in enumerate(first):
                write_atomic(inbox, f"{name}.png", part_png(i))
            wait(lambda: files(inbox / "done") == set(first), 60, "the first 80 parts stored")
            feed_while_held(pipe, inbox, burst, first=80)
            wait(lambda: OUTBOX_ERROR in pipe.alarms.active(), 30, "the outbox_error alarm")
            beat = flow.hold_beat
            time.sleep(1.5)
            assert flow.hold_beat > beat, "holding on purpose must keep feeding the watchdog"
            assert pipe._healthy_for_watchdog()
            assert pipe.outbox.count() == 100
            done = files(inbox / "done")
            assert len(done) == 100 and len(files(inbox)) == 30 and not files(inbox / "failed")
            assert done | files(inbox) == set(first) | set(burst), "a part went missing"
            assert tx.partial >= 1, f"no group was partly stored: rows per transaction {tx.rows}"
            assert any("cannot store the result of 30 part(s)" in r.getMessage() for r in caplog.records), \
                [r.getMessage() for r in caplog.records]

            broker.start()  # consumers and broker back: the outbox drains, the held parts follow
            sub = PersistentSubscriber(broker.host, broker.port)
            ok = sub.wait_parts(set(first) | set(burst), 90)
            wait(lambda: OUTBOX_ERROR not in pipe.alarms.active(), 30, "outbox_error to clear")
        entry = tally("group partly stored in a full outbox", set(first) | set(burst), sub.results())
    finally:
        if sub is not None:
            sub.close()
        broker.kill()
    assert ok, entry
    check(entry)
    assert entry["duplicates"] == 0, entry
    assert early == [], f"moved to done/ before their row was committed: {early}"
    assert files(inbox / "done") == set(first) | set(burst) and not files(inbox)


def test_group_commit_max_1_is_the_switch_back(tmp_path: Path) -> None:
    """Config bounds: grouping can be turned off (1) and the wait is bounded."""
    from pydantic import ValidationError

    from edge.config import OutboxConfig

    assert OutboxConfig(group_commit_max=1).group_commit_max == 1
    assert OutboxConfig().group_commit_max > 1
    for bad in ({"group_commit_max": 0}, {"group_commit_ms": -1}, {"group_commit_ms": 5000}):
        with pytest.raises(ValidationError):
            OutboxConfig(**bad)




def test_acks_skip_the_fsync_but_adds_keep_it(tmp_path: Path) -> None:
    """A delete need not be durable (a lost one only redelivers the same event_id), so ack_many runs
    with synchronous=NORMAL; every add after it must be back on FULL (one fsync per transaction)."""
    from edge.outbox import Outbox

    with Outbox(tmp_path / "o.sqlite3") as ob:
        assert ob.add_many([(f"e{i}", "t", b"{}", 1) for i in range(3)]) == [True] * 3
        ob.ack_many(r.seq for r in ob.pending()[:2])
        assert ob.count() == 1
        assert ob._db is not None and ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Outbox(tmp_path / "o.sqlite3") as ob:
        assert [r.event_id for r in ob.pending()] == ["e2"]
