"""Crash loops, hangs and memory bounds (issue 14) against the real daemon (`python -m edge run`), a real
Mosquitto and a real subscriber; a unix datagram socket stands in for systemd's NOTIFY_SOCKET.

- a full outbox / disk is backpressure: the watchdog keeps being fed and a restart comes up alarmed;
- SIGTERM ends within the drain deadline however stuck the path is, and no part is lost;
- a corrupt outbox is moved aside and salvaged instead of crashing every start;
- a second daemon on one state dir or one MQTT client id is refused (exit 78), a takeover is an alarm;
- the frame path holds at most pipeline.max_queued_mb of frames and maps;
- 20 SIGHUP reloads do not pile up compiled models.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import psutil
import pytest

import edge.sources.folder as folder_module
from tests.broker import Broker, Subscriber
from tests.daemon_proc import Daemon, alarms, results, running, station, write_config
from tests.faults.harness import (
    PersistentSubscriber,
    check,
    fill_disk,
    part_png,
    small_tmpfs,
    tally,
    vm_hwm_mb,
    wait_until,
    write_atomic,
)
from tests.notify_socket import NotifySocket
from tests.tiny_package import make_part, make_tiny_package

EX_CONFIG = 78


def folder(inbox: Path) -> dict[str, Any]:
    return {"type": "folder", "path": str(inbox), "settle_s": 0.0, "poll_interval_s": 0.05}


def write_parts(inbox: Path, names: list[str], size: tuple[int, int] = (96, 128)) -> None:
    templates = [part_png(i, size) for i in range(4)]
    for i, name in enumerate(names):
        write_atomic(inbox, f"{name}.png", templates[i % 4])


def files(folder_path: Path) -> set[str]:
    return {f.stem for f in folder_path.iterdir() if f.is_file()} if folder_path.is_dir() else set()


def outbox_rows(state: Path) -> int:
    with sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=5) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def stop(d: Daemon, timeout: float = 30.0) -> tuple[int | None, float]:
    """SIGTERM; (exit code or None when it hung past `timeout` and was killed, seconds it took)."""
    t0 = time.monotonic()
    if d.proc.poll() is None:
        d.signal(signal.SIGTERM)
    try:
        rc: int | None = d.proc.wait(timeout)
    except Exception:
        d.proc.kill()
        d.proc.wait(10)
        rc = None
    took = time.monotonic() - t0
    d.wait(5)
    return rc, took


# -- a full disk is backpressure, not a hang ------------------------------------------------------------
def test_full_disk_keeps_the_watchdog_fed_and_a_restart_comes_up_alarmed(tmp_path: Path, tiny_package: Path,
                                                                          report: Any) -> None:
    """Before: with the disk full the watchdog pings stopped after the hang timeout (systemd kills
    the daemon with a core dump every ~90 s), and a restart on the full disk exited at once (the
    outbox could not make its -shm file, seq.json could not be written): a crash loop."""
    with small_tmpfs(tmp_path / "state", "size=16M") as state:
        if state is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        broker = Broker(tmp_path / "broker").start()
        sub = PersistentSubscriber(broker.host, broker.port)
        notify = NotifySocket(tmp_path / "notify.sock")
        inbox = tmp_path / "in"
        inbox.mkdir()
        first = [f"p{i:06d}" for i in range(3)]
        held = [f"p{i:06d}" for i in range(3, 9)]
        write_parts(inbox, first)
        cfg = write_config(tmp_path / "station.yaml", station(
            tmp_path, tiny_package, broker, folder(inbox), state_dir=str(state),
            evidence={"dir": str(tmp_path / "evidence")}, pipeline={"hang_timeout_s": 3, "drain_timeout_s": 3}))
        d = Daemon(cfg, tmp_path / "daemon.log", notify.env(2.0))  # pings every 1 s
        d2 = None
        filler = None
        try:
            assert sub.wait_parts(set(first), 60), d.text()
            filler = fill_disk(state)
            write_parts(inbox, held)
            t_raised = sub.wait_alarm("outbox_error", "raised", 30)
            assert t_raised is not None, d.text()
            time.sleep(8)  # well past hang_timeout_s with parts waiting and no result
            pings_full = notify.count("WATCHDOG=1", t_raised + 4, t_raised + 8)
            assert d.proc.poll() is None, d.text()
            assert pings_full >= 3, f"the watchdog starved while the disk was full ({pings_full} pings)\n{d.text()}"
            rc, took = stop(d, 3 + 15)
            assert rc == 0 and took < 3 + 10, (rc, took, d.text())
            assert set(held) <= files(inbox), "held parts must stay in the folder for the next start"

            t_restart = time.monotonic()  # the disk is still full
            d2 = Daemon(cfg, tmp_path / "daemon2.log", notify.env(2.0))
            assert notify.wait("READY=1", t_restart, 60), f"no READY=1 on a full disk\n{d2.text()}"
            t_raised2 = sub.wait_alarm("outbox_error", "raised", 30, after=t_restart)
            assert t_raised2 is not None, d2.text()
            time.sleep(7)  # past hang_timeout_s again
            pings_restart = notify.count("WATCHDOG=1", t_raised2 + 1)
            assert d2.proc.poll() is None and pings_restart >= 4, (pings_restart, d2.text())
            assert set(held) <= files(inbox) and not sub.part_ids() & set(held)

            filler.unlink()
            t_free = time.monotonic()
            ok = sub.wait_parts(set(first + held), 60)
            recover_s = time.monotonic() - t_free
            t_cleared = sub.wait_alarm("outbox_error", "cleared", 30, after=t_free)
            rc2, _ = stop(d2)
        finally:
            for daemon in (d, d2):
                if daemon is not None:
                    daemon.kill()
            notify.close()
            sub.close()
            broker.kill()
        entry = tally("disk full: watchdog fed, restart on the full disk", first + held, sub.results(),
                      pings_while_full=pings_full, pings_after_restart_on_full_disk=pings_restart,
                      sigterm_s=round(took, 2), recover_s=round(recover_s, 2))
        report(entry)
        assert ok and t_cleared is not None and rc2 == 0, (entry, d2.text() if d2 else "")
        check(entry)


def test_a_real_hang_still_starves_the_watchdog(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    """The other side of the rule above: a result thread stuck with no backpressure reason (here: the
    outbox lock held, as by a hung disk write) must stop the pings, and they resume once it moves."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    data = station(tmp_path, tiny_package, broker, folder(inbox), evidence={"enabled": False},
                   pipeline={"hang_timeout_s": 2})
    sub = Subscriber(broker, ["inspection/l1/s1/#"])
    try:
        with running(data) as pipe:
            write_parts(inbox, ["p0"])
            assert sub.wait_for(lambda ms: len(results(sub)) == 1, 30)
            assert pipe._healthy_for_watchdog()
            with pipe.outbox._lock:  # the result thread blocks inside Outbox.add
                write_parts(inbox, ["p1", "p2"])
                assert wait_until(lambda: not pipe._healthy_for_watchdog(), 20), "a hang must starve the watchdog"
                assert pipe.flow is not None and not pipe.alarms.is_active("outbox_error")
            assert wait_until(pipe._healthy_for_watchdog, 20)
            assert sub.wait_for(lambda ms: len(results(sub)) == 3, 30)
    finally:
        sub.close()


