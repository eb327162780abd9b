"""The station daemon end to end: real OpenVINO (tiny package), real Mosquitto, real files.

In-process runs (Pipeline/run_pipeline) cover sources, alarms, metrics and evidence quickly;
real `python -m edge run` subprocesses cover signals, systemd notify, crash and restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.config import validate_config
from edge.contract import Region
from edge.daemon import run_pipeline
from edge.events import region_dict, shift_regions, validate_event
from edge.evidence import EvidenceStore
from edge.seqstore import SeqStore
from tests.broker import Broker, Subscriber
from tests.daemon_proc import (
    BASE,
    ROOT,
    Daemon,
    alarms,
    expected,
    results,
    running,
    station,
    wait_results,
    write_config,
    write_parts,
)
from tests.tiny_package import make_part, make_tiny_package


# -- isolation ------------------------------------------------------------------------------------
def test_edge_never_imports_torch_or_training() -> None:
    code = ("import sys, edge.daemon, edge.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'nncf')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- folder daemon as a real subprocess -------------------------------------------------------------
def test_folder_daemon_every_part_one_event(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    first = ["g0", "g1", "g2", "d0", "d1", "bad0"]
    later = ["g3", "g4", "d2", "black0", "white0", "bad1"]
    write_parts(inbox, first)
    (inbox / "wip.png.tmp").write_bytes(b"still being written")
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.2,
                                         "poll_interval_s": 0.05}))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log", {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                              "WATCHDOG_USEC": "1000000"})
    try:
        wait_results(sub, len(first))
        write_parts(inbox, later)
        got = wait_results(sub, len(first) + len(later))
        time.sleep(0.5)  # anything extra would show up now
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.text()
    finally:
        d.kill()
        sub.close()
    got = results(sub)
    assert sorted(e["part_id"] for e in got) == sorted(first + later), d.text()
    for e in got:
        validate_event(e)
        assert e["verdict"] == expected(e["part_id"]), e
        assert e["model"]["version"] == "1.0.0" and e["rules"]["pixel_threshold"] == 0.5
        if e["verdict"] == "fail":
            assert e["regions"] and e["evidence"]
    assert "not a readable image" in next(e for e in got if e["part_id"] == "bad0")["error"]
    assert "all-black" in next(e for e in got if e["part_id"] == "black0")["error"]
    assert "all-white frame, saturated" in next(e for e in got if e["part_id"] == "white0")["error"]
    assert len({e["seq"] for e in got}) == len(got)
    assert sorted(p.stem for p in (inbox / "done").iterdir()) == sorted(["g0", "g1", "g2", "g3", "g4", "d0", "d1", "d2"])
    assert sorted(p.stem for p in (inbox / "failed").iterdir()) == ["bad0", "bad1", "black0", "white0"]
    assert [p.name for p in inbox.iterdir() if p.is_file()] == ["wip.png.tmp"]
    status = [json.loads(m.payload) for m in sub.on(f"{BASE}/status")]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    assert any(a["alarm"] == "frame_error" and a["state"] == "raised" for a in alarms(sub))
    notify.settimeout(0.1)
    msgs = []
    while True:
        try:
            msgs.append(notify.recv(4096).decode())
        except OSError:
            break
    notify.close()
    joined = "\n".join(msgs)
    assert "READY=1" in joined and "WATCHDOG=1" in joined and "STOPPING=1" in joined
    assert joined.index("READY=1") < joined.index("STOPPING=1")


def test_sigkill_and_restart_lose_no_part(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    names = [f"{'d' if i % 4 == 0 else 'g'}{i:03d}" for i in range(60)]
    write_parts(inbox, names, size=(240, 320))
    old = time.time() - 5
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                         "poll_interval_s": 0.05}, evidence={"enabled": False}))
    sub = Subscriber(broker, [f"{BASE}/result"])
    d = Daemon(cfg, tmp_path / "run1.log")
    try:
        wait_results(sub, 3)
        d.proc.kill()
        d.wait()
        left = sum(1 for p in inbox.iterdir() if p.is_file())
        first_run = results(sub)
        d = Daemon(cfg, tmp_path / "run2.log")
        sub.wait_for(lambda ms: {json.loads(m.payload)["part_id"] for m in ms} >= set(names), 30)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.text()
    finally:
        d.kill()
        sub.close()
    got = results(sub)
    assert left > 0, "the kill came after the last part: nothing was tested"
    assert {e["part_id"] for e in got} == set(names), d.text()
    by_part: dict[str, set[str]] = {}
    for e in got:
        assert e["verdict"] == expected(e["part_id"])
        by_part.setdefault(e["part_id"], set()).add(e["event_id"])
    assert all(len(ids) == 1 for ids in by_part.values()), "a duplicate must carry the same event_id"
    first_ids = {e["event_id"] for e in first_run}
    new = [e["seq"] for e in got[len(first_run):] if e["event_id"] not in first_ids]
    assert new and min(new) > max(e["seq"] for e in first_run), "seq must keep increasing across restarts"
    assert not [p for p in inbox.iterdir() if p.is_file()]


def test_sighup_swaps_model_and_sigterm_drains(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 40, "seed": 1},
                   evidence={"enabled": False})
    cfg = write_config(tmp_path / "station.yaml", data)
    broken = make_tiny_package(tmp_path / "broken", version="9.9.9")
    (broken / "model.bin").write_bytes(b"corrupted")
    pkg2 = make_tiny_package(tmp_path / "pkg2", version="2.0.0")
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_results(sub, 10)
        write_config(cfg, {**data, "model": {**data["model"], "path": str(broken)}})
        d.signal(signal.SIGHUP)  # a bad package: alarm, and the old model keeps inspecting
        assert sub.wait_for(lambda ms: any(a["alarm"] == "model_reload" and a["state"] == "raised"
                                           for a in alarms(sub)), 10), d.text()
        n = len(results(sub))
        wait_results(sub, n + 5)
        write_config(cfg, {**data, "model": {**data["model"], "path": str(pkg2)}})
        d.signal(signal.SIGHUP)
        assert sub.wait_for(lambda ms: any(e["model"]["version"] == "2.0.0" for e in results(sub)), 10), d.text()
        wait_results(sub, len(results(sub)) + 5)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.text()
    finally:
        d.kill()
        sub.close()
    got = results(sub)
    versions = [e["model"]["version"] for e in sorted(got, key=lambda e: e["seq"])]
    assert "9.9.9" not in versions and versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    indices = sorted(int(e["part_id"][3:]) for e in got)
    assert indices == list(range(1, len(got) + 1)), "a part was lost or duplicated around the swap or the drain"
    assert all(e["verdict"] == expected(e["part_id"]) for e in got)
    cleared = [a for a in alarms(sub) if a["alarm"] == "model_reload" and a["state"] == "cleared"]
    assert cleared and "2.0.0" in cleared[0]["message"]
    status = [json.loads(m.payload) for m in sub.on(f"{BASE}/status")]
    assert status[-1]["state"] == "offline" and status[-1]["model"]["version"] == "2.0.0"
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0, "drain left events behind"


# -- in-process: sources that fail ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing_camera", "video_ends"])
def test_lost_camera_gives_error_verdicts_and_alarm(kind: str, tmp_path: Path, tiny_package: Path,
                                                    broker: Broker) -> None:
    if kind == "missing_camera":
        source: dict[str, Any] = {"type": "camera", "uri": "/dev/video-nope", "stall_timeout_s": 0.3,
                                  "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}
        good = 0
    else:
        video = tmp_path / "parts.avi"
        w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96), isColor=False)
        for i in range(4):
            w.write(make_part(defect=i == 1, seed=i))
        w.release()
        source, good = {"type": "video", "path": str(video), "stall_timeout_s": 0.3}, 4
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        with running(station(tmp_path, tiny_package, broker, source)):
            got = wait_results(sub, good + 2)
            assert sub.wait_for(lambda ms: any(a["alarm"] == "camera_lost" for a in alarms(sub)), 5)
    finally:
        sub.close()
    assert [e["verdict"] for e in got[:good]] == ["pass", "fail", "pass", "pass"][:good]
    for e in got[good:]:
        validate_event(e)
        assert e["verdict"] == "error" and "no frame for" in e["error"]
    assert alarms(sub)[0]["state"] == "raised"


def test_inference_failure_is_an_error_verdict_and_alarm(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    class Broken:
        def submit(self, *args: Any, **kwargs: Any) -> None:  # the flow passes coarse=True
            raise RuntimeError("device lost")

        def wait_all(self) -> None:
            pass

    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        with running(station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 20})) as p:
            wait_results(sub, 2)
            p.model.inferencer = Broken()  # type: ignore[assignment]
            n = len(results(sub))
            got = wait_results(sub, n + 3)
            assert sub.wait_for(lambda ms: any(a["alarm"] == "model_error" for a in alarms(sub)), 5)
    finally:
        sub.close()
    errors = [e for e in got if e["verdict"] == "error"]
    assert errors and all("device lost" in e["error"] for e in errors)
    assert all(e["verdict"] != "pass" or e["error"] is None for e in got)


# -- in-process: triggered mode ---------------------------------------------------------------------
def test_triggered_mode_names_the_next_frame(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 30, "defect_rate": 0.0},
                   pipeline={"mode": "triggered", "trigger_timeout_s": 2.0}, metrics={"stats_interval_s": 0.5})
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        with running(data):
            time.sleep(0.5)  # frames flow but no part is announced: no results
            assert results(sub) == []
            for payload in (b'{"part_id": "SN-1"}', b"\xff\xfe", b"SN-2", b'{"part": 1}', b"a/b", b'{"part_id": "SN-3"}'):
                sub.publish(f"{BASE}/trigger", payload)
            got = wait_results(sub, 3)
            assert sub.wait_for(lambda ms: any((json.loads(m.payload).get("triggers") or {}).get("malformed") == 3
                                               for m in ms if m.topic == f"{BASE}/stats"), 5)
            time.sleep(0.3)
    finally:
        sub.close()
    assert [e["part_id"] for e in results(sub)] == ["SN-1", "SN-2", "SN-3"]
    assert all(e["verdict"] == "pass" for e in got)


# -- in-process: metrics, health, stats, evidence, rule overrides ------------------------------------
def test_metrics_health_stats_evidence(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    data = station(tmp_path, tiny_package, broker,
                   {"type": "synthetic", "count": 12, "fps": 0, "defect_rate": 0.5, "stop_at_end": False},
                   metrics={"enabled": True, "port": 0, "stats_interval_s": 0.3},
                   evidence={"pass_sample_every": 2}, rules={"min_area": 6}, roi={"x": 0, "y": 0, "w": 128, "h": 96})
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        with running(data) as p:
            got = wait_results(sub, 12)
            assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/stats" for m in ms), 5)
            url = f"http://127.0.0.1:{p.server.port}"  # type: ignore[union-attr]
            metrics = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
            health = json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=5).read())
    finally:
        sub.close()
    fails = [e for e in got if e["verdict"] == "fail"]
    assert fails and all(e["verdict"] == expected(e["part_id"]) for e in got)
    assert f'edge_results_total{{verdict="fail"}} {float(len(fails))}' in metrics
    assert "edge_latency_seconds_bucket" in metrics and 'edge_model_info{' in metrics
    assert health["healthy"] is True and health["counts"]["fail"] == len(fails)
    stats = [json.loads(m.payload) for m in sub.on(f"{BASE}/stats")]
    assert any(s["latency_ms"]["p95"] is not None for s in stats) and "backlog" in stats[0]
    assert got[0]["rules"]["min_area"] == 6 and got[0]["rules"]["pixel_threshold"] == 0.5
    assert got[0]["rules"]["roi"] == [0, 0, 128, 96]
    evidence = tmp_path / "state" / "evidence"
    for e in fails:
        assert e["evidence_status"] == "pending"  # written in the background; there once the daemon stopped
        for suffix in ("frame.png", "overlay.png", "mask.png"):
            assert (evidence / f"{e['evidence']}.{suffix}").is_file()
    passes = [e for e in got if e["verdict"] == "pass"]
    assert sum(e["evidence"] is not None for e in passes) == len(passes) // 2


def test_evidence_quota_deletes_oldest_first(tmp_path: Path) -> None:
    img = make_part((200, 200), defect=True)
    mask = (img < 80).astype(np.uint8)
    one = EvidenceStore(tmp_path / "probe", quota_bytes=10**9)
    one.save("probe", 0.0, img, mask, [], "fail")
    quota = int(one.used_bytes * 3.5)  # room for three parts' evidence
    store = EvidenceStore(tmp_path / "ev", quota_bytes=quota)
    refs = [store.save(f"e{i}", 1_700_000_000.0 + i, img, mask, [], "fail") for i in range(8)]
    assert store.used_bytes <= quota and store.deleted > 0
    kept = sorted(p.name.split(".")[0] for p in (tmp_path / "ev").rglob("*.frame.png"))
    assert kept == ["e5", "e6", "e7"]
    assert (tmp_path / "ev" / f"{refs[-1]}.overlay.png").exists()
    assert EvidenceStore(tmp_path / "ev", quota_bytes=quota).used_bytes == store.used_bytes  # survives restart


def test_roi_regions_are_reported_in_frame_coordinates() -> None:
    r = Region(area=40, bbox=(5, 6, 7, 8), centroid=(8.5, 9.5), max_score=0.9, mean_score=0.7)
    (shifted,) = shift_regions([r], (100, 50))
    assert shifted.bbox == (105, 56, 7, 8) and shifted.centroid == (108.5, 59.5)
    assert region_dict(shifted, 0.1)["area_mm2"] == pytest.approx(0.4)


def test_sequence_numbers_only_go_up(tmp_path: Path) -> None:
    a = SeqStore(tmp_path / "seq.json")
    first = [a.next() for _ in range(3)]
    b = SeqStore(tmp_path / "seq.json")  # a restart (or a crash: same file state)
    assert first == [0, 1, 2] and b.next() > first[-1]
    (tmp_path / "seq.json").write_text("garbage")
    assert SeqStore(tmp_path / "seq.json").next() > 1_000_000


def test_run_pipeline_bad_package_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-package"
    bad.mkdir()
    cfg = validate_config(station(tmp_path, bad, None, {"type": "synthetic"}))
    assert run_pipeline(cfg, threading.Event()) == 78
