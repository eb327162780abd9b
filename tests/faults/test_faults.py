"""Fault injection against the real daemon (`python -m edge run`), a real Mosquitto and a real subscriber.

Each case reports parts generated, delivered, missing (must be 0), duplicate deliveries (allowed only
with the same event_id) and the time to recover (see conftest.py for where the report goes).
Short versions run in the default test run; `-m slow` (scripts/fault_run.sh) runs the long ones.

Why the broker-kill case uses a persistent broker and a persistent subscriber session: see
tests/faults/harness.py. Malformed configs and broken packages are mostly covered by
tests/edge/test_config.py, test_cli.py and test_package.py; here only a few cases go through the
real `run` command, and the corrupt package is also swapped in at runtime (SIGHUP).
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge.sources.folder as folder_module
from edge.config import FolderSourceConfig, FrameChecksConfig, SyntheticSourceConfig
from edge.seqstore import SeqStore
from edge.sources import Frame, SyntheticSource, check_frame
from edge.sources.folder import FolderSource, image_size
from tests.broker import Broker
from tests.daemon_proc import Daemon, running, station, write_config
from tests.faults.harness import (
    BASE,
    Feeder,
    FifoCamera,
    PersistentSubscriber,
    check,
    encode,
    fill_disk,
    part_png,
    persistent_broker,
    png_bomb,
    small_tmpfs,
    tally,
    use_all_inodes,
    vm_hwm_mb,
    write_atomic,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.tiny_package import make_part


@dataclass(frozen=True)
class Profile:
    name: str
    broker_kills: int
    broker_outage_s: float
    broker_parts: int
    broker_fps: float
    net_cycles: int
    cut_s: float
    net_parts: int
    net_fps: float
    daemon_kills: int
    kill_parts: int
    kill_rate: float
    seed: int = 7


SHORT = Profile("short", broker_kills=2, broker_outage_s=1.0, broker_parts=200, broker_fps=40,
                net_cycles=1, cut_s=2.0, net_parts=450, net_fps=25,
                daemon_kills=3, kill_parts=300, kill_rate=30)
LONG = Profile("long", broker_kills=10, broker_outage_s=5.0, broker_parts=2000, broker_fps=20,
               net_cycles=5, cut_s=10.0, net_parts=3000, net_fps=20,
               daemon_kills=25, kill_parts=2500, kill_rate=25)
PROFILES = [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


def synthetic_ids(count: int, seed: int, defect_rate: float = 0.3) -> set[str]:
    """The part ids a synthetic source with this seed generates (the truth is in the id)."""
    src = SyntheticSource(SyntheticSourceConfig(type="synthetic", count=count, fps=0, seed=seed,
                                                defect_rate=defect_rate))
    src.open()
    ids = set()
    while (f := src.read(0.0)) is not None:
        ids.add(f.part_id)
    return ids


def stop_daemon(d: Daemon, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if d.proc.poll() is None:
        d.signal(sig)
    try:
        return d.wait(timeout)
    except Exception:
        d.proc.kill()
        return d.wait(10)


def outbox_rows(state: Path) -> int:
    with sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=5) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def outbox_integrity(state: Path) -> str:
    with sqlite3.connect(state / "outbox.sqlite3", timeout=5) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "max": None}
    return {"mean": round(statistics.fmean(xs), 3), "max": round(max(xs), 3)}


def verdict_of(part_id: str) -> str:
    """Feeder parts p<i>: a defect on every 4th."""
    return "fail" if int(part_id[1:]) % 4 == 0 else "pass"


# -- broker SIGKILL + restart ----------------------------------------------------------------------
@pytest.mark.parametrize("p", PROFILES)
def test_broker_sigkill_and_restart(p: Profile, tmp_path: Path, tiny_package: Path, report: Any) -> None:
    broker = persistent_broker(tmp_path / "broker").start()
    sub = PersistentSubscriber(broker.host, broker.port)
    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "count": p.broker_parts,
                                                    "fps": p.broker_fps, "seed": p.seed, "stop_at_end": False},
                   evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    generated = synthetic_ids(p.broker_parts, p.seed)
    recover: list[float] = []
    stream_s = p.broker_parts / p.broker_fps
    gap = max(0.5, (stream_s - p.broker_kills * p.broker_outage_s) / (p.broker_kills + 1))
    try:
        assert sub.wait_count(3, 60), d.text()
        for _ in range(p.broker_kills):
            time.sleep(gap)
            broker.kill()  # SIGKILL: no clean save, no goodbye to the clients
            time.sleep(p.broker_outage_s)
            broker.start()
            t_up = time.monotonic()
            took = sub.recovery(t_up, 60)
            assert took is not None, d.text()
            recover.append(took)
        ok = sub.wait_parts(generated, 60 + stream_s)
        time.sleep(0.5)  # late duplicates would show now
        entry = tally("broker SIGKILL + restart", generated, sub.results(), profile=p.name,
                      broker_kills=p.broker_kills, outage_s=p.broker_outage_s, recover_s=stats(recover))
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
        broker.kill()
    check(entry)


# -- network cut and black hole (TCP proxy between daemon and broker) ---------------------------------
@pytest.mark.parametrize("p", PROFILES)
def test_network_cut_and_blackhole(p: Profile, tmp_path: Path, tiny_package: Path, report: Any) -> None:
    broker = Broker(tmp_path / "broker").start()  # the broker itself stays up: the subscriber is never cut
    proxy = TcpProxy(broker.port).start()
    sub = PersistentSubscriber(broker.host, broker.port)
    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "count": p.net_parts, "fps": p.net_fps,
                                                    "seed": p.seed, "stop_at_end": False},
                   mqtt={"port": proxy.port, "keepalive": 5}, evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    generated = synthetic_ids(p.net_parts, p.seed)
    cut_recover: list[float] = []
    bh_detect: list[float] = []
    bh_recover: list[float] = []
    try:
        assert sub.wait_count(3, 60), d.text()
        for _ in range(p.net_cycles):
            time.sleep(1.0)
            proxy.set_mode("cut")
            time.sleep(p.cut_s)
            proxy.set_mode("pass")
            t_up = time.monotonic()
            took = sub.recovery(t_up, 60)
            assert took is not None, d.text()
            cut_recover.append(took)
            time.sleep(1.0)
            accepted = proxy.accepted
            proxy.set_mode("blackhole")
            t_bh = time.monotonic()
            # Only the daemon's keepalive can notice; it then opens a new connection.
            assert proxy.wait_accepted(accepted + 1, 60), "the daemon never noticed the black hole"
            bh_detect.append(time.monotonic() - t_bh)
            time.sleep(min(p.cut_s, 3.0))
            proxy.set_mode("pass")
            t_up = time.monotonic()
            took = sub.recovery(t_up, 60)
            assert took is not None, d.text()
            bh_recover.append(took)
        ok = sub.wait_parts(generated, 60 + p.net_parts / p.net_fps)
        time.sleep(0.5)
        entry = tally("network cut + black hole (proxy)", generated, sub.results(), profile=p.name,
                      cycles=p.net_cycles, cut_s=p.cut_s, keepalive_s=5, cut_recover_s=stats(cut_recover),
                      blackhole_detect_s=stats(bh_detect), blackhole_recover_s=stats(bh_recover),
                      proxy_connections=proxy.accepted)
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
        proxy.close()
        broker.kill()
    check(entry)
    assert max(bh_detect) < 3 * 5 + 5, "black hole detection should take about two keepalive periods"


# -- daemon SIGKILL at random points, then restart -------------------------------------------------------
@pytest.mark.parametrize("p", PROFILES)
def test_daemon_sigkill_at_random_points(p: Profile, tmp_path: Path, tiny_package: Path, report: Any) -> None:
    broker = Broker(tmp_path / "broker").start()
    sub = PersistentSubscriber(broker.host, broker.port)
    inbox = tmp_path / "in"
    inbox.mkdir()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                         "poll_interval_s": 0.05}))
    feeder = Feeder(inbox, p.kill_parts, p.kill_rate, size=(240, 320)).start()
    rng = random.Random(p.seed)
    points: list[str] = []
    restart_to_result: list[float] = []
    d: Daemon | None = None
    try:
        for k in range(p.daemon_kills + 1):
            d = Daemon(cfg, tmp_path / f"daemon{k}.log")
            t_spawn = time.monotonic()
            if k == p.daemon_kills:
                break
            if k == 1 or rng.random() < 0.25:  # during startup: imports, model compile, outbox replay
                delay = rng.uniform(0.1, 3.0)
                time.sleep(delay)
                points.append(f"startup+{delay:.2f}s")
            else:  # while parts flow: somewhere between capture, outbox, file move and PUBACK
                n = len(sub.results())
                assert sub.wait_count(n + 1, 60), d.text()
                restart_to_result.append(time.monotonic() - t_spawn)
                delay = rng.uniform(0.0, 0.5)
                time.sleep(delay)
                points.append(f"running+{delay:.2f}s")
            d.proc.kill()
            d.wait()
        assert d is not None
        n = len(sub.results())
        assert sub.wait_count(n + 1, 60), d.text()
        restart_to_result.append(time.monotonic() - t_spawn)
        feeder.join(p.kill_parts / p.kill_rate + 60)
        ok = sub.wait_parts(feeder.ids, 120)
        time.sleep(0.5)
        results = sub.results()
        entry = tally("daemon SIGKILL + restart", feeder.ids(), results, profile=p.name, kills=p.daemon_kills,
                      kill_points=points, restart_to_first_result_s=stats(restart_to_result))
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert stop_daemon(d) == 0, d.text()
    finally:
        feeder.stop()
        if d is not None:
            d.kill()
        sub.close()
        broker.kill()
    check(entry)
    assert all(e["verdict"] == verdict_of(e["part_id"]) for e in results)
    assert not [f for f in inbox.iterdir() if f.is_file() and not f.name.startswith(".")], "parts left behind"
    assert {f.stem for f in (inbox / "done").iterdir()} == feeder.ids()
    assert not list((inbox / "failed").iterdir())
    assert outbox_integrity(state) == "ok" and outbox_rows(state) == 0
    seqs = sorted({e["event_id"]: e["seq"] for e in results}.values())
    assert len(seqs) == len(set(seqs)), "a sequence number was used twice across restarts"


# -- disk full in the state directory ----------------------------------------------------------------
def test_disk_full_holds_parts_until_space_is_back(tmp_path: Path, tiny_package: Path, report: Any) -> None:
    with small_tmpfs(tmp_path / "state", "size=16M") as state:
        if state is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        broker = Broker(tmp_path / "broker").start()
        sub = PersistentSubscriber(broker.host, broker.port)
        inbox = tmp_path / "in"
        inbox.mkdir()
        first = [f"p{i:06d}" for i in range(1, 6)]
        second = [f"p{i:06d}" for i in range(6, 31)]
        for name in first:
            write_atomic(inbox, f"{name}.png", part_png(int(name[1:])))
        cfg = write_config(tmp_path / "station.yaml", station(
            tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                             "poll_interval_s": 0.05},
            state_dir=str(state), evidence={"dir": str(tmp_path / "evidence")}))
        d = Daemon(cfg, tmp_path / "daemon.log")
        try:
            assert sub.wait_parts(set(first), 60), d.text()
            filler = fill_disk(state)
            for name in second:
                write_atomic(inbox, f"{name}.png", part_png(int(name[1:])))
            t_full = time.monotonic()
            t_raised = sub.wait_alarm("outbox_error", "raised", 30)
            assert t_raised is not None, d.text()
            time.sleep(1.5)
            assert d.proc.poll() is None, f"the daemon died on a full disk:\n{d.text()}"
            held = {f.stem for f in inbox.iterdir() if f.is_file()}
            delivered_while_full = sub.part_ids() & set(second)
            done_while_full = {f.stem for f in (inbox / "done").iterdir()}
            # A file leaves the folder only once its result is stored: whatever is in done/ arrives.
            assert held, "no part was held although nothing could be stored"
            filler.unlink()
            t_free = time.monotonic()
            ok = sub.wait_parts(set(first + second), 60)
            t_all = time.monotonic()
            t_cleared = sub.wait_alarm("outbox_error", "cleared", 30)
            time.sleep(0.5)
            entry = tally("disk full (state dir on a 16 MB tmpfs)", first + second, sub.results(),
                          held_while_full=len(held), delivered_while_full=len(delivered_while_full),
                          done_while_full=len(done_while_full - set(first)),
                          alarm_raised_after_s=round(t_raised - t_full, 3),
                          recover_s=round(t_all - t_free, 3),
                          alarm_cleared_after_s=round(t_cleared - t_free, 3) if t_cleared else None)
            report(entry)
            assert ok, f"{entry}\n{d.text()[-3000:]}"
            assert t_cleared is not None
            assert stop_daemon(d) == 0, d.text()
        finally:
            d.kill()
            d.wait()
            sub.close()
            broker.kill()
        check(entry)
        assert {f.stem for f in (inbox / "done").iterdir()} == set(first + second)
        assert outbox_integrity(state) == "ok" and outbox_rows(state) == 0


def test_no_inode_left_when_a_sequence_block_is_due(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                   monkeypatch: pytest.MonkeyPatch, report: Any) -> None:
    """The sequence file is rewritten (new file + rename) every BLOCK parts. A full disk at that
    moment - here: no inode left, so the outbox can still grow but no file can be created - must
    hold the part with an alarm like a failing outbox does, not kill the result thread; and no
    sequence number may be handed out that the file does not cover (it would repeat after a restart)."""
    monkeypatch.setattr(SeqStore, "BLOCK", 4)
    with small_tmpfs(tmp_path / "state", "size=16M,nr_inodes=64") as state:
        if state is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        sub = PersistentSubscriber(broker.host, broker.port)
        inbox = tmp_path / "in"
        inbox.mkdir()
        names = [f"p{i:06d}" for i in range(1, 13)]
        for name in names[:3]:
            write_atomic(inbox, f"{name}.png", part_png(int(name[1:])))
        data = station(tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                                        "poll_interval_s": 0.05},
                       state_dir=str(state), evidence={"enabled": False})
        fatal = None
        try:
            with running(data) as pipe:
                assert pipe.flow is not None
                assert sub.wait_parts(set(names[:3]), 30)
                fillers = use_all_inodes(state)
                for name in names[3:]:
                    write_atomic(inbox, f"{name}.png", part_png(int(name[1:])))
                t_raised = sub.wait_alarm("outbox_error", "raised", 20)
                fatal = pipe.flow.fatal
                held = sum(1 for f in inbox.iterdir() if f.is_file())
                for f in fillers:
                    f.unlink()
                ok = sub.wait_parts(set(names), 30)
                t_cleared = sub.wait_alarm("outbox_error", "cleared", 10)
                fatal = fatal or pipe.flow.fatal
        finally:
            sub.close()
        entry = tally("no inode left at a sequence-block boundary (in-process)", names, sub.results(),
                      held_while_full=held, alarm_raised=t_raised is not None, alarm_cleared=t_cleared is not None,
                      thread_crash=fatal)
        report(entry)
        assert fatal is None, f"the result thread died: {fatal}"
        assert ok and t_raised is not None and t_cleared is not None and held > 0, entry
        check(entry)
        seqs = [e["seq"] for e in sub.results()]
        reserved = json.loads((state / "seq.json").read_text())["reserved"]
        assert len(set(seqs)) == len(seqs) and max(seqs) < reserved, (seqs, reserved)


# -- corrupt model package ------------------------------------------------------------------------
def _copy_package(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_package_exit_78_and_sighup_keeps_the_old_model(tmp_path: Path, tiny_package: Path,
                                                                 broker: Broker, report: Any) -> None:
    truncated = _copy_package(tiny_package, tmp_path / "truncated")
    data = (truncated / "model.bin").read_bytes()
    (truncated / "model.bin").write_bytes(data[: len(data) // 2])
    bad_hash = _copy_package(tiny_package, tmp_path / "bad_hash")
    meta = json.loads((bad_hash / "package.json").read_text())
    meta["files"]["model.bin"] = "0" * 64
    (bad_hash / "package.json").write_text(json.dumps(meta))
    cases = [(truncated, True, r"model.bin: SHA-256 mismatch"),
             (truncated, False, "OpenVINO cannot read the model"),
             (bad_hash, True, r"model.bin: SHA-256 mismatch")]
    for i, (pkg, verify, message) in enumerate(cases):
        cfg = write_config(tmp_path / f"bad{i}.yaml", station(tmp_path, pkg, None, {"type": "synthetic"},
                                                              model={"verify_hashes": verify}))
        d = Daemon(cfg, tmp_path / f"bad{i}.log")
        assert d.wait(60) == 78, d.text()
        assert message in d.text(), d.text()

    sub = PersistentSubscriber(broker.host, broker.port)
    good = station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 30, "seed": 2},
                   evidence={"enabled": False})
    cfg = write_config(tmp_path / "station.yaml", good)
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        assert sub.wait_count(5, 60), d.text()
        write_config(cfg, {**good, "model": {**good["model"], "path": str(truncated)}})
        d.signal(signal.SIGHUP)
        t_alarm = sub.wait_alarm("model_reload", "raised", 30)
        assert t_alarm is not None, d.text()
        n = len(sub.results())
        assert sub.wait_count(n + 10, 30), "the old model must keep inspecting"
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    indices = sorted(int(e["part_id"][3:]) for e in results)
    entry = tally("corrupt package on SIGHUP", {e["part_id"] for e in results}, results,
                  exit_78_cases=len(cases), gapless=indices == list(range(1, len(indices) + 1)))
    report(entry)
    assert entry["gapless"], "a part was lost around the failed reload"
    assert {e["model"]["version"] for e in results} == {"1.0.0"}
    alarm = sub.alarms("model_reload", "raised")[0]
    assert "model.bin" in alarm["message"] and "1.0.0" in alarm["message"]


# -- malformed configs (the config helper's tests cover many more: tests/edge/test_config.py) -------------
@pytest.mark.parametrize(("section", "value", "message"), [
    ("pipeline", {"queue_size": 0}, "pipeline.queue_size: Input should be greater than or equal to 1"),
    ("mqtt", {"keepalive": "often"}, "mqtt.keepalive: Input should be a valid integer"),
    ("source", {"type": "folder"}, "source.path: Field required"),
])
def test_malformed_config_exit_78_names_the_field(section: str, value: dict[str, Any], message: str,
                                                  tmp_path: Path, tiny_package: Path) -> None:
    data = station(tmp_path, tiny_package, None, {"type": "synthetic"})
    data[section] = value if section == "source" else {**data.get(section, {}), **value}
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    assert d.wait(60) == 78, d.text()
    assert message in d.text(), d.text()


# -- garbage in the hot folder -------------------------------------------------------------------------
def test_garbage_files_get_error_verdicts_without_oom(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                     report: Any) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    part = make_part((96, 128), seed=1)
    jpg = encode(".jpg", part)
    files: dict[str, tuple[bytes, str]] = {  # name -> (bytes, expected verdict)
        "g0.png": (part_png(1, defect=False), "pass"),
        "d0.png": (part_png(2, defect=True), "fail"),
        "zero.png": (b"", "error"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "error"),
        "huge.png": (png_bomb(20000, 20000), "error"),  # 0.4 MB file, 400 MP (1.2 GB as BGR)
        "huge-header.png": (png_bomb(20000, 20000)[:200], "error"),
        "tiny.png": (encode(".png", part[:4, :4]), "error"),
        "float.tiff": (encode(".tiff", part.astype(np.float32)), "error"),
        # Inside the input contract (docs: 16-bit scaled to 8 bit, alpha dropped): inspected normally.
        "gray16.png": (encode(".png", part.astype(np.uint16) * 257), "pass"),
        "gray-alpha.png": (png_bomb(128, 96, value=170, channels=2), "pass"),
    }
    old = time.time() - 5
    for name, (blob, _) in files.items():
        write_atomic(inbox, name, blob, mtime=old)
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                         "poll_interval_s": 0.05}))
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log")
    stems = {Path(n).stem for n in files}
    try:
        ok = sub.wait_parts(stems, 60)
        time.sleep(0.5)
        peak_mb = vm_hwm_mb(d.proc.pid)
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    entry = tally("garbage files in the hot folder", stems, results, daemon_peak_rss_mb=round(peak_mb, 1),
                  verdicts={e["part_id"]: e["verdict"] for e in results})
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    assert entry["duplicates"] == 0
    got = {e["part_id"]: e for e in results}
    for name, (_, verdict) in files.items():
        e = got[Path(name).stem]
        assert e["verdict"] == verdict, (name, e["verdict"], e["error"])
        folder = "failed" if verdict == "error" else "done"
        assert (inbox / folder / name).exists(), f"{name} not in {folder}/"
    assert "pixels" in got["huge"]["error"], got["huge"]["error"]
    assert peak_mb < 350, f"daemon peaked at {peak_mb:.0f} MB RSS"
    assert not sub.alarms("model_error"), "a bad file is not a model error"
    assert sub.alarms("frame_error", "raised")


# -- a camera that stalls, then disconnects, then comes back ------------------------------------------
def test_camera_stall_and_disconnect(tmp_path: Path, tiny_package: Path, broker: Broker, report: Any) -> None:
    cam = FifoCamera(tmp_path / "camera.fifo", fps=20)
    source = {"type": "camera", "uri": str(cam.path), "stall_timeout_s": 0.5, "open_timeout_s": 5,
              "read_timeout_s": 2, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, tiny_package, broker, source,
                                                          evidence={"enabled": False}))
    sub = PersistentSubscriber(broker.host, broker.port)
    marks: dict[str, float] = {}

    def camera() -> None:
        cam.play(2.0)
        marks["stall"] = time.monotonic()
        time.sleep(2.0)  # open but silent: a hung camera
        marks["unplug"] = time.monotonic()
        cam.hang_up()
        time.sleep(2.0)
        marks["back"] = time.monotonic()
        cam.play(2.5)  # blocks until the daemon reopens the device
        marks["end"] = time.monotonic()

    d = Daemon(cfg, tmp_path / "daemon.log")
    t = threading.Thread(target=camera, daemon=True)
    t.start()
    try:
        t.join(60)
        assert not t.is_alive(), f"the daemon never reopened the camera\n{d.text()}"
        assert sub.wait_alarm("camera_lost", "cleared", 10) is not None, d.text()
        time.sleep(0.5)
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        cam.close()
        sub.close()
    results = sub.results()
    stalled = [e for e in results if marks["stall"] <= e["_t"] <= marks["back"]]
    after = [e for e in results if e["_t"] > marks["back"] and e["verdict"] == "pass"]
    raised = sub.wait_alarm("camera_lost", "raised", 0)
    entry = {"case": "camera stall + disconnect (FIFO)", "frames_sent": cam.frames,
             "pass": sum(e["verdict"] == "pass" for e in results),
             "error": sum(e["verdict"] == "error" for e in results),
             "errors_while_down": sum(e["verdict"] == "error" for e in stalled),
             "alarm_raised_after_stall_s": round(raised - marks["stall"], 3) if raised else None,
             "recover_s": round(after[0]["_t"] - marks["back"], 3) if after else None}
    report(entry)
    assert raised is not None and entry["errors_while_down"] >= 3, entry
    assert all("no frame for" in e["error"] for e in results if e["verdict"] == "error")
    assert not [e for e in stalled if e["verdict"] == "pass" and e["_t"] > marks["stall"] + 1.0], \
        "a stalled camera produced a pass"
    assert after, "inspection did not resume after the camera came back"


# -- ACL-denied publish ------------------------------------------------------------------------------
def test_acl_denied_publish_is_kept_and_delivered_after_the_fix(tmp_path: Path, tiny_package: Path,
                                                              report: Any) -> None:
    broker = Broker(tmp_path / "broker", acl=(f"topic read inspection/#\ntopic write {BASE}/status\n"
                                              f"topic write {BASE}/alarm\ntopic write {BASE}/stats\n")).start()
    sub = PersistentSubscriber(broker.host, broker.port)
    inbox = tmp_path / "in"
    inbox.mkdir()
    names = [f"p{i:06d}" for i in range(1, 11)]
    for name in names:
        write_atomic(inbox, f"{name}.png", part_png(int(name[1:])), mtime=time.time() - 5)
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                         "poll_interval_s": 0.05}))
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        assert sub.wait_alarm("publish_rejected", "raised", 30) is not None, d.text()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ((state / "outbox.sqlite3").exists()
                                                   and outbox_rows(state) == len(names)):
            time.sleep(0.1)
        kept = outbox_rows(state)
        assert kept == len(names), f"{kept} events in the outbox\n{d.text()}"
        assert not sub.results(), "the broker must not have delivered a denied publish"
        broker.write_acl("topic readwrite inspection/#")
        broker.reload()
        t_fix = time.monotonic()
        ok = sub.wait_parts(set(names), 30)
        t_all = time.monotonic()
        cleared = sub.wait_alarm("publish_rejected", "cleared", 10)
        assert stop_daemon(d) == 0, d.text()
    finally:
        d.kill()
        sub.close()
        broker.kill()
    entry = tally("ACL-denied publish, then ACL fixed", names, sub.results(), kept_in_outbox=kept,
                  recover_s=round(t_all - t_fix, 3))
    report(entry)
    assert ok and cleared is not None, entry
    check(entry)
    assert outbox_rows(state) == 0


# -- unit checks of the fixes the fault runs led to ------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".pgm", ".ppm"])
def test_image_size_reads_only_the_header(ext: str) -> None:
    img = make_part((37, 53), seed=0)
    if ext != ".pgm":
        img = np.dstack([img, img, img])
    blob = encode(ext, img)
    assert image_size(blob) == (53, 37)
    assert image_size(blob[:4]) is None and image_size(b"") is None and image_size(b"not an image") is None


def test_folder_refuses_images_above_max_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    old = time.time() - 5
    write_atomic(inbox, "big.png", part_png(0), mtime=old)  # 128x96 = 12288 pixels
    write_atomic(inbox, "fat.png", b"\0" * (64 * 8 + (1 << 20) + 1), mtime=old)
    src = FolderSource(FolderSourceConfig(type="folder", path=inbox, settle_s=0.0, poll_interval_s=0.01,
                                          max_pixels=64))
    src.open()
    frames: dict[str, Frame] = {}
    deadline = time.monotonic() + 5
    while len(frames) < 2 and time.monotonic() < deadline:
        f = src.read(0.1)
        if f is not None:
            frames[f.part_id] = f
    assert "128x96 = 12288 pixels > source.max_pixels=64" in (frames["big"].error or "")
    assert "too large" in (frames["fat"].error or "")
    # a format whose header is not parsed is checked after decoding
    monkeypatch.setattr(folder_module, "image_size", lambda data: None)
    assert "pixels > source.max_pixels=64" in (src._load("big.png").error or "")  # type: ignore[union-attr]


@pytest.mark.parametrize(("image", "message"), [
    (np.full((96, 128), 100.0, np.float32), "unsupported pixel type float32"),
    (np.full((4, 128), 100, np.uint8), "too small (128x4)"),
])
def test_check_frame_refuses_what_preprocessing_cannot_take(image: np.ndarray, message: str) -> None:
    assert message in (check_frame(Frame("p", 0.0, image, live=False), FrameChecksConfig()) or "")


def test_sequence_block_is_handed_out_only_once_it_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SeqStore, "BLOCK", 2)
    store = SeqStore(tmp_path / "seq.json")
    assert [store.next(), store.next()] == [0, 1]

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("os.fsync", no_space)
        for _ in range(2):
            with pytest.raises(OSError):
                store.next()
    assert json.loads((tmp_path / "seq.json").read_text())["reserved"] == 2
    assert not (tmp_path / "seq.tmp").exists()
    assert store.next() == 2 and json.loads((tmp_path / "seq.json").read_text())["reserved"] == 4