def test_a_decode_that_never_returns_starves_the_watchdog(tmp_path: Path, tiny_package: Path,
                                                          broker: Broker) -> None:
    """A file whose read or decode never returns (a hung share, a decoder loop) leaves the frame path
    idle, which used to look healthy: the capture thread's own beat must stop the pings, so systemd
    restarts the daemon and the crash ledger counts the file (then quarantines it)."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    notify = NotifySocket(tmp_path / "notify.sock")
    data = station(tmp_path, tiny_package, broker, folder(inbox), evidence={"enabled": False},
                   pipeline={"hang_timeout_s": 3})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log",
               {**notify.env(1.0), folder_module.TEST_HOOK_HANG_ENV: "stuck"})
    try:
        assert notify.wait("READY=1", 0.0, 60), d.text()
        write_parts(inbox, ["a-fine"])
        assert wait_until(lambda: (tmp_path / "in" / "done" / "a-fine.png").exists(), 30), d.text()
        t_ok = time.monotonic()
        assert wait_until(lambda: notify.count("WATCHDOG=1", t_ok) >= 3, 10), "no pings while healthy"
        write_parts(inbox, ["b-stuck"])
        assert wait_until(lambda: "TEST HOOK" in d.text(), 30), d.text()
        t_hang = time.monotonic()
        time.sleep(3 + 3)  # the hang timeout, then some
        late = notify.count("WATCHDOG=1", t_hang + 3 + 1)
        assert late == 0, f"{late} watchdog pings while the capture thread hung\n{d.text()}"
    finally:
        d.kill()
        notify.close()


# -- SIGTERM with everything stuck ---------------------------------------------------------------------
def test_sigterm_with_a_full_outbox_stops_within_the_drain_deadline(tmp_path: Path, tiny_package: Path,
                                                                   report: Any) -> None:
    """Before: the broker down and the outbox full, SIGTERM hung for ever (put(_STOP) on a full queue,
    the capture thread retrying a folder part without end)."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    names = [f"p{i:06d}" for i in range(260)]
    write_parts(inbox, names)
    state = tmp_path / "state"
    drain = 3.0
    data = station(tmp_path, tiny_package, None, folder(inbox), outbox={"max_events": 100},
                   pipeline={"drain_timeout_s": drain}, evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    try:
        assert wait_until(lambda: "holding the pipeline" in d.text(), 90), d.text()
        time.sleep(3)  # every queue fills up behind the held result
        rc, took = stop(d, drain + 20)
    finally:
        d.kill()
    left, done, failed = files(inbox), files(inbox / "done"), files(inbox / "failed")
    assert rc is not None, f"SIGTERM hung for {took:.0f} s\n{d.text()[-3000:]}"
    assert took < drain + 10, (took, d.text()[-3000:])
    assert not failed and not left & done and left | done == set(names), "a part went missing at stop"
    assert len(done) == outbox_rows(state) == 100, "a part left the folder without a stored result"
    assert "not finished by the drain deadline" in d.text() or "not queued (the pipeline is stopping)" in d.text()

    broker = Broker(tmp_path / "broker").start()  # the next start delivers everything
    sub = PersistentSubscriber(broker.host, broker.port)
    data2 = station(tmp_path, tiny_package, broker, folder(inbox), outbox={"max_events": 100},
                    evidence={"enabled": False})
    d2 = Daemon(write_config(tmp_path / "station2.yaml", data2), tmp_path / "daemon2.log")
    try:
        ok = sub.wait_parts(set(names), 120)
        rc2, _ = stop(d2)
    finally:
        d2.kill()
        sub.close()
        broker.kill()
    entry = tally("SIGTERM with a full outbox and no broker", names, sub.results(), stop_s=round(took, 2),
                  drain_timeout_s=drain, left_in_folder=len(left), stored_before_stop=len(done))
    report(entry)
    assert ok and rc2 == 0, (entry, d2.text()[-3000:])
    check(entry)


# -- a corrupt outbox ------------------------------------------------------------------------------------
UNSENT = 60


@pytest.fixture(scope="module")
def unsent_state(tmp_path_factory: pytest.TempPathFactory, tiny_package: Path) -> Path:
    """A stopped daemon's state dir whose outbox holds UNSENT undelivered results (no broker)."""
    base = tmp_path_factory.mktemp("unsent")
    inbox = base / "in"
    inbox.mkdir()
    write_parts(inbox, [f"u{i:04d}" for i in range(UNSENT)])
    data = station(base, tiny_package, None, folder(inbox), evidence={"enabled": False})
    d = Daemon(write_config(base / "station.yaml", data), base / "daemon.log")
    try:
        assert wait_until(lambda: len(files(inbox / "done")) == UNSENT, 90), d.text()
        rc, _ = stop(d)
        assert rc == 0, d.text()
    finally:
        d.kill()
    assert outbox_rows(base / "state") == UNSENT
    return base / "state"


def corrupt(path: Path, kind: str) -> None:
    size = path.stat().st_size
    if kind == "pages":  # two pages in the middle overwritten
        with open(path, "r+b") as f:
            f.seek(4096 * (size // 4096 // 2))
            f.write(os.urandom(8192))
    elif kind == "garbage":
        path.write_bytes(os.urandom(size))
    elif kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["pages", "garbage", "truncated", "empty"])
def test_corrupt_outbox_is_moved_aside_salvaged_and_alarmed(kind: str, unsent_state: Path, tmp_path: Path,
                                                           tiny_package: Path, broker: Broker, report: Any) -> None:
    """Before: a corrupt outbox crashed every start (a restart loop), and a 0-byte one was taken for a
    new, empty outbox: its undelivered results vanished without a word."""
    state = tmp_path / "state"
    shutil.copytree(unsent_state, state)
    corrupt(state / "outbox.sqlite3", kind)
    inbox = tmp_path / "in"
    inbox.mkdir()
    new = [f"n{i:03d}" for i in range(5)]
    sub = Subscriber(broker, ["inspection/l1/s1/#"])
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, tiny_package, broker, folder(inbox),
                                                          evidence={"enabled": False}))
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        assert sub.wait_for(lambda ms: any(a["alarm"] == "outbox_recovered" for a in alarms(sub)), 60), d.text()
        write_parts(inbox, new)
        assert sub.wait_for(lambda ms: set(new) <= {e["part_id"] for e in results(sub)}, 60), d.text()
        time.sleep(1.0)  # the salvaged backlog goes out first (lower seq); anything more would show now
        rc, _ = stop(d)
    finally:
        d.kill()
        sub.close()
    alarm = next(a for a in alarms(sub) if a["alarm"] == "outbox_recovered")
    message = alarm["message"]
    recovered = int(message.split("recovered ")[1].split()[0])
    old = {e["part_id"] for e in results(sub)} - set(new)
    report({"case": f"corrupt outbox ({kind})", "generated": UNSENT, "delivered": len(old),
            "recovered": recovered, "alarm": message.split("; ", 1)[1]})
    assert rc == 0 and alarm["state"] == "raised", d.text()
    assert len(old) == recovered and all(p.startswith("u") for p in old), (recovered, sorted(old))
    assert list(state.glob("outbox.sqlite3.corrupt-*")), "the corrupt file must be kept"
    if kind == "pages":
        assert recovered > 0 and (recovered == UNSENT or f"up to {UNSENT - recovered} events lost" in message), message
    elif kind == "truncated":
        assert 0 < recovered < UNSENT and f"up to {UNSENT - recovered} events lost" in message, message
    else:
        assert recovered == 0 and ("unknown" in message or "0 bytes" in message), message


