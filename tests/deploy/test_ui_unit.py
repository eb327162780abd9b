"""deploy/edge-ui@.service: the station page's unit shares the daemon's user and state dir, yields
CPU and disk to it, gets no devices, is `systemd-analyze verify` clean and at most as exposed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.deploy.test_systemd_unit import (
    MAX_EXPOSURE,
    REPO,
    VENV_PYTHON,
    _analyze,
    needs_analyze,
    one,
    parse_unit,
)

UNIT = REPO / "deploy" / "edge-ui@.service"
DAEMON = REPO / "deploy" / "edge-inspect@.service"


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    path = tmp_path / "edge-ui@station3.service"
    path.write_text(UNIT.read_text().replace(VENV_PYTHON, sys.executable))
    return path


def test_settings_match_the_daemon_and_yield_to_it() -> None:
    ui, daemon = parse_unit(UNIT.read_text()), parse_unit(DAEMON.read_text())
    s = "Service"
    assert one(ui, s, "ExecStart") == f"{VENV_PYTHON} -m edge ui --config /etc/edge-inspect/%i.yaml"
    for key in ("User", "Group", "StateDirectory", "ConfigurationDirectory", "LoadCredential", "UMask"):
        assert one(ui, s, key) == one(daemon, s, key), key
    assert "78" in one(ui, s, "RestartPreventExitStatus").split()
    assert int(one(ui, s, "Nice")) > 0 and int(one(ui, s, "CPUWeight")) < 100 and int(one(ui, s, "IOWeight")) < 100
    assert one(ui, s, "PrivateDevices") == "yes" and one(ui, s, "MemoryDenyWriteExecute") == "yes"
    assert one(ui, s, "ReadOnlyPaths") == "-/var/lib/edge-inspect/%i/evidence"


@needs_analyze
def test_verify_clean_and_exposure(rendered: Path) -> None:
    r = _analyze("verify", "--man=no", str(rendered))
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "edge-ui@" in ln]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr
    r = _analyze("security", "--offline=yes", "--no-pager", str(rendered))
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout + r.stderr)
    assert m and float(m.group(1)) <= MAX_EXPOSURE, r.stdout
