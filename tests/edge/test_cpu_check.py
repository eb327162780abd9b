"""A package carries check tiles and its FP32 reference outputs (edge.cpu_check); a CPU that computes
the shipped model differently runs the package's FP32 IR instead, with an alarm, or refuses it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from edge.config import validate_config
from edge.cpu_check import CHECK_FILE, run_check, write_check
from edge.daemon import run_pipeline
from edge.inference import Inferencer
from edge.model_loader import load_model
from edge.package import PackageError, read_package
from edge.preprocess import preprocess
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, alarms, station, wait_results
from tests.edge.test_package import rehash
from tests.tiny_package import build_dark_spot_model, make_part, make_tiny_package


def _rehash(pkg: Path) -> None:
    """package.json agrees with every file now in the folder (what an export writes): test_package's
    rehash, file by file."""
    for p in sorted(pkg.rglob("*")):
        if p.is_file() and p.name != "package.json":
            rehash(pkg, str(p.relative_to(pkg)))


def checked_package(root: Path, shipped_offset: float | None = None, fp32: bool = True) -> Path:
    """A tiny package with fp32/model.xml and cpu_check.npz made as the export makes them: the reference
    from the FP32 IR, the tolerances from the shipped model.xml. `shipped_offset` then replaces model.xml
    by a model that computes differently (what a wrong kernel on the line's CPU does)."""
    pkg = make_tiny_package(root, part="max")
    if fp32:
        (pkg / "fp32").mkdir()
        shutil.copy(pkg / "model.xml", pkg / "fp32" / "model.xml")
        shutil.copy(pkg / "model.bin", pkg / "fp32" / "model.bin")
    _rehash(pkg)
    spec = read_package(pkg).input
    tiles = np.concatenate([preprocess(make_part(defect=d, seed=s), spec)[0] for d, s in ((True, 1), (False, 2))])
    ref = Inferencer(pkg, num_requests=1)
    map_ref, part_ref = ref.infer_tiles_parts(tiles.astype(np.float32))
    write_check(pkg / CHECK_FILE, tiles, map_ref, part_ref, ref)
    ref.close()
    if shipped_offset is not None:
        ov.save_model(build_dark_spot_model(64, part="max", offset=shipped_offset), str(pkg / "model.xml"),
                      compress_to_fp16=False)
    _rehash(pkg)
    return pkg


def _cfg(tmp_path: Path, pkg: Path, broker: Broker | None = None, **model: object) -> object:
    return validate_config(station(tmp_path, pkg, broker, {"type": "synthetic", "fps": 0, "count": 2,
                                                           "stop_at_end": True}, model=dict(model),
                                   evidence={"enabled": False}))


def test_a_package_that_computes_as_exported_loads_as_it_is(tmp_path: Path) -> None:
    pkg = checked_package(tmp_path / "pkg")
    m = load_model(_cfg(tmp_path, pkg))
    assert m.fallback is None and m.cpu_check is not None and m.cpu_check.passed
    assert m.cpu_check.map_mean_diff < 1e-5 and m.cpu_check.tiles >= 2
    assert m.inferencer.info.precision == "fp32" and m.inferencer.model_dir == pkg.resolve()


def test_a_model_this_cpu_computes_differently_is_replaced_by_the_packages_fp32(tmp_path: Path) -> None:
    pkg = checked_package(tmp_path / "pkg", shipped_offset=10.0)
    shipped = Inferencer(pkg, num_requests=1)
    off = run_check(pkg, shipped)
    assert off is not None and not off.passed and off.map_mean_diff > off.map_tolerance
    m = load_model(_cfg(tmp_path, pkg))
    assert m.fallback is not None and "computes differently on this CPU" in m.fallback and "FP32 IR" in m.fallback
    assert m.cpu_check is not None and m.cpu_check.passed
    # the FP32 IR computes what the reference says: a defective part is found, a good one passes
    assert m.inferencer.inspect(make_part(defect=True, seed=5)).regions
    assert not m.inferencer.inspect(make_part(defect=False, seed=6)).regions
    # and `cpu_check: false` loads what it is told to, unchecked
    unchecked = load_model(_cfg(tmp_path, pkg, cpu_check=False))
    assert unchecked.fallback is None and unchecked.cpu_check is None


def test_without_an_fp32_ir_such_a_package_is_refused_with_the_figures(tmp_path: Path) -> None:
    pkg = checked_package(tmp_path / "pkg", shipped_offset=10.0, fp32=False)
    with pytest.raises(PackageError, match=r"computes differently on this CPU.*off the FP32 reference.*no other IR"):
        load_model(_cfg(tmp_path, pkg))


def test_a_malformed_check_file_is_a_package_error_naming_it(tmp_path: Path) -> None:
    pkg = checked_package(tmp_path / "pkg")
    np.savez_compressed(pkg / CHECK_FILE, tiles=np.zeros((2, 3), np.float32))
    _rehash(pkg)
    with pytest.raises(PackageError, match=CHECK_FILE):
        load_model(_cfg(tmp_path, pkg))


def test_the_station_says_so_when_it_runs_the_fp32_ir(tmp_path: Path, broker: Broker) -> None:
    """A real daemon pipeline, a real subscriber: the model_fallback alarm is raised and every event
    records the precision that really ran."""
    pkg = checked_package(tmp_path / "pkg", shipped_offset=10.0)
    sub = Subscriber(broker, [f"{BASE}/#"])
    assert run_pipeline(_cfg(tmp_path, pkg, broker), threading.Event()) == 0
    got = wait_results(sub, 2)
    assert {e["model"]["precision"] for e in got} == {"fp32"}
    raised = [a for a in alarms(sub) if a.get("alarm") == "model_fallback"]
    assert raised and raised[0]["state"] == "raised" and "FP32 IR" in raised[0]["message"], json.dumps(alarms(sub))[:500]


def test_edge_inspect_warns_when_this_cpu_computes_the_package_differently(tmp_path: Path) -> None:
    """`edge inspect` runs model.xml as asked, but its verdicts are this CPU's: it says so on stderr."""
    import subprocess
    import sys

    import cv2

    img = tmp_path / "part.png"
    cv2.imwrite(str(img), make_part(defect=True, seed=5))
    for offset, warned in ((None, False), (10.0, True)):
        pkg = checked_package(tmp_path / f"pkg-{offset}", shipped_offset=offset)
        run = subprocess.run([sys.executable, "-m", "edge", "inspect", "--model", str(pkg), str(img)],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert run.returncode == 0, run.stderr
        assert ("computes differently on this CPU" in run.stderr) is warned, run.stderr