# -- two daemons, one station ----------------------------------------------------------------------------
def test_second_daemon_on_one_state_dir_or_client_id_is_refused(tmp_path: Path, tiny_package: Path,
                                                               broker: Broker) -> None:
    """Before: both ran, sharing the outbox and seq.json, and the broker kicked one client off for the
    other in a loop with nothing in the log."""
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    source = {"type": "synthetic", "fps": 5, "count": 0}
    data = station(tmp_path, tiny_package, broker, source, evidence={"enabled": False})
    cfg = write_config(tmp_path / "a.yaml", data)
    sub = Subscriber(broker, ["inspection/l1/s1/#"])
    a = Daemon(cfg, tmp_path / "a.log", env)
    others: list[Daemon] = []
    try:
        assert sub.wait_for(lambda ms: len(results(sub)) >= 3, 60), a.text()
        b = Daemon(cfg, tmp_path / "b.log", env)
        others.append(b)
        assert b.wait(60) == EX_CONFIG, b.text()
        assert f"state dir {tmp_path / 'state'} is in use by another edge daemon (pid {a.proc.pid}" in b.text()
        data_c = {**data, "state_dir": str(tmp_path / "state-c")}
        c = Daemon(write_config(tmp_path / "c.yaml", data_c), tmp_path / "c.log", env)
        others.append(c)
        assert c.wait(60) == EX_CONFIG, c.text()
        assert f"MQTT client id 'edge-l1-s1' on 127.0.0.1:{broker.port} is in use" in c.text(), c.text()
        assert f"pid {a.proc.pid}" in c.text()
        assert a.proc.poll() is None

        n = len(results(sub))
        assert sub.wait_for(lambda ms: len(results(sub)) >= n + 3, 30), "A must go on undisturbed"
        rc, _ = stop(a)
        assert rc == 0, a.text()
    finally:
        for d in (a, *others):
            d.kill()
        sub.close()


