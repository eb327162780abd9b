"""The golden set (`python -m edge golden`) and the self-test at start: a model that disagrees with
the station's reference parts is refused with exit 78, an alarm and a `selftest` event."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.__main__ import main
from edge.lifecycle import audit, golden
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, alarms, results, station, write_config
from tests.faults.harness import png_bomb
from tests.lifecycle.helpers import add_set, reset_links


def test_golden_cli_manages_the_set(tmp_path: Path, store: Path, golden_images: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "s.yaml", station(tmp_path, reset_links(store), None, {"type": "synthetic"}))
    add_set(cfg, golden_images)
    state = tmp_path / "state"
    samples = golden.load_samples(state)
    assert [(s.id, s.expected) for s in samples] == [("good-a", "pass"), ("good-b", "pass"), ("defect-a", "fail"),
                                                     ("defect-b", "fail")]
    assert sorted(p.name for p in golden.golden_dir(state).iterdir()) == sorted(
        ["manifest.json", *(f"{n}.png" for n in golden_images)]), "no temporary file may stay behind"
    # refused: a duplicate id, a file that is no image, a verdict that is not pass/fail
    assert main(["golden", "add", "--config", str(cfg), str(golden_images["good-a"]), "--expect", "pass"]) == 78
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["golden", "add", "--config", str(cfg), str(junk), "--expect", "pass"]) == 78
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(9000, 5000))
    assert main(["golden", "add", "--config", str(cfg), str(bomb), "--expect", "pass"]) == 78
    err = capsys.readouterr().err
    assert "exists" in err and "junk.png: not a readable image" in err
    assert "bomb.png: 9000x5000 = 45000000 pixels by its header" in err
    assert main(["golden", "remove", "--config", str(cfg), "good-b"]) == 0
    assert main(["golden", "remove", "--config", str(cfg), "good-b"]) == 78
    capsys.readouterr()
    assert main(["golden", "list", "--config", str(cfg), "--json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == ["good-a", "defect-a", "defect-b"]
    assert [r["action"] for r in audit.read(state)] == ["golden_add"] * 4 + ["golden_remove"]
    # the offline test prints each sample's margin; the blind package flips both defects
    assert main(["golden", "test", "--config", str(cfg)]) == 0
    assert "3 golden samples agree" in capsys.readouterr().out
    blind = write_config(tmp_path / "b.yaml", station(tmp_path, store / "versions" / "blind", None,
                                                      {"type": "synthetic"}))
    assert main(["golden", "test", "--config", str(blind)]) == 1
    out = capsys.readouterr().out
    assert "2 of 3 golden samples disagree" in out and "defect-a expected fail, got pass" in out
    strict = write_config(tmp_path / "m.yaml", station(tmp_path, store / "versions" / "v1", None, {"type": "synthetic"},
                                                       selftest={"min_samples": 10}))
    assert main(["golden", "test", "--config", str(strict)]) == 1
    assert "3 golden sample(s), selftest.min_samples is 10" in capsys.readouterr().out
    # a changed reference image is caught, not trusted
    (golden.golden_dir(state) / "good-a.png").write_bytes(golden_images["defect-a"].read_bytes())
    assert main(["golden", "test", "--config", str(cfg)]) == 1
    assert "changed since it was added" in capsys.readouterr().out


def test_start_refused_when_the_model_disagrees(tmp_path: Path, store: Path, golden_images: dict[str, Path],
                                                broker: Broker) -> None:
    data = station(tmp_path, store / "versions" / "blind", broker, {"type": "synthetic", "fps": 20},
                   evidence={"enabled": False})
    cfg = write_config(tmp_path / "s.yaml", data)
    add_set(cfg, golden_images)
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        assert d.wait(60) == 78, d.text()
        assert sub.wait_for(lambda ms: bool(alarms(sub)) and bool(sub.on(f"{BASE}/selftest")), 10), d.text()
    finally:
        d.kill()
        sub.close()
    assert not results(sub), "a model that failed its golden test must not inspect a single part"
    (event,) = [json.loads(m.payload) for m in sub.on(f"{BASE}/selftest")]
    assert event["kind"] == "start" and event["status"] == "fail" and not event["ok"]
    assert event["failed"] == ["defect-a", "defect-b"] and event["model"]["version"] == "3.0.0"
    by_id = {s["id"]: s for s in event["samples"]}
    assert by_id["defect-a"]["verdict"] == "pass" and by_id["defect-a"]["margin"] <= 0
    assert by_id["good-a"]["ok"] and by_id["good-a"]["margin"] > 0 and by_id["good-a"]["decided_by"] == "regions"
    (alarm,) = [a for a in alarms(sub) if a["alarm"] == "selftest_failed"]
    assert alarm["state"] == "raised" and "defect-a expected fail, got pass" in alarm["message"]
    assert "golden self-test failed for tiny-dark-spot 3.0.0" in d.text()


def test_shipped_acl_lets_a_station_use_its_lifecycle_topics() -> None:
    """Side messages are not held like results: a topic the ACL denies would lose them silently."""
    from edge.lifecycle import promotion, selftest, shadow

    text = (Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.example").read_text()
    for topic in (selftest.TOPIC, shadow.TOPIC, promotion.MODEL_TOPIC):
        assert f"pattern write inspection/%u/{topic}\n" in text
    assert f"pattern read inspection/%u/{selftest.COMMAND_TOPIC}\n" in text
