"""edge/quality.py: the per-frame sharpness/exposure signal tells a blurred or badly exposed frame
from a good one, for every frame type the pipeline accepts, and fits the event schema."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge.events import build_result_event, validate_event
from edge.quality import image_quality
from tests.tiny_package import make_part


@pytest.mark.parametrize("shape", [(96, 128), (2048, 2448), (600, 800, 3), (300, 400, 4), (120, 160, 1)])
def test_blur_lowers_sharpness_for_every_frame_kind(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, shape, dtype=np.uint8)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 6).reshape(shape)
    q_sharp, q_blur = image_quality(sharp), image_quality(blurred)
    assert q_blur["sharpness"] < q_sharp["sharpness"] / 5, (q_sharp, q_blur)
    assert 100 < q_sharp["mean"] < 155


def test_exposure_and_16_bit() -> None:
    dark = np.zeros((100, 100), np.uint8)
    dark[:10] = 120
    q = image_quality(dark)
    assert q["clipped"] == pytest.approx(0.9, abs=0.02) and q["mean"] < 20
    q16 = image_quality(np.full((64, 64), 65535, np.uint16))
    assert q16["clipped"] == 1.0 and q16["mean"] == 255.0


def test_event_carries_it_and_validates() -> None:
    common = dict(station={"line": "l", "name": "s"}, seq=0, part_id="p", capture_ts=1.0, verdict="pass",
                  reasons=[], regions=[], total_defect_area=0, image={"width": 128, "height": 96},
                  model={"name": "m", "version": "1", "sha256": "x", "precision": "FP32"}, rules={},
                  timings_ms={"capture_to_result": 1.0})
    with_q = build_result_event(**common, image_quality=image_quality(make_part()))  # type: ignore[arg-type]
    validate_event(with_q)
    without = build_result_event(**common)  # type: ignore[arg-type]
    validate_event(without)
    assert "image_quality" not in without
