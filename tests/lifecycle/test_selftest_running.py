"""A running station keeps proving its model: a reload to a model that disagrees with the golden set
is refused (the old model keeps inspecting), a scheduled self-test that fails mid-run stops
inspection with `error` verdicts until one passes again, and an MQTT command runs one on demand.
Result events carry the package's content hash and the rules' hash."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

from edge.__main__ import main
from edge.events import rules_hash, validate_event
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, alarms, expected, results, station, wait_results, write_config
from tests.lifecycle.helpers import add_set, assert_every_part_once


def selftests(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(f"{BASE}/selftest")]


def test_reload_scheduled_and_commanded_selftests(tmp_path: Path, store: Path, golden_images: dict[str, Path],
                                                  broker: Broker) -> None:
    v1 = store / "versions" / "v1"
    data = station(tmp_path, v1, broker, {"type": "synthetic", "fps": 25, "seed": 3},
                   evidence={"enabled": False}, selftest={"interval_s": 0.5, "on_failure": "stop"})
    cfg = write_config(tmp_path / "s.yaml", data)
    add_set(cfg, golden_images)
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_results(sub, 5, 30)
        assert selftests(sub)[0]["kind"] == "start" and selftests(sub)[0]["status"] == "pass", d.text()

        # 1. reload to a model that flips the defective golden parts: refused, v1 keeps inspecting
        write_config(cfg, {**data, "model": {**data["model"], "path": str(store / "versions" / "blind")}})
        d.signal(signal.SIGHUP)
        assert sub.wait_for(lambda ms: any(a["alarm"] == "model_reload" and a["state"] == "raised"
                                           for a in alarms(sub)), 20), d.text()
        reload_event = next(e for e in selftests(sub) if e["kind"] == "reload")
        assert reload_event["status"] == "fail" and reload_event["model"]["version"] == "3.0.0"
        raised = next(a for a in alarms(sub) if a["alarm"] == "model_reload")
        assert "golden self-test failed" in raised["message"] and "still running 1.0.0" in raised["message"]
        n = len(results(sub))
        wait_results(sub, n + 5)
        assert {e["model"]["version"] for e in results(sub)} == {"1.0.0"}
        write_config(cfg, data)

        # 2. the set changes under the running station (a good part labelled fail): the next scheduled
        # run fails, inspection stops with error verdicts; removing the sample lets a later run pass
        assert main(["golden", "add", "--config", str(cfg), str(golden_images["good-a"]), "--id", "mislabelled",
                     "--expect", "fail"]) == 0
        assert sub.wait_for(lambda ms: any(a["alarm"] == "selftest_failed" and a["state"] == "raised"
                                           for a in alarms(sub)), 20), d.text()
        n = len(results(sub))
        assert sub.wait_for(lambda ms: sum(e["verdict"] == "error" for e in results(sub)[n:]) >= 3, 20), d.text()
        assert main(["golden", "remove", "--config", str(cfg), "mislabelled"]) == 0
        assert sub.wait_for(lambda ms: any(a["alarm"] == "selftest_failed" and a["state"] == "cleared"
                                           for a in alarms(sub)), 20), d.text()
        n = len(results(sub))
        wait_results(sub, n + 8)
        assert all(e["verdict"] == expected(e["part_id"]) for e in results(sub)[-3:]), "inspecting again"

        # 3. a self-test on command, between parts
        sub.publish(f"{BASE}/command", json.dumps({"command": "selftest", "id": "shift-start"}))
        assert sub.wait_for(lambda ms: any(e.get("request") == "shift-start" for e in selftests(sub)), 20), d.text()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.text()
    finally:
        d.kill()
        sub.close()

    runs = selftests(sub)
    failed = [e for e in runs if e["kind"] == "scheduled" and e["status"] == "fail"]
    assert failed and failed[0]["failed"] == ["mislabelled"]
    assert failed[0]["samples"][-1]["verdict"] == "pass" and failed[0]["samples"][-1]["margin"] < 0
    commanded = next(e for e in runs if e.get("request") == "shift-start")
    assert commanded["kind"] == "command" and commanded["status"] == "pass" and commanded["min_margin"] > 0

    got = sorted(results(sub), key=lambda e: e["seq"])
    assert_every_part_once(got)
    errors = [e for e in got if e["verdict"] == "error"]
    assert errors and all("golden self-test failed" in e["error"] for e in errors)
    assert all(e["verdict"] == expected(e["part_id"]) for e in got if e["verdict"] != "error")
    package_sha = hashlib.sha256((v1 / "package.json").read_bytes()).hexdigest()
    for e in got[:3]:
        validate_event(e)
        assert e["model"]["package_sha256"] == package_sha and e["rules_sha256"] == rules_hash(e["rules"])
