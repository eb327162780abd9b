"""One daemon per state dir and per MQTT client id: the fences themselves (the two-daemon cases
with real processes are in tests/faults/test_crash_loops.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.statelock import LockHeld, client_id_lock, runtime_dir, state_lock


def test_second_lock_on_a_state_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    import os

    first = state_lock(tmp_path)
    try:
        assert (tmp_path / "daemon.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(LockHeld, match=rf"state dir {tmp_path} is in use by another edge daemon \(pid {os.getpid()}"):
            state_lock(tmp_path)
    finally:
        first.release()
    state_lock(tmp_path).release()  # free again once released


def test_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from edge.statelock import state_lock; "
            "from pathlib import Path; state_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).resolve().parents[2])],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {p.pid}"):
            state_lock(tmp_path)
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while True:  # SIGKILL leaves no stale lock: the kernel drops the flock with the process
        try:
            state_lock(tmp_path).release()
            break
        except LockHeld:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_client_id_lock_is_keyed_by_broker_and_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    assert runtime_dir() == tmp_path
    a = client_id_lock("127.0.0.1", 1883, "edge-l1-s1")
    try:
        with pytest.raises(LockHeld, match=re.escape("MQTT client id 'edge-l1-s1' on 127.0.0.1:1883")):
            client_id_lock("127.0.0.1", 1883, "edge-l1-s1")
        client_id_lock("127.0.0.1", 1884, "edge-l1-s1").release()  # another broker: no clash
        client_id_lock("127.0.0.1", 1883, "edge-l1-s2").release()
    finally:
        a.release()
