"""review-export's labels for a confirmed defect without a box: the station's evidence mask, or labelling by hand."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faults.harness import png_bomb
from training.release.review_export import _label

PREFIX = "2026-12-07/0badc0de-0000-5000-8000-000000000001"


@pytest.mark.parametrize(("mask", "where", "why"), [
    (np.full((30, 40), 255, np.uint8), "images", "evidence"),
    (None, "to_label", "no evidence mask"),
    (np.full((30, 20), 255, np.uint8), "to_label", "not one channel of the frame's 40x30"),
    (np.full((30, 40, 3), 255, np.uint8), "to_label", "not one channel of the frame's 40x30"),
    (b"garbage", "to_label", "evidence mask unreadable (not a readable image"),
    (png_bomb(9000, 5000), "to_label", "evidence mask unreadable (9000x5000 = 45000000 pixels"),
])
def test_confirmed_defect_takes_the_evidence_mask_only_when_it_is_the_frames(
        tmp_path: Path, mask: np.ndarray | bytes | None, where: str, why: str) -> None:
    root = tmp_path / "evidence"
    (root / PREFIX).parent.mkdir(parents=True)
    if isinstance(mask, np.ndarray):
        cv2.imwrite(str(root / f"{PREFIX}.mask.png"), mask)
    elif mask is not None:
        (root / f"{PREFIX}.mask.png").write_bytes(mask)
    out = tmp_path / "out.png"
    review = {"action": "confirm_fail", "box": None}
    event = {"image": {"width": 40, "height": 30}, "evidence": PREFIX}
    got_where, got_why = _label(review, event, root, out)
    assert got_where == where and why in got_why, (got_where, got_why)
    assert out.is_file() == (where == "images")
