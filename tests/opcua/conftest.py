"""Fixtures of the OPC UA tests: certificates made by the real CLI, one module-scoped broker and
station config, the real daemon as a process (tests/daemon_proc.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker, free_port
from tests.daemon_proc import ROOT

pytest.importorskip("asyncua", reason="the `opcua` extra is not installed")


@pytest.fixture(scope="session")
def opcua_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m edge opcua-certs` as an integrator runs it: server, clients plc and plc2, trusted/."""
    out = tmp_path_factory.mktemp("opcua-certs")
    subprocess.run([sys.executable, "-m", "edge", "opcua-certs", "--out", str(out), "--client", "plc",
                    "--client", "plc2", "--host", "127.0.0.1"], cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


def opcua_section(certs: Path | None, port: int | None = None, **extra: object) -> dict[str, object]:
    """The station's `opcua:` section: secure with the made files, or SecurityPolicy None."""
    section: dict[str, object] = {"enabled": True, "endpoint": f"opc.tcp://127.0.0.1:{port or free_port()}/edge/"}
    if certs is None:
        section.update(security_policy="None", allow_anonymous=True)
    else:
        section.update(certificate=str(certs / "server/cert.der"), private_key=str(certs / "server/key.pem"),
                       trusted_clients=str(certs / "trusted"))
    return {**section, **extra}
