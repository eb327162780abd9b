"""INT8 ranges keep a rare, strong response: the defect is the tail of the activations."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from edge.inference import core
from training.release.quantize import CalibrationTiles, input_convolutions, quantize_int8

pytest.importorskip("nncf")


def _spot_model(tile: int = 32) -> ov.Model:
    """conv 3x3 + ReLU (a dark-spot detector), conv 1x1, sigmoid: the map's peak is a spot's response."""
    x = ops.parameter([1, 1, tile, tile], np.float32, name="image")
    k = np.full((4, 1, 3, 3), -1.0 / 9.0, np.float32)
    h = ops.relu(ops.add(ops.convolution(x, ops.constant(k), [1, 1], [1, 1], [1, 1], [1, 1]),
                         ops.constant(np.full((1, 4, 1, 1), 100.0, np.float32))))
    w = np.full((1, 4, 1, 1), 0.05, np.float32)
    logit = ops.add(ops.convolution(h, ops.constant(w), [1, 1], [0, 0], [0, 0], [1, 1]),
                    ops.constant(np.full((1, 1, 1, 1), -17.0, np.float32)))
    return ov.Model([ops.sigmoid(logit)], [x], "spot")


def test_int8_keeps_the_peak_of_a_rare_strong_response() -> None:
    """One calibration tile in ten holds a dark spot; with NNCF's default ranges (mean of per-tile
    maxima) the spot's activations clip and the INT8 map cannot reach the FP32 peak."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(90, 110, (10, 1, 32, 32)).astype(np.uint8)  # plain parts
    tiles[0, 0, 12:20, 12:20] = 0  # a dark spot: the strong, rare response
    fp32 = _spot_model()
    int8 = quantize_int8(fp32, CalibrationTiles(tiles, 10, 1, 9))
    spot = tiles[:1].astype(np.float32)
    ref = float(core().compile_model(fp32, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(spot)[0].max())
    got = float(core().compile_model(int8, "CPU")(spot)[0].max())
    assert ref > 0.9  # the spot is found in FP32
    assert got == pytest.approx(ref, abs=0.02), (got, ref)


def test_the_convolution_reading_the_input_stays_in_float() -> None:
    """INT8 exports keep the first convolution in float (quantize.float_input_layers: on AMX CPUs
    OpenVINO computed that layer of a saved INT8 IR wrongly); every later one is quantized."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(90, 110, (10, 1, 32, 32)).astype(np.uint8)
    tiles[0, 0, 12:20, 12:20] = 0
    fp32 = _spot_model()
    first = input_convolutions(fp32)
    assert len(first) == 1
    int8 = quantize_int8(fp32, CalibrationTiles(tiles, 10, 1, 9))
    convs = [op for op in int8.get_ordered_ops() if op.get_type_name() == "Convolution"]
    fed_by_fq = {op.get_friendly_name(): any(op.input_value(i).get_node().get_type_name() == "FakeQuantize"
                                             for i in range(2)) for op in convs}
    assert fed_by_fq[first[0]] is False, fed_by_fq
    assert sum(fed_by_fq.values()) == len(convs) - 1, fed_by_fq  # the 1x1 conv is INT8
