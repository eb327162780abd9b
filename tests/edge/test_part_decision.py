"""The part decision of a model with a decision head: verdict by part score, regions still listed.

A model package may have a second output, `part_probability` (training/core/unet.py's decision
head). The frame's part score is the max over its tiles; the verdict is `fail` iff it reaches
the package's `part_threshold`, whatever the regions say, and the regions still come from the
map. Packages with one output decide as before. A NaN part score is an `error`, never a pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import RulesConfig
from edge.contract import Detection, NonFiniteError, PostprocessParams, Region
from edge.events import build_result_event, validate_event
from edge.inference import Inferencer
from edge.postprocess import part_score, postprocess
from edge.rules import EffectiveRules, Rules, decide, effective_rules
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, ROOT, running, station, wait_results
from tests.tiny_package import make_part, make_tiny_package

REGION = Region(area=50, bbox=(1, 2, 5, 10), centroid=(3.0, 7.0), max_score=0.9, mean_score=0.7)


def _det(regions: list[Region], part: float | None, threshold: float | None = 0.3) -> Detection:
    return Detection(regions=regions, mask=None, score=0.9 if regions else 0.1, part_score=part,
                     part_threshold=threshold if part is not None else None)


def test_part_score_decides_regions_do_not() -> None:
    fail, reasons = decide(_det([], 0.31), Rules())
    assert fail == "fail" and "part score 0.3100 >= part_threshold 0.3" in reasons[0]
    assert decide(_det([REGION, REGION], 0.29), Rules()) == ("pass", [])  # regions listed, not counted
    assert decide(_det([], 0.3), Rules())[0] == "fail"  # >=, as the calibration counts it
    # without a part output: the regions decide, as before
    assert decide(_det([REGION], None), Rules())[0] == "fail"
    assert decide(_det([], None), Rules())[0] == "pass"
    # the area limits a line engineer sets still apply
    assert decide(_det([REGION], 0.1), Rules(max_total_area=10))[0] == "fail"


def test_non_finite_part_score_is_refused() -> None:
    with pytest.raises(NonFiniteError):
        decide(_det([], math.nan), Rules())
    with pytest.raises(NonFiniteError):
        part_score(np.array([0.1, np.nan], np.float32))
    with pytest.raises(NonFiniteError):
        postprocess(np.zeros((8, 8), np.float32), PostprocessParams(part_threshold=0.5), math.nan)
    assert part_score([0.1, 0.7, 0.2]) == pytest.approx(0.7)


def test_params_round_trip_and_old_packages_read_unchanged() -> None:
    old = {"pixel_threshold": 0.4, "min_area": 3, "open_radius": 0, "close_radius": 1}
    p = PostprocessParams.from_dict(old)
    assert p.part_threshold is None and p.to_dict() == old  # no new key in an old package's block
    q = PostprocessParams.from_dict({**old, "part_threshold": 0.02})
    assert q.part_threshold == 0.02 and PostprocessParams.from_dict(q.to_dict()) == q
    with pytest.raises(ValueError, match="part_threshold"):
        PostprocessParams.from_dict({**old, "part_threshold": 1.0})


@pytest.fixture(scope="module")
def part_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "part", part="max", part_threshold=0.5)


def test_effective_rules_override_the_package_value_by_value() -> None:
    """The one merge the daemon, `edge inspect` and evaluate share: set values win, the rest is the package's."""
    package = PostprocessParams(pixel_threshold=0.4, min_area=5, open_radius=1, close_radius=2, part_threshold=0.6)
    assert effective_rules(package) == EffectiveRules(package, Rules())
    policy = effective_rules(package, RulesConfig(min_area=7, max_total_area=100, part_threshold=0.3))
    assert policy.params == PostprocessParams(0.4, 7, 1, 2, 0.3)
    assert policy.rules == Rules(max_defects=0, max_total_area=100)
    assert policy.to_dict() == {**policy.params.to_dict(), **policy.rules.to_dict()}
    with pytest.raises(ValueError, match="pixel_threshold"):
        effective_rules(PostprocessParams(pixel_threshold=1.5))


def test_two_output_package_gives_map_and_part_score(part_package: Path, tiny_package: Path) -> None:
    inf = Inferencer(part_package, num_requests=1)
    old = Inferencer(tiny_package, num_requests=1)
    assert inf.has_part and not old.has_part
    for defect in (False, True):
        frame = make_part(defect=defect, seed=3)
        prob, part = inf.predict_part(frame)
        np.testing.assert_array_equal(prob, old.predict(frame))  # the map is the same graph's
        assert part == pytest.approx(0.9 * float(prob.max()), abs=1e-6)  # max over the tiles
        assert old.predict_part(frame)[1] is None
        det = inf.inspect(frame)
        assert det.part_score == part and det.part_threshold == 0.5
        assert decide(det, Rules())[0] == ("fail" if defect else "pass")


def test_verdict_follows_part_threshold_not_regions(tmp_path: Path) -> None:
    frame = make_part(defect=True, seed=3)
    # no region can survive (min_area), yet the part score fails the part
    no_regions = Inferencer(make_tiny_package(tmp_path / "a", part="max", part_threshold=0.5, min_area=10**6))
    det = no_regions.inspect(frame)
    assert not det.regions and decide(det, Rules())[0] == "fail"
    # regions found, but the part score stays below a threshold above 0.9: pass, regions listed
    high = Inferencer(make_tiny_package(tmp_path / "b", part="max", part_threshold=0.95))
    det = high.inspect(frame)
    assert det.regions and decide(det, Rules()) == ("pass", [])


