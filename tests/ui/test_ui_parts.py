"""The station page's parts without a browser: the index, reviews, logins and cookies, CSRF,
evidence paths, drift alarms, and reviews stored while the broker is down (real Mosquitto)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge.config import validate_config
from edge.ui.auth import Auth, AuthError, add_user, load_secret, read_users
from edge.ui.drift import DRIFT_FAIL_RATE, DRIFT_SHARPNESS, DriftWatch
from edge.ui.evidence_files import EvidenceFiles
from edge.ui.settings import DriftConfig
from edge.ui.store import PartQuery, Store, StoreError
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, station


def event(i: int, verdict: str = "fail", part: str | None = None, evidence: str | None = None) -> dict[str, Any]:
    return {"event_id": f"{i:08x}-0000-5000-8000-000000000000", "seq": i, "part_id": part or f"p-{i}",
            "capture_ts": 1000.0 + i, "verdict": verdict, "total_defect_area": 10 * i, "image": {"width": 64, "height": 48},
            "model": {"name": "m", "version": "2.1"}, "station": {"line": "l1", "name": "s1"}, "reasons": [],
            "regions": [], "rules": {}, "timings_ms": {"capture_to_result": 3.0}, "evidence": evidence,
            "image_quality": {"sharpness": 100.0 + i, "mean": 120.0, "clipped": 0.0}}


def test_index_dedupes_filters_pages_and_prunes(tmp_path: Path) -> None:
    store = Store(tmp_path / "ui.sqlite3", keep_events=100)
    events = [event(i, "fail" if i % 3 == 0 else "pass") for i in range(700)]
    assert len(store.add_events([(e, None) for e in events])) == 700
    assert store.add_events([(events[-1], None)]) == []  # at-least-once delivery: a redelivery is not new
    rows, total = store.parts(PartQuery())
    assert total == 100 and rows[0]["seq"] == 699  # pruned to keep_events, newest first
    rows, total = store.parts(PartQuery(verdict="fail", part="p-69", since_ts=1690.0, per_page=5))
    assert {r["part_id"] for r in rows} == {"p-690", "p-693", "p-696", "p-699"} and total == 4
    health = store.health(0, 100)
    assert sum(b["parts"] for b in health["buckets"]) == 100 and health["sharpness"][-1][1] == 799.0


def test_review_rules(tmp_path: Path) -> None:
    store = Store(tmp_path / "ui.sqlite3")
    store.add_events([(event(1, "fail"), None), (event(2, "pass"), None)])
    fail_id, pass_id = event(1)["event_id"], event(2)["event_id"]
    with pytest.raises(StoreError, match="only a passed part can be an escape"):
        store.add_review(fail_id, "escape", "alice")
    with pytest.raises(StoreError, match="only a failed part"):
        store.add_review(pass_id, "false_alarm", "alice")
    with pytest.raises(StoreError, match="inside the 64x48 frame"):
        store.add_review(fail_id, "confirm_fail", "alice", box=[60, 0, 10, 10])
    with pytest.raises(StoreError, match="no event"):
        store.add_review("nope", "confirm_fail", "alice")
    msg = store.add_review(fail_id, "confirm_fail", "alice", box=[1, 2, 3, 4], note="scratch")
    assert msg["model"]["version"] == "2.1" and msg["box"] == [1, 2, 3, 4] and msg["reviewer"] == "alice"
    assert [r for r, _ in store.unpublished()] == [msg["review_id"]]
    store.mark_published(msg["review_id"])
    assert store.unpublished() == []


def test_users_tokens_cookies_and_csrf(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "correct horse")
    add_user(users, "bob", "battery staple")
    add_user(users, "alice", "new password")  # replaced, not duplicated
    assert set(read_users(users)) == {"alice", "bob"} and "new password" not in users.read_text()
    assert users.stat().st_mode & 0o777 == 0o600
    with pytest.raises(AuthError, match="at least 8"):
        add_user(users, "carol", "short")
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    auth = Auth(load_secret(tmp_path / "state"), users, token)
    assert auth.login("alice", "new password") == "alice"
    assert auth.login("alice", "correct horse") is None and auth.login("eve", "new password") is None
    assert auth.login("", "t" * 32) == "token"
    cookie = auth.session_cookie("alice")
    assert auth.reviewer(cookie) == "alice"
    _name, expiry, mac = cookie.split("|")
    assert auth.reviewer(f"bob|{expiry}|{mac}") is None  # the name is signed
    assert auth.reviewer(f"alice|{int(expiry) + 9999}|{mac}") is None
    other = Auth(os.urandom(32), users)
    assert other.reviewer(cookie) is None  # another station's key
    assert auth.csrf_ok("c1", auth.csrf_token("c1")) and not auth.csrf_ok("c2", auth.csrf_token("c1"))
    assert not auth.csrf_ok(None, None)
    users.chmod(0o640)
    add_user(users, "bob", "another password")
    assert users.stat().st_mode & 0o777 == 0o640  # an admin's mode survives an edit
    users.write_text("alice:broken\n")  # broken while running: nobody logs in, nothing crashes
    assert auth.login("alice", "new password") is None
    (tmp_path / "bad").write_text("alice:plaintext\n")
    with pytest.raises(AuthError, match="bad:1"):
        Auth(os.urandom(32), tmp_path / "bad")


def test_password_checks_run_one_at_a_time_and_long_passwords_are_not_hashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of logins once ran up to 40 scrypt checks at once (16 MiB and ~50 ms of a core each, plus a second
    scrypt per unknown name): both cores of the line PC, taken from inspection."""
    import hashlib
    import threading

    import edge.ui.auth as auth_module

    users = tmp_path / "users"
    add_user(users, "alice", "correct horse")
    auth = Auth(os.urandom(32), users)
    running, peak, calls, lock = [0], [0], [0], threading.Lock()
    real = hashlib.scrypt

    def counting(*a: Any, **k: Any) -> bytes:
        with lock:
            running[0] += 1
            calls[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(auth_module.hashlib, "scrypt", counting)
    names = ["alice", "eve", "alice", "mallory", "alice", "eve"]
    threads = [threading.Thread(target=auth.login, args=(n, "wrong password")) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 1 and calls[0] == len(names)  # one at a time; an unknown name costs one check, not two
    assert auth.login("alice", "x" * 100_000) is None and calls[0] == len(names)  # refused without hashing
    assert auth.login("alice", "correct horse") == "alice"


def test_evidence_paths_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    (root / "2026-01-02").mkdir(parents=True)
    eid = event(1)["event_id"]
    (root / "2026-01-02" / f"{eid}.frame.png").write_bytes(b"png")
    (tmp_path / "secret.frame.png").write_bytes(b"secret")
    (root / "2026-01-03").mkdir()
    (root / "2026-01-03" / f"{eid}.frame.png").symlink_to(tmp_path / "secret.frame.png")
    files = EvidenceFiles(root)
    assert files.path({"evidence": f"2026-01-02/{eid}"}, "frame") is not None
    assert files.path({"evidence": f"2026-01-02/{eid}"}, "mask") is None
    for bad in (f"2026-01-03/{eid}", "../secret", f"2026-01-02/../../{eid}", "/etc/passwd", None, 5):
        assert files.path({"evidence": bad}, "frame") is None, bad
    assert files.path({"evidence": f"2026-01-02/{eid}"}, "../frame") is None


def test_drift_alarms_raise_once_and_clear() -> None:
    calls: list[tuple[str, bool]] = []
    watch = DriftWatch(DriftConfig(alpha=0.2, warmup_parts=20, fail_rate_rise=0.2, sharpness_drop=0.4),
                       lambda name, active, _msg: calls.append((name, active)))
    for i in range(40):
        watch.observe("fail" if i % 10 == 0 else "pass", 200.0)
    assert calls == []
    for _ in range(20):
        watch.observe("fail", 50.0)
    assert calls == [(DRIFT_FAIL_RATE, True), (DRIFT_SHARPNESS, True)]
    for _ in range(40):
        watch.observe("pass", 200.0)
    assert sorted(calls[2:]) == [(DRIFT_FAIL_RATE, False), (DRIFT_SHARPNESS, False)]


@contextmanager
def page_client(tmp_path: Path, broker: Broker, package: Path, topic: str,
                **ui: Any) -> Iterator[tuple[Any, Store, Subscriber]]:
    """The page's MQTT side (StationListener + its index), subscribed, and a test client on <base>/<topic>."""
    from edge.ui.listener import StationListener

    cfg = validate_config(station(tmp_path, package, broker, {"type": "synthetic"}, ui=ui))
    store = Store(tmp_path / "ui.sqlite3")
    listener = StationListener(cfg, store)
    sub = Subscriber(broker, [f"{BASE}/{topic}"])
    listener.start()
    try:
        assert listener.subscribed.wait(10)
        yield listener, store, sub
    finally:
        sub.close()
        listener.stop()


def test_reviews_stored_while_the_broker_is_down_are_sent_after(tmp_path: Path, broker: Broker,
                                                                tiny_package: Path) -> None:
    with page_client(tmp_path, broker, tiny_package, "review") as (listener, store, sub):
        sub.publish(f"{BASE}/result", b"[" * 50_000 + b"]" * 50_000)  # a RecursionError once killed paho's thread
        sub.publish(f"{BASE}/result", json.dumps(event(7)))
        sub.publish(f"{BASE}/result", b"\xff not json")  # hostile input is dropped, the client goes on
        sub.publish(f"{BASE}/result", json.dumps({**event(8), "event_id": "../../login"}))
        deadline = time.monotonic() + 10
        while store.event(event(7)["event_id"]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while listener.dropped < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.dropped == 3 and listener.station_state()["state"] != "broker down"
        broker.stop()
        while listener.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.station_state()["state"] == "broker down"
        listener.publish_review(store.add_review(event(7)["event_id"], "confirm_fail", "alice"))
        broker.start()
        assert sub.subscribed.wait(10)  # the subscriber (0.2 s backoff) is back before the page (1 s)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/review" for m in ms), 20)
        assert json.loads(sub.on(f"{BASE}/review")[0].payload)["reviewer"] == "alice"
        deadline = time.monotonic() + 5
        while store.unpublished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.unpublished() == []


def test_the_page_does_not_import_the_pipeline() -> None:
    """A crash or a stall of the page must not be able to touch inspection: no pipeline code in its process."""
    pytest.importorskip("fastapi", reason="needs the ui extra")
    import subprocess
    import sys

    code = ("import sys, edge.ui.server, edge.ui.app, edge.ui.listener, edge.__main__; "
            "print(sorted(m for m in sys.modules if m in ('openvino', 'torch', 'training') "
            "or m.startswith(('edge.flow', 'edge.daemon', 'edge.inference', 'edge.sources'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_preview_is_small_drawn_and_rate_limited() -> None:
    import cv2
    import numpy as np

    from edge.contract import Region
    from edge.preview import PREVIEW_SIDE, PreviewFeed, render_preview

    frame = np.full((2048, 2448), 128, np.uint8)
    mask = np.zeros((2048, 2448), np.uint8)
    mask[1000:1100, 1200:1300] = 255
    jpeg = render_preview(frame, mask, [Region(10_000, (1200, 1000, 100, 100), (1250.0, 1050.0), 0.9, 0.8)], "fail")
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg[:2] == b"\xff\xd8" and max(img.shape[:2]) == PREVIEW_SIDE and len(jpeg) < 100_000
    y, x = int(1050 * PREVIEW_SIDE / 2448), int(1250 * PREVIEW_SIDE / 2448)
    b, g, r = (int(v) for v in img[y, x])
    assert r > g + 40 and r > b + 40  # the defect is tinted red
    sent: list[tuple[bytes, str]] = []
    feed = PreviewFeed(rate_hz=0.001, publish=lambda jpeg, eid: sent.append((jpeg, eid)))  # one per 1000 s
    try:
        for i in range(50):  # only the first offer is taken
            feed.offer(frame, mask, [], "fail", event_id=f"e{i}")
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [eid for _, eid in sent] == ["e0"] and feed.failed == 0
    finally:
        feed.close()


def test_cli_ui_user_and_startup_errors(tmp_path: Path, tiny_package: Path) -> None:
    """`edge ui-user` hashes; `edge ui` exits 78 (no restart loop) naming the bad config or users file."""
    pytest.importorskip("fastapi", reason="needs the ui extra")
    import subprocess
    import sys

    import yaml

    from tests.daemon_proc import ROOT

    def edge(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge", *args], cwd=ROOT, input=stdin, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})

    users = tmp_path / "users"
    r = edge("ui-user", "--users", str(users), "--password-stdin", "alice", stdin="long enough\n")
    assert r.returncode == 0 and read_users(users)["alice"].startswith("scrypt$")
    assert edge("ui-user", "--users", str(users), "--password-stdin", "bob", stdin="short\n").returncode == 1
    data = station(tmp_path, tiny_package, None, {"type": "synthetic"}, ui={"port": 0, "users_file": str(users),
                                                                              "colour": "red"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    r = edge("ui", "--config", str(tmp_path / "bad.yaml"))
    assert r.returncode == 78 and "ui.colour" in r.stderr
    del data["ui"]["colour"]
    (tmp_path / "users").write_text("alice:not-a-hash\n")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(data))
    r = edge("ui", "--config", str(tmp_path / "ok.yaml"))
    assert r.returncode == 78 and f"{users}:1" in r.stderr


def test_drift_alarm_goes_out_on_mqtt_and_into_the_history(tmp_path: Path, broker: Broker,
                                                           tiny_package: Path) -> None:
    """A lens going soft: sharpness falls, the page raises drift_sharpness on <base>/alarm for dashboards."""
    drift = {"warmup_parts": 10, "alpha": 0.3}
    with page_client(tmp_path, broker, tiny_package, "alarm", drift=drift) as (listener, store, sub):
        for i in range(40):
            ev = event(100 + i, "pass")
            ev["image_quality"]["sharpness"] = 500.0 if i < 15 else 50.0
            sub.publish(f"{BASE}/result", json.dumps(ev))
        assert sub.wait_for(lambda ms: any(json.loads(m.payload).get("alarm") == DRIFT_SHARPNESS for m in ms), 15)
        alarm = json.loads(sub.on(f"{BASE}/alarm")[0].payload)
        assert alarm["state"] == "raised" and alarm["source"] == "ui" and "baseline 500.0" in alarm["message"]
        deadline = time.monotonic() + 5
        while not store.alarm_history() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.alarm_history()[0]["alarm"] == DRIFT_SHARPNESS
        assert DRIFT_SHARPNESS in listener.station_state()["alarms"]
