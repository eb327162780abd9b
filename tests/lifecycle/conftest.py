"""Packages, a model store and golden images shared by the lifecycle tests (built once per module run)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from tests.tiny_package import make_part, make_tiny_package


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/models/{versions/v1, v2, blind}: v1 and v2 judge alike; `blind` ignores every region
    smaller than 5000 px, so it passes the defective golden parts (it disagrees with the set)."""
    root = tmp_path_factory.mktemp("store") / "models"
    make_tiny_package(root / "versions" / "v1", version="1.0.0")
    make_tiny_package(root / "versions" / "v2", version="2.0.0")
    make_tiny_package(root / "versions" / "blind", version="3.0.0", min_area=5000)
    return root


@pytest.fixture(scope="session")
def golden_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two good and two defective parts, as the synthetic source makes them (ids say the truth)."""
    folder = tmp_path_factory.mktemp("golden-src")
    out = {}
    for i, name in enumerate(["good-a", "good-b", "defect-a", "defect-b"]):
        out[name] = folder / f"{name}.png"
        cv2.imwrite(str(out[name]), make_part((96, 128), defect=name.startswith("defect"), seed=100 + i))
    return out