def _edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_inspect_shows_both_thresholds_and_part_scores(tmp_path: Path, part_package: Path) -> None:
    paths = []
    for name, defect in (("good", False), ("pit", True)):
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), make_part(defect=defect, seed=5))
    r = _edge("inspect", "--model", str(part_package), "--json", *map(str, paths))
    assert r.returncode == 0, r.stderr
    rows = {Path(row["file"]).stem: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows["good"]["verdict"] == "pass" and rows["pit"]["verdict"] == "fail"
    for row in rows.values():
        assert row["part_threshold"] == 0.5 and row["pixel_threshold"] == 0.5 and 0 <= row["part_score"] <= 1
    assert rows["pit"]["part_score"] >= 0.5 > rows["good"]["part_score"]
    over = _edge("inspect", "--model", str(part_package), "--json", "--part-threshold", "0.95", str(paths[1]))
    row = json.loads(over.stdout)
    assert row["verdict"] == "pass" and row["regions"] and row["part_threshold"] == 0.95
    table = _edge("inspect", "--model", str(part_package), *map(str, paths)).stdout.splitlines()
    assert "part_threshold 0.5" in table[0] and "PART" in table[1]


def test_inspect_nan_part_is_an_error(tmp_path: Path) -> None:
    pkg = make_tiny_package(tmp_path / "nan", part="nan", part_threshold=0.5)
    img = tmp_path / "good.png"
    cv2.imwrite(str(img), make_part(defect=False, seed=1))
    r = _edge("inspect", "--model", str(pkg), "--json", str(img))
    row = json.loads(r.stdout)
    assert r.returncode == 1 and row["verdict"] == "error" and "not finite" in row["error"]


def test_event_schema_carries_part_fields() -> None:
    common = dict(station={"line": "l", "name": "s"}, seq=1, part_id="p", capture_ts=1.0, verdict="fail",
                  reasons=["part score 0.8 >= part_threshold 0.5"], regions=[], total_defect_area=0,
                  image={"width": 8, "height": 8},
                  model={"name": "m", "version": "1", "sha256": "0" * 64, "precision": "int8"}, rules={},
                  timings_ms={"capture_to_result": 1.0})
    event = build_result_event(**common, part_score=0.8, part_threshold=0.5)
    validate_event(event)
    assert event["part_score"] == 0.8 and event["part_threshold"] == 0.5
    old = build_result_event(**common)
    validate_event(old)
    assert old["part_score"] is None and old["part_threshold"] is None


def test_daemon_events_carry_part_score_and_nan_is_an_error(tmp_path: Path, broker: Broker) -> None:
    ok = make_tiny_package(tmp_path / "ok", part="max", part_threshold=0.5)
    bad = make_tiny_package(tmp_path / "bad", part="nan", part_threshold=0.5)
    for pkg, name in ((ok, "ok"), (bad, "bad")):
        sub = Subscriber(broker, [f"{BASE}/#"])
        try:
            with running(station(tmp_path / name, pkg, broker, {"type": "synthetic", "count": 6, "fps": 0,
                                                               "defect_rate": 0.5, "stop_at_end": False})):
                got = wait_results(sub, 6)
        finally:
            sub.close()
        for e in got:
            validate_event(e)
            assert e["part_threshold"] == 0.5 and e["rules"]["part_threshold"] == 0.5
            if name == "ok":
                assert e["verdict"] == ("fail" if e["part_score"] >= 0.5 else "pass")
            else:
                assert e["verdict"] == "error" and "not finite" in e["error"] and e["part_score"] is None
        if name == "ok":
            assert {e["verdict"] for e in got} == {"pass", "fail"}


def test_a_package_without_a_part_output_is_judged_by_its_peak() -> None:
    """part_threshold without a part output: the map's peak is the part score (the calibration chose
    a verdict threshold apart from the pixel threshold that draws the regions)."""
    from edge.postprocess import postprocess
    from edge.rules import Rules, decide

    prob = np.zeros((32, 32), np.float32)
    prob[10, 10] = 0.45  # one faint pixel: no region at the pixel threshold, yet above part_threshold
    params = PostprocessParams(pixel_threshold=0.6, min_area=4, part_threshold=0.4)
    det = postprocess(prob, params)
    assert det.part_score == pytest.approx(0.45) and not det.regions
    assert decide(det, Rules())[0] == "fail"
    assert decide(postprocess(prob * 0.5, params), Rules())[0] == "pass"
    old = postprocess(prob, PostprocessParams(pixel_threshold=0.6, min_area=4))  # older packages: unchanged
    assert old.part_score is None and decide(old, Rules())[0] == "pass"


def test_calibration_keeps_the_rule_with_fewer_false_alarms_at_the_recall() -> None:
    from training.core.train_utils import choose_verdict

    regions = {"image_recall": 1.0, "image_fp": 9}
    part = {"image_recall": 0.98, "image_fp": 2}
    weak = {"image_recall": 0.9, "image_fp": 0}
    assert choose_verdict({"regions": regions, "part_score": part}, 0.97)[0] == "part_score"
    assert choose_verdict({"regions": regions, "part_score": weak}, 0.97)[0] == "regions"  # recall first
    assert choose_verdict({"regions": part, "peak": dict(part)}, 0.97)[0] == "regions"  # ties: the regions
