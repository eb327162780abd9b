"""deploy/install.sh against a temporary root (--prefix, --no-venv): idempotent install, configs
never overwritten, atomic model activation with rollback, uninstall that keeps configs and state."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge.config import load_config
from edge.package import read_package
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, results, wait_results, write_config
from tests.daemon_proc import station as station_config
from tests.deploy.test_systemd_unit import UNIT, one, parse_unit
from tests.tiny_package import make_tiny_package

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install.sh"
MODELS = "var/lib/edge-inspect/models"


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", str(SCRIPT), "--prefix", str(root), *args], capture_output=True, text=True,
                       timeout=120, check=False)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Path -> (kind, mode, symlink target or content hash): the tree without timestamps."""
    out: dict[str, tuple[str, int, str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("packages")
    return (make_tiny_package(d / "v1", version="1.0.0"), make_tiny_package(d / "v2", version="2.0.0", min_area=6))


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_twice_gives_the_same_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv", "--station", "s3", "--station", "s4")
    first = snapshot(root)
    install(root, "--no-venv", "--station", "s3", "--station", "s4")
    assert snapshot(root) == first

    unit = root / "etc/systemd/system/edge-inspect@.service"
    assert unit.read_bytes() == UNIT.read_bytes() and mode(unit) == 0o644
    assert mode(root / "etc/edge-inspect") == 0o750
    assert mode(root / MODELS) == 0o750 and (root / MODELS / "versions").is_dir()
    assert (root / "opt/edge-inspect/share/README.md").is_file()
    # The unit's paths exist where install.sh put things.
    u = parse_unit(UNIT.read_text())
    assert (root / one(u, "Service", "ReadOnlyPaths").lstrip("/")).is_dir()
    assert one(u, "Service", "ExecStart").startswith("/opt/edge-inspect/venv/")
    ports, ui_ports = set(), set()
    for station in ("s3", "s4"):
        cfg_path = root / "etc/edge-inspect" / f"{station}.yaml"
        assert mode(cfg_path) == 0o640
        assert (root / "var/lib/edge-inspect" / station).is_dir()  # StateDirectory=edge-inspect/%i
        cfg = load_config(cfg_path)  # the rendered example is a valid config
        assert cfg.station.name == station
        assert cfg.state_dir == Path(f"/var/lib/edge-inspect/{station}")
        assert cfg.model.path == Path("/var/lib/edge-inspect/models/current")
        assert cfg.mqtt.password_file is None and cfg.mqtt.password_env is None  # credential is used
        ports.add(cfg.metrics.port)
        ui_ports.add(cfg.ui.port)
    assert len(ports) == 2, "two stations on one PC need two metrics ports"
    assert len(ui_ports) == 2 and 0 not in ui_ports, "...and two station pages"
    assert (root / "etc/systemd/system/edge-ui@.service").read_bytes() == (REPO / "deploy/edge-ui@.service").read_bytes()


def test_existing_config_is_kept_and_secrets_tightened(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv", "--station", "s3")
    cfg = root / "etc/edge-inspect/s3.yaml"
    cfg.write_text(cfg.read_text() + "# edited on site\n")
    cfg.chmod(0o644)
    pw = root / "etc/edge-inspect/s3.mqtt-password"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    install(root, "--no-venv", "--station", "s3")
    assert cfg.read_text().endswith("# edited on site\n")
    assert mode(cfg) == 0o640 and mode(pw) == 0o600


def test_bad_station_names_are_refused(tmp_path: Path) -> None:
    for name in ("models", "../etc", "a b", "x/y", ""):
        r = install(tmp_path / "root", "--no-venv", "--station", name, check=False)
        assert r.returncode != 0, name
    assert not (tmp_path / "root/etc").exists()


def test_model_activation_is_atomic_and_rolls_back(tmp_path: Path, packages: tuple[Path, Path]) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv")
    store = root / MODELS
    v1, v2 = packages
    id1, id2 = (f"tiny-dark-spot-{v}-{read_package(p).files['model.bin'][:8]}" for v, p in (("1.0.0", v1), ("2.0.0", v2)))

    install(root, "--model", str(v1))
    assert os.readlink(store / "current") == f"versions/{id1}"
    assert not (store / "previous").is_symlink()
    assert read_package(store / "current").version == "1.0.0"
    assert mode(store / "versions" / id1) == 0o750 and mode(store / "versions" / id1 / "model.bin") == 0o640

    # Watch `current` while switching back and forth: it must always resolve to a package.
    missing: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (store / "current" / "package.json").is_file():
                missing.append("current")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for pkg in (v2, v1, v2):
            install(root, "--model", str(pkg))
    finally:
        stop.set()
        watcher.join()
    assert not missing, "`current` was briefly missing during a switch"
    assert os.readlink(store / "current") == f"versions/{id2}"
    assert os.readlink(store / "previous") == f"versions/{id1}"
    assert sorted(p.name for p in (store / "versions").iterdir()) == sorted([id1, id2])  # no .incoming left

    before = snapshot(root)
    r = install(root, "--model", str(v2))  # already current: nothing changes
    assert "already current" in r.stdout and snapshot(root) == before

    install(root, "--rollback")
    assert os.readlink(store / "current") == f"versions/{id1}"
    assert os.readlink(store / "previous") == f"versions/{id2}"
    assert read_package(store / "current").version == "1.0.0"
    install(root, "--rollback")  # a second rollback rolls forward again
    assert os.readlink(store / "current") == f"versions/{id2}"


def test_rollback_without_previous_fails(tmp_path: Path, packages: tuple[Path, Path]) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv")
    install(root, "--model", str(packages[0]))
    r = install(root, "--rollback", check=False)
    assert r.returncode != 0 and "no previous model" in r.stderr
    assert (root / MODELS / "current").is_symlink()


def test_corrupt_package_is_refused(tmp_path: Path, packages: tuple[Path, Path]) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv")
    install(root, "--model", str(packages[0]))
    bad = tmp_path / "bad"
    shutil.copytree(packages[1], bad)
    data = bytearray((bad / "model.bin").read_bytes())
    data[0] ^= 0xFF
    (bad / "model.bin").write_bytes(bytes(data))
    before = snapshot(root)
    r = install(root, "--model", str(bad), check=False)
    assert r.returncode != 0 and "SHA-256 mismatch" in r.stderr
    assert snapshot(root) == before


def test_uninstall_keeps_configs_and_state_unless_purged(tmp_path: Path, packages: tuple[Path, Path]) -> None:
    root = tmp_path / "root"
    install(root, "--no-venv", "--station", "s3")
    install(root, "--model", str(packages[0]))
    units = root / "etc/systemd/system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "edge-inspect@s3.service").symlink_to("/etc/systemd/system/edge-inspect@.service")  # as `enable` does
    (units / "unrelated.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "var/lib/edge-inspect/s3/outbox.sqlite3").write_bytes(b"undelivered events")

    install(root, "--uninstall")
    assert not (root / "opt/edge-inspect").exists()
    assert not (units / "edge-inspect@.service").exists()
    assert not (wants / "edge-inspect@s3.service").is_symlink()
    assert (units / "unrelated.service").is_file()
    assert (root / "etc/edge-inspect/s3.yaml").is_file()
    assert (root / "var/lib/edge-inspect/s3/outbox.sqlite3").read_bytes() == b"undelivered events"
    assert (root / MODELS / "current").is_symlink()

    install(root, "--no-venv", "--station", "s3")  # reinstall finds everything where it was
    assert (root / "etc/systemd/system/edge-inspect@.service").is_file()

    install(root, "--uninstall", "--purge")
    assert not (root / "etc/edge-inspect").exists()
    assert not (root / "var/lib/edge-inspect").exists()
    assert (units / "unrelated.service").is_file()


# -- a model switch confirmed by the running daemon ------------------------------------------------
def test_model_becomes_current_only_after_the_daemon_loaded_it(tmp_path: Path, packages: tuple[Path, Path],
                                                               broker: Broker) -> None:
    """install.sh asks the running station (SIGHUP + model-request.json) to load the new package and
    switches `current` only when loaded-model.json confirms it; a package the daemon refuses, or a
    station that never answers, leaves `current` (and the running model) where they were."""
    root = tmp_path / "root"
    install(root, "--no-venv")
    store = root / MODELS
    v1, v2 = packages
    install(root, "--model", str(v1))
    state = root / "var/lib/edge-inspect/s1"
    state.mkdir(parents=True)
    sub = Subscriber(broker, [f"{BASE}/result"])
    data = station_config(tmp_path, store / "current", broker, {"type": "synthetic", "count": 100_000, "fps": 10,
                                                        "stop_at_end": False},
                   state_dir=str(state), evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "s1.yaml", data), tmp_path / "daemon.log")
    pid = f"s1={d.proc.pid}"
    try:
        wait_results(sub, 2, 60)
        assert json.loads((state / "loaded-model.json").read_text())["version"] == "1.0.0"

        # A package that verifies for install.sh (hashes) but that the daemon refuses.
        bad = tmp_path / "bad"
        shutil.copytree(v2, bad)
        meta = json.loads((bad / "package.json").read_text())
        meta.update(version="3.0.0", format_version=999)
        (bad / "package.json").write_text(json.dumps(meta))
        before = os.readlink(store / "current")
        r = install(root, "--model", str(bad), "--station-pid", pid, check=False)
        assert r.returncode != 0 and "station s1 did not load the model" in r.stderr, r.stdout + r.stderr
        assert "format_version" in r.stderr and "not activated" in r.stderr
        assert os.readlink(store / "current") == before
        assert not (state / "model-request.json").exists()
        n = len(results(sub))
        wait_results(sub, n + 3)
        assert {e["model"]["version"] for e in results(sub)[n:]} == {"1.0.0"}, "the station kept its model"

        r = install(root, "--model", str(v2), "--station-pid", pid)
        assert "station s1 loaded tiny-dark-spot 2.0.0" in r.stdout
        id2 = f"tiny-dark-spot-2.0.0-{read_package(v2).files['model.bin'][:8]}"
        assert os.readlink(store / "current") == f"versions/{id2}"
        loaded = json.loads((state / "loaded-model.json").read_text())
        assert loaded["ok"] and loaded["version"] == "2.0.0" and loaded["resolved"] == str(store / "versions" / id2)
        n = len(results(sub))
        wait_results(sub, n + 3)
        assert results(sub)[-1]["model"]["version"] == "2.0.0"

        r = install(root, "--rollback", "--station-pid", pid)  # confirmed the same way
        assert "station s1 loaded tiny-dark-spot 1.0.0" in r.stdout
        assert read_package(store / "current").version == "1.0.0"
    finally:
        d.kill()
        sub.close()


def test_a_station_that_does_not_answer_blocks_the_switch(tmp_path: Path, packages: tuple[Path, Path],
                                                          broker: Broker) -> None:
    """Two stations: s1 (a real daemon) loads the new model, s2 never answers. `current` stays, and
    s1 is asked to load the old model again, so the line does not run two models."""
    root = tmp_path / "root"
    install(root, "--no-venv")
    install(root, "--model", str(packages[0]))
    store, s1, s2 = root / MODELS, root / "var/lib/edge-inspect/s1", root / "var/lib/edge-inspect/s2"
    s1.mkdir(parents=True)
    s2.mkdir(parents=True)
    sub = Subscriber(broker, [f"{BASE}/result"])
    data = station_config(tmp_path, store / "current", broker, {"type": "synthetic", "count": 100_000, "fps": 10,
                                                               "stop_at_end": False},
                          state_dir=str(s1), evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "s1.yaml", data), tmp_path / "daemon.log")
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN);"
                             " time.sleep(120)"])
    try:
        wait_results(sub, 2, 60)
        before = snapshot(root)
        r = install(root, "--model", str(packages[1]), "--station-pid", f"s1={d.proc.pid}",
                    "--station-pid", f"s2={deaf.pid}", "--reload-timeout", "5", check=False)
        assert r.returncode != 0 and "station s2 did not report within 5 s" in r.stderr, r.stdout + r.stderr
        assert "station s1 loaded tiny-dark-spot 2.0.0" in r.stdout
        assert "rolling back" in r.stdout and "station s1 loaded tiny-dark-spot 1.0.0" in r.stdout, r.stdout
        assert json.loads((s1 / "loaded-model.json").read_text())["version"] == "1.0.0"
        n = len(results(sub))
        wait_results(sub, n + 3)
        assert results(sub)[-1]["model"]["version"] == "1.0.0"
    finally:
        deaf.kill()
        deaf.wait()
        d.kill()
        sub.close()
    after = snapshot(root)
    assert after[f"{MODELS}/current"] == before[f"{MODELS}/current"]
    assert not any("model-request" in k for k in after), "request left behind"
