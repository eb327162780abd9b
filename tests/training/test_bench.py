"""The benchmark runs end to end on a tiny exported model and writes every figure it promises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.training.test_export import make_checkpoint, make_dataset
from training.core.unet import UNetConfig, build_model
from training.release import bench
from training.release import export as ex

KEYS = {
    "torch_fp32_ms", "ov_fp32_ms", "ov_int8_ms", "ov_fp32_fps", "ov_int8_fps", "speedup_int8_vs_torch",
    "speedup_int8_vs_ov_fp32", "speedup_int8_vs_ov_fp32_throughput", "gflops_per_tile", "int8_gops_latency",
    "int8_gops_throughput", "vnni_peak_gops", "vnni_peak_share", "peak_formula", "precision", "gate",
    "threads", "tile", "cpu", "load_avg_before", "load_avg_after", "extra_ms",
}


def test_bench_writes_all_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data", n=12)
    ckpt = make_checkpoint(tmp_path / "best.pt")  # random init: speed does not need a trained model
    assert ex.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model"), "--calib-data", str(data),
                    "--calib-size", "16"]) == 0
    out = tmp_path / "bench.json"
    assert bench.main(["--checkpoint", str(ckpt), "--model", str(tmp_path / "model"), "--json", str(out),
                       "--threads", "1", "--seconds", "2", "--data", str(data)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= KEYS
    for k in ("torch_fp32_ms", "ov_fp32_ms", "ov_int8_ms", "ov_fp32_fps", "ov_int8_fps", "gflops_per_tile"):
        assert r[k] > 0 and math.isfinite(r[k]), k
    assert r["threads"] == 1 and r["tile"] == 64 and r["precision"] == "int8"
    assert r["gate"]["passed"] is True
    assert "speed-up INT8 vs PyTorch FP32" in capsys.readouterr().out


def test_conv_gflops_matches_hand_count() -> None:
    """A depth-1, width-2 U-Net on a 16 px tile, counted by hand from its layer shapes."""
    from edge.contract import InputSpec

    model = build_model(UNetConfig(base_width=2, depth=1, max_width=4, dropout=0.0)).eval()
    spec = InputSpec(tile=16, overlap=0, multiple_of=2)
    full, half = 16 * 16, 8 * 8
    macs = (full * 2 * 1 * 9 + full * 2 * 2 * 9  # stem: 1->2, 2->2
            + half * 4 * 2 * 9 + half * 4 * 4 * 9  # down: 2->4, 4->4
            + full * 2 * 6 * 9 + full * 2 * 2 * 9  # up: (4+2)->2, 2->2
            + full * 1 * 2)  # head 1x1
    assert bench.conv_gflops(model, spec) == pytest.approx(2 * macs / 1e9)


def test_vnni_peak_formula() -> None:
    peak, text = bench.vnni_peak_gops(2, 2600.0, 2)
    assert peak == pytest.approx(2 * 2.6e9 * 2 * 64 * 2 / 1e9)
    assert "64 int8 MACs/cycle" in text
