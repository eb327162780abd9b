"""The benchmark's forced verdicts stand in for edge.flow.postprocess_map exactly as the flow calls it
(it drifted once: a new argument made every benchmark part an `error`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

import edge.flow
from edge.contract import PostprocessParams

ROOT = Path(__file__).resolve().parents[2]


def _load() -> object:
    spec = importlib.util.spec_from_file_location("bench_failrate", ROOT / "scripts" / "bench_failrate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forced_verdicts_take_the_flows_arguments() -> None:
    forced = _load().ForcedVerdicts(0.5).install()  # type: ignore[attr-defined]
    try:
        prob = np.zeros((48, 64), np.float32)
        dets = [edge.flow.postprocess_map(prob, PostprocessParams(), 0.2) for _ in range(4)]  # as FrameFlow calls it
    finally:
        forced.uninstall()
    assert edge.flow.postprocess_map is not forced
    assert [bool(d.regions) for d in dets] == [False, True, False, True]  # every 2nd part fails