class TakeoverBroker:
    """Answers every MQTT 5 CONNECT with CONNACK, then a DISCONNECT with reason 0x8E (session taken
    over), as a broker does when another connection claims the client id. A stand-in because the
    Mosquitto here (2.0.11) only closes the socket, without the reason code."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(1)[:1] != b"\x10":  # CONNECT
                        continue
                    conn.recv(65536)
                    self.connects += 1
                    conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties
                    time.sleep(0.3)
                    conn.sendall(b"\xe0\x02\x8e\x00")  # DISCONNECT, 0x8E, no properties
                    time.sleep(0.2)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_session_taken_over_is_an_alarm_and_a_clear_log(tmp_path: Path, tiny_package: Path) -> None:
    """A client-id clash across machines cannot be fenced by a lock: the broker's 0x8E must be said.
    Before: logged as an ordinary disconnect, reconnecting for ever without a word about why."""
    stub = TakeoverBroker()
    data = station(tmp_path, tiny_package, None, {"type": "synthetic", "fps": 2, "count": 0},
                   evidence={"enabled": False})
    data["mqtt"]["port"] = stub.port
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    try:
        assert wait_until(lambda: "alarm client_id_conflict raised" in d.text(), 60), d.text()
        assert "two stations share one client id" in d.text() and "'edge-l1-s1'" in d.text()
        assert d.text().count("alarm client_id_conflict raised") == 1, "latched: one raise, not one per takeover"
        assert d.proc.poll() is None
        rc, _ = stop(d)
        assert rc == 0, d.text()
    finally:
        d.kill()
        stub.close()


# -- memory ---------------------------------------------------------------------------------------------
def peak_growth(d: Daemon, settle_s: float = 6.0, timeout: float = 120.0) -> float:
    """VmHWM growth until it stops growing for settle_s (the path is full and held)."""
    pid = d.proc.pid
    last, t_last = vm_hwm_mb(pid), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and time.monotonic() - t_last < settle_s:
        time.sleep(0.5)
        now = vm_hwm_mb(pid)
        if now > last + 2:
            last, t_last = now, time.monotonic()
    return last


def test_burst_of_big_frames_stays_within_max_queued_mb(tmp_path: Path, tiny_package: Path, report: Any) -> None:
    """Before: 64 inferred 1 MP frames (image + float map, 5 MB each) piled up in the result queue
    behind a full outbox; now the frame path holds at most pipeline.max_queued_mb."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    small = [f"a{i:04d}" for i in range(110)]  # 100 fill the outbox, the rest are held
    big = [f"b{i:04d}" for i in range(80)]
    write_parts(inbox, small)
    max_mb = 40
    data = station(tmp_path, tiny_package, None, folder(inbox), outbox={"max_events": 100},
                   pipeline={"max_queued_mb": max_mb, "drain_timeout_s": 2}, evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    try:
        assert wait_until(lambda: "holding the pipeline" in d.text(), 90), d.text()
        time.sleep(1)
        rss_before = psutil.Process(d.proc.pid).memory_info().rss / 2**20
        hwm_before = vm_hwm_mb(d.proc.pid)
        ok, png = cv2.imencode(".png", cv2.resize(make_part((96, 128), seed=1), (1000, 1000)))
        assert ok
        for name in big:
            write_atomic(inbox, f"{name}.png", png.tobytes())
        hwm = peak_growth(d)
        taken = len(big) - len(files(inbox) & set(big))  # files leave only once stored: none may have
        rc, took = stop(d, 30)
    finally:
        d.kill()
    growth = hwm - max(hwm_before, rss_before)
    report({"case": "burst of 80 1-MP frames behind a full outbox", "generated": len(big), "delivered": 0,
            "missing": 0, "max_queued_mb": max_mb, "rss_before_mb": round(rss_before), "peak_mb": round(hwm),
            "growth_mb": round(growth)})
    assert taken == 0 and rc is not None and took < 15, (taken, rc, took)
    assert set(big) <= files(inbox), "a held part left the folder"
    # 1 MP part = 1 MB frame + 4 MB map; 64 of them (the old result queue) would be > 300 MB
    assert growth < max_mb + 100, f"peak RSS grew {growth:.0f} MB over the {max_mb} MB budget\n{d.text()[-2000:]}"


@pytest.fixture(scope="module")
def ballast_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("ballast") / "pkg", ballast_mb=32)


