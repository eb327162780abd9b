"""Big frames end to end (issue 20): the real daemon on 5 MP mono parts, real broker, real evidence files.

The synthetic source's `pool` hands over copies of pre-generated parts, so camera-sized frames
cost a copy instead of a generation; the test rebuilds the same pool and checks, part by part,
the verdict against the truth and the evidence files against the frame: the frame PNG is the
frame, the mask PNG holds the event's regions, the overlay is the float tint of the frame shrunk to 1280 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from edge.config import SyntheticSourceConfig
from edge.contract import Region
from edge.sources.synthetic import SyntheticSource
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, station, wait_results, write_config
from tests.edge.test_bigframes import reference_shrunk_overlay
from tests.tiny_package import make_tiny_package

W, H = 2448, 2048
SOURCE = {"type": "synthetic", "width": W, "height": H, "fps": 0, "count": 4, "defect_rate": 0.5, "seed": 3,
          "stop_at_end": True, "pool": 2}


def test_5mp_parts_get_verdicts_and_exact_evidence(tmp_path: Path, broker: Broker) -> None:
    pkg = make_tiny_package(tmp_path / "pkg", tile=256)  # scale 1: the 3.5 px dark disc stays visible
    data = station(tmp_path, pkg, broker, SOURCE, pipeline={"drain_timeout_s": 120})
    cfg = write_config(tmp_path / "station.yaml", data)
    sub = Subscriber(broker, [f"{BASE}/#"])
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        got = wait_results(sub, 4, timeout=300)
        assert d.wait(300) == 0, d.text()  # stop_at_end: the writer finishes what is queued on the way out
    finally:
        d.kill()
        sub.close()
    src = SyntheticSource(SyntheticSourceConfig(**SOURCE))
    src.open()
    frames = {f.part_id: f.image for f in iter(lambda: src.read(1.0), None)}
    assert sorted(e["part_id"] for e in got) == sorted(frames)
    assert {e["part_id"][:2] for e in got} == {"ok", "ng"}, "the seed must give both kinds of part"
    for e in got:
        assert e["verdict"] == ("fail" if e["part_id"].startswith("ng") else "pass"), e
        assert e["image"] == {"width": W, "height": H}
        if e["verdict"] == "pass":
            assert e["evidence"] is None
            continue
        assert e["evidence_status"] == "pending"
        prefix = tmp_path / "state" / "evidence" / e["evidence"]
        frame = frames[e["part_id"]]
        assert frame is not None
        assert np.array_equal(cv2.imread(f"{prefix}.frame.png", cv2.IMREAD_UNCHANGED), frame)
        mask = cv2.imread(f"{prefix}.mask.png", cv2.IMREAD_UNCHANGED)
        regions = [Region(area=r["area"], bbox=tuple(r["bbox"]), centroid=(0.0, 0.0), max_score=0.0, mean_score=0.0)
                   for r in e["regions"]]
        assert regions and int(np.count_nonzero(mask)) == sum(r.area for r in regions)
        overlay = cv2.imread(f"{prefix}.overlay.png", cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (1071, 1280, 3)  # evidence.overlay_max_side; frame and mask keep every pixel
        assert np.array_equal(overlay, reference_shrunk_overlay(frame, mask // 255, regions, "fail", (0, 0), 1280))
    assert json.dumps(got)  # plain JSON events


def test_pool_hands_over_copies(tmp_path: Path) -> None:
    """A pooled part is a new buffer: the pipeline (and the evidence writer) may keep it."""
    src = SyntheticSource(SyntheticSourceConfig(**{**SOURCE, "count": 6, "width": 64, "height": 48}))
    src.open()
    imgs = [f.image for f in iter(lambda: src.read(1.0), None)]
    assert len(imgs) == 6 and all(i is not None for i in imgs)
    assert len({id(i) for i in imgs}) == 6 and not any(np.shares_memory(a, b) for a in imgs for b in imgs if a is not b)


def test_run_pipeline_leaves_no_exit_timer_after_a_clean_stop(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    """run_pipeline bounds its stop with a timer that exits the process; once the stop is done it must go,
    or an in-process caller (the benchmark runs ten pipelines in one process) is exited 75 s later."""
    import threading

    from edge.config import validate_config
    from edge.daemon import run_pipeline

    data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 0, "count": 3, "stop_at_end": True},
                   evidence={"enabled": False})
    assert run_pipeline(validate_config(data), threading.Event()) == 0
    timers = [t for t in threading.enumerate()
              if isinstance(t, threading.Timer) and getattr(t.function, "__name__", "") == "expire"]
    for t in timers:
        t.join(5)  # a cancelled timer's thread ends at once
    assert not [t for t in timers if t.is_alive()]


def test_run_pipeline_gives_opencv_the_configured_threads(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    """pipeline.opencv_threads reaches OpenCV (process-wide): 1 leaves the cores to OpenVINO, 0 is OpenCV's default."""
    import threading

    import cv2

    from edge.config import validate_config
    from edge.daemon import run_pipeline

    before = cv2.getNumThreads()
    try:
        data = station(tmp_path, tiny_package, broker, {"type": "synthetic", "fps": 0, "count": 1, "stop_at_end": True},
                       evidence={"enabled": False}, pipeline={"opencv_threads": 3})
        assert run_pipeline(validate_config(data), threading.Event()) == 0
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
