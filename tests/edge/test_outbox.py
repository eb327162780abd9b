"""Outbox durability: rows survive reopen, in order; acks delete; duplicates and capacity are explicit."""

from __future__ import annotations

import json
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


# -- a corrupt, truncated, full or read-only outbox file (issue 14: crash loops) ----------------------
def _payload(i: int, size: int = 300) -> bytes:
    return json.dumps({"i": i, "pad": chr(65 + i % 26) * size}).encode()  # events are JSON objects


def _filled(path: Path, n: int = 600, size: int = 300) -> Path:
    ob = Outbox(path, 10_000)
    for i in range(n):
        ob.add(f"e{i:05d}", "t/result", _payload(i, size))
    ob.ack_many(range(1, 11))  # delivered rows leave gaps in seq: salvage must not count them lost
    ob.close()
    return path


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def test_corrupt_pages_are_moved_aside_and_every_readable_row_is_kept(tmp_path: Path) -> None:
    path = _filled(tmp_path / "o.db")
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:  # two leaf pages in the middle of the table
        f.seek(4096 * (pages // 2))
        f.write(b"\xa5" * 8192)
    ob = Outbox(path, 10_000)
    assert ob.recovery is not None and "corrupt" in ob.recovery and "moved to" in ob.recovery
    rows = ob.pending(limit=10_000)
    assert 500 < len(rows) < 590, ob.recovery
    assert f"recovered {len(rows)} undelivered event(s)" in ob.recovery
    lost = 590 - len(rows)
    assert "unreadable or missing seq" in ob.recovery and f"up to {lost} events lost" in ob.recovery, ob.recovery
    assert all(r.payload == _payload(int(r.event_id[1:])) for r in rows)
    assert [r.seq for r in rows] == sorted(r.seq for r in rows) and rows[0].seq == 11
    assert ob.add("new", "t/result", b"x") and ob.pending(limit=10_000)[-1].seq > rows[-1].seq
    ob.close()
    assert len(_aside(path)) == 1
    reopened = Outbox(path, 10_000)  # the new file is sound: no second recovery
    assert reopened.recovery is None and reopened.count() == len(rows) + 1
    reopened.close()


def test_garbage_file_is_moved_aside_and_the_unknown_loss_is_said(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(bytes(range(256)) * 200)
    Path(f"{path}-wal").write_bytes(b"junk")
    ob = Outbox(path)
    assert ob.count() == 0 and ob.recovery is not None
    assert "recovered 0" in ob.recovery and "unknown" in ob.recovery, ob.recovery
    assert ob.add("e", "t", b"p")
    ob.close()
    assert _aside(path), "the corrupt file must be kept for a person to look at"
    wal = Path(f"{path}-wal")  # the old WAL went with it: it must not be replayed into the new file
    assert not wal.exists() or wal.read_bytes() != b"junk"


def test_zero_length_file_is_a_truncation_not_a_new_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"")
    ob = Outbox(path)
    assert ob.recovery is not None and "0 bytes" in ob.recovery and "unknown" not in ob.recovery.split(";")[0]
    ob.close()
    assert len(_aside(path)) == 1


def test_truncated_file_keeps_the_rows_before_the_cut(tmp_path: Path) -> None:
    path = _filled(tmp_path / "o.db")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    ob = Outbox(path, 10_000)
    assert ob.recovery is not None, "a half file must not pass for a sound one"
    n = ob.count()
    assert 100 < n < 590 and f"recovered {n}" in ob.recovery, ob.recovery
    ob.close()


def _tmpfs(path: Path, options: str) -> bool:
    import os
    import subprocess
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode == 0


def _umount(path: Path) -> None:
    import subprocess
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_still_opens_and_writes_resume_when_space_is_back(tmp_path: Path) -> None:
    from tests.faults.harness import fill_disk

    mnt = tmp_path / "fs"
    if not _tmpfs(mnt, "size=2M"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        _filled(mnt / "o.db", n=50)
        filler = fill_disk(mnt)
        ob = Outbox(mnt / "o.db")  # before: sqlite3.OperationalError: disk I/O error (no room for -shm)
        assert ob.count() == 40 and ob.recovery is None
        with pytest.raises(sqlite3.OperationalError, match="full"):
            ob.add("new", "t", b"p")
        filler.unlink()
        assert ob.add("new", "t", b"p") and ob.count() == 41
        ob.close()
    finally:
        _umount(mnt)


def test_read_only_outbox_is_a_clear_deployment_error(tmp_path: Path) -> None:
    import subprocess

    from edge.outbox import OutboxUnwritable

    mnt = tmp_path / "fs"
    if not _tmpfs(mnt, "size=2M"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        _filled(mnt / "o.db", n=20)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(OutboxUnwritable, match=f"{mnt}.* is read-only"):
            Outbox(mnt / "o.db")
    finally:
        _umount(mnt)