def test_twenty_reloads_do_not_pile_up_models(tmp_path: Path, ballast_package: Path, report: Any) -> None:
    """Before: every SIGHUP left the old compiled model alive (the AsyncInferQueue callback was a bound
    method of the Inferencer: a reference cycle through C++): +66 MB and +2 threads per reload with this
    32 MB package, 1.3 GB after 20. Now RSS stays flat."""
    data = station(tmp_path, ballast_package, None, {"type": "synthetic", "fps": 5, "count": 0},
                   evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    rss: list[float] = []
    threads: list[int] = []
    try:
        assert wait_until(lambda: "ready:" in d.text(), 60), d.text()
        proc = psutil.Process(d.proc.pid)
        for i in range(21):
            if i:
                d.signal(signal.SIGHUP)
                assert wait_until(lambda i=i: d.text().count("reloaded:") >= i, 60), d.text()[-2000:]
            time.sleep(0.5)
            rss.append(proc.memory_info().rss / 2**20)
            threads.append(proc.num_threads())
        rc, _ = stop(d)
    finally:
        d.kill()
    growth = rss[-1] - rss[1]  # from after the first reload: one-off allocations are not a leak
    report({"case": "20 SIGHUP reloads (32 MB package)", "rss_first_mb": round(rss[0]), "rss_last_mb": round(rss[-1]),
            "growth_mb": round(growth, 1), "threads_first": threads[0], "threads_last": threads[-1]})
    assert rc == 0, d.text()[-2000:]
    # a leaked model costs > 32 MB each: 19 of them would be > 600 MB; allow noise
    assert growth < 120, f"RSS grew {growth:.0f} MB over 19 reloads: {[round(x) for x in rss]}"
    assert threads[-1] <= threads[1] + 2, f"threads grew: {threads}"
