"""`python -m edge promote` / `rollback` on a running station: the links move only after the daemon
loaded the target through its reload path and golden gate; a model that disagrees is refused with
the links and the running model unchanged; no part is lost; every attempt is audited and published."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from edge.__main__ import main
from edge.lifecycle import audit
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, expected, results, station, wait_results, write_config
from tests.lifecycle.helpers import add_set, assert_every_part_once, reset_links


def links(store: Path) -> tuple[str, str | None]:
    prev = os.readlink(store / "previous") if os.path.lexists(store / "previous") else None
    return os.readlink(store / "current"), prev


def test_promote_and_rollback_under_load(tmp_path: Path, store: Path, golden_images: dict[str, Path],
                                         broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    data = station(tmp_path, reset_links(store), broker, {"type": "synthetic", "fps": 25, "seed": 5},
                   evidence={"enabled": False})
    cfg = write_config(tmp_path / "s.yaml", data)
    add_set(cfg, golden_images)
    versions = store / "versions"
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_results(sub, 5, 30)
        capsys.readouterr()
        assert main(["promote", "--config", str(cfg), "--package", str(versions / "blind"), "--timeout", "30"]) == 1
        assert "promote refused" in capsys.readouterr().err
        assert links(store) == ("versions/v1", None), "a refused model must not move the links"
        n = len(results(sub))
        wait_results(sub, n + 3)
        assert {e["model"]["version"] for e in results(sub)} == {"1.0.0"}

        assert main(["promote", "--config", str(cfg), "--package", str(versions / "v2"), "--timeout", "30"]) == 0
        assert links(store) == ("versions/v2", "versions/v1")
        assert sub.wait_for(lambda ms: results(sub)[-1]["model"]["version"] == "2.0.0", 20), d.text()

        assert main(["rollback", "--config", str(cfg), "--timeout", "30"]) == 0
        assert links(store) == ("versions/v1", "versions/v2")
        n = len(results(sub))
        assert sub.wait_for(lambda ms: len(results(sub)) > n + 3 and results(sub)[-1]["model"]["version"] == "1.0.0",
                            20), d.text()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.text()
    finally:
        d.kill()
    try:
        # no daemon: the golden set runs here
        assert main(["promote", "--config", str(cfg), "--package", str(versions / "blind")]) == 1
        assert main(["rollback", "--config", str(cfg)]) == 0
        assert links(store) == ("versions/v2", "versions/v1")
        assert sub.wait_for(lambda ms: len(sub.on(f"{BASE}/model")) >= 5, 10)
    finally:
        sub.close()

    got = sorted(results(sub), key=lambda e: e["seq"])
    assert_every_part_once(got)
    assert all(e["verdict"] == expected(e["part_id"]) for e in got)
    records = [r for r in audit.read(tmp_path / "state") if r["action"] in ("promote", "rollback")]
    assert [(r["action"], r["ok"], r["to"]) for r in records] == [
        ("promote", False, "versions/blind"), ("promote", True, "versions/v2"), ("rollback", True, "versions/v1"),
        ("promote", False, "versions/blind"), ("rollback", True, "versions/v2")]
    assert "golden self-test failed" in records[0]["error"] and "daemon pid" in records[1]["confirmed_by"]
    assert "offline golden self-test" in records[4]["confirmed_by"]
    assert records[1]["package"]["version"] == "2.0.0" and len(records[1]["package"]["package_sha256"]) == 64
    events = [json.loads(m.payload) for m in sub.on(f"{BASE}/model")]
    assert [(e["action"], e["ok"]) for e in events] == [(r["action"], r["ok"]) for r in records]
