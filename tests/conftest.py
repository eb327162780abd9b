"""Shared fixtures: a tiny real OpenVINO model package built without torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_package import make_tiny_package


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "tiny")
