"""Shared fixtures: a tiny real OpenVINO model package built without torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.tiny_package import make_tiny_package


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh real Mosquitto on a free port (anonymous, no persistence); killed after the test."""
    b = Broker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.kill()
