"""`python -m edge` as operators call it: check-config, inspect, and run's startup failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import yaml

from tests.daemon_proc import ROOT, station, write_config
from tests.faults.harness import png_bomb
from tests.tiny_package import make_part


def edge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_check_config_good_and_bad(tmp_path: Path) -> None:
    good = edge("check-config", str(ROOT / "configs/edge/example.yaml"))
    assert good.returncode == 0 and "OK" in good.stdout
    assert "warning: model.path" in good.stderr  # the example's package is not on this machine
    bad = tmp_path / "bad.yaml"
    bad.write_text("station:\n  line: l1\n  name: s1\nsource:\n  type: folder\n  path: in\n  pol_interval_s: 1\n"
                   "model:\n  path: pkg\nmqtt:\n  port: high\n  password: s3cret-value\n")
    r = edge("check-config", str(bad))
    assert r.returncode == 78
    assert f"{bad}:7: source.pol_interval_s: Extra inputs are not permitted" in r.stderr
    assert f"{bad}:11: mqtt.port:" in r.stderr
    assert f"{bad}:12: mqtt.password:" in r.stderr and "s3cret-value" not in r.stderr + r.stdout
    assert "state_dir: Field required" in r.stderr
    not_a_folder = write_config(tmp_path / "file-source.yaml", station(tmp_path, tmp_path, None, {
        "type": "folder", "path": str(bad)}))  # a file where the hot folder should be: run would refuse to start
    r = edge("check-config", str(not_a_folder))
    assert r.returncode == 0 and f"warning: source.path: {bad} is not a folder (run refuses to start)" in r.stderr


def test_inspect_prints_verdicts_and_writes_overlays(tmp_path: Path, tiny_package: Path) -> None:
    images = []
    for name, defect in (("good", False), ("scratch", True)):
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), make_part(defect=defect, seed=7))
        images.append(str(path))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "bomb.png").write_bytes(png_bomb(9000, 5000))  # 45 MP: once an OpenCV traceback that ended the batch
    overlays = tmp_path / "overlays"
    r = edge("inspect", "--model", str(tiny_package), "--json", "--overlay-dir", str(overlays),
             str(tmp_path / "bomb.png"), *images, str(tmp_path / "junk.png"))
    assert r.returncode == 1, r.stderr  # files could not be inspected
    rows = {Path(row["file"]).stem: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows["good"]["verdict"] == "pass" and rows["scratch"]["verdict"] == "fail"
    assert rows["scratch"]["regions"] and rows["junk"]["verdict"] == "error"
    assert rows["bomb"]["verdict"] == "error" and "9000x5000 = 45000000 pixels" in rows["bomb"]["error"]
    assert (overlays / "scratch.overlay.png").is_file() and (overlays / "good.overlay.png").is_file()
    table = edge("inspect", "--model", str(tiny_package), *images)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert "VERDICT" in lines[1] and " pass " in lines[2] and " fail " in lines[3]


def test_inspect_applies_the_area_and_mm_rules_as_the_daemon_does(tmp_path: Path, tiny_package: Path) -> None:
    """One defect region under max_defects 5: only the area limits can fail it, as with the station's `rules:`."""
    img = tmp_path / "scratch.png"
    cv2.imwrite(str(img), make_part(defect=True, seed=7))
    base = ("inspect", "--model", str(tiny_package), "--json", "--max-defects", "5")
    by_area = json.loads(edge(*base, "--max-total-area", "1", str(img)).stdout)
    assert by_area["verdict"] == "fail" and len(by_area["regions"]) == 1
    assert [r for r in by_area["reasons"] if r.startswith("total defect area")] == by_area["reasons"]
    by_mm = json.loads(edge(*base, "--max-region-area-mm2", "0.01", "--mm-per-pixel", "0.1", str(img)).stdout)
    assert by_mm["verdict"] == "fail" and by_mm["reasons"] == ["1 region(s) larger than 0.01 mm2"]
    r = edge(*base, "--max-region-area-mm2", "0.01", str(img))
    assert r.returncode == 78 and "max_region_area_mm2 needs mm_per_pixel" in r.stderr


def test_inspect_and_run_refuse_a_bad_package(tmp_path: Path, tiny_package: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for f in tiny_package.iterdir():
        (pkg / f.name).write_bytes(f.read_bytes())
    meta = json.loads((pkg / "package.json").read_text())
    del meta["postprocess"]
    (pkg / "package.json").write_text(json.dumps(meta))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_part())
    r = edge("inspect", "--model", str(pkg), str(img))
    assert r.returncode == 78 and "postprocess" in r.stderr
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, pkg, None, {"type": "synthetic"}))
    r = edge("run", "--config", str(cfg), "--log-format", "json")
    assert r.returncode == 78 and "missing metadata field(s): postprocess" in r.stderr
    assert any(json.loads(line)["level"] == "ERROR" for line in r.stderr.splitlines() if line.startswith("{"))


def test_run_rejects_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "station.yaml"
    cfg.write_text(yaml.safe_dump({"station": {"line": "l 1", "name": "s1"}}))
    r = edge("run", "--config", str(cfg))
    assert r.returncode == 78 and "station.line" in r.stderr and "source: Field required" in r.stderr
