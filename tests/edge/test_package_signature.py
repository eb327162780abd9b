"""Signed model packages (model.public_key) and package file paths confined to the package.

Packages are the torch-free tiny package signed with edge.signature.sign_package, the function
`python -m training export --sign` calls; keys come from `python -m edge keygen`. The daemon cases
run the real `python -m edge run`: a refused package is exit 78 at start, and on SIGHUP the old
model keeps inspecting.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge.package import PackageError, read_package
from edge.signature import SIGNATURE_FILE, sign_package, verify_package_signature
from tests.broker import Broker, Subscriber
from tests.daemon_proc import ROOT, Daemon, alarms, results, station, wait_results, write_config
from tests.tiny_package import make_tiny_package

EX_CONFIG = 78


def edge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    for name in ("vendor", "other"):
        r = edge_cli("keygen", "--out", str(d), "--name", name)
        assert r.returncode == 0, r.stderr
    assert (d / "vendor.key").stat().st_mode & 0o077 == 0, "the private key must not be readable by others"
    assert edge_cli("keygen", "--out", str(d), "--name", "vendor").returncode != 0, "never overwrite a key"
    return {"key": d / "vendor.key", "pub": d / "vendor.pub", "other_key": d / "other.key", "other_pub": d / "other.pub"}


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Path:
    pkg = make_tiny_package(tmp_path_factory.mktemp("signed") / "pkg")
    sign_package(pkg, keys["key"])
    return pkg


def variant(signed: Path, dest: Path, how: str, keys: dict[str, Path]) -> Path:
    """A copy of the signed package broken in one way."""
    pkg = Path(shutil.copytree(signed, dest))
    if how == "unsigned":
        (pkg / SIGNATURE_FILE).unlink()
    elif how == "package_json":  # e.g. a looser threshold slipped in after signing
        meta = json.loads((pkg / "package.json").read_text())
        meta["postprocess"]["pixel_threshold"] = 0.99
        (pkg / "package.json").write_text(json.dumps(meta, indent=2) + "\n")
    elif how == "model_bin":  # weights replaced; package.json (and its signature) untouched
        data = bytearray((pkg / "model.bin").read_bytes())
        data[-1] ^= 0xFF
        (pkg / "model.bin").write_bytes(bytes(data))
    elif how == "wrong_key":
        sign_package(pkg, keys["other_key"])
    elif how == "garbage_sig":
        (pkg / SIGNATURE_FILE).write_text("not base64 at all!\n")
    return pkg


BROKEN = {
    "unsigned": "package.json.sig: missing",
    "package_json": "not a valid signature",
    "model_bin": "SHA-256 mismatch",
    "wrong_key": "not a valid signature",
    "garbage_sig": "unreadable signature",
}


def test_signature_verifies_and_catches_each_tampering(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    verify_package_signature(signed, keys["pub"])
    read_package(signed)
    for how, words in BROKEN.items():
        pkg = variant(signed, tmp_path / how, how, keys)
        with pytest.raises(PackageError, match=words):
            verify_package_signature(pkg, keys["pub"])
            read_package(pkg)  # model.bin: the signature holds, the signed hash does not
    with pytest.raises(PackageError, match="not a valid signature"):
        verify_package_signature(signed, keys["other_pub"])  # a station trusting another vendor
    with pytest.raises(PackageError, match="cannot read the Ed25519 public key"):
        verify_package_signature(signed, keys["key"])  # a private key configured by mistake


def test_sign_cli_signs_only_a_package_that_verifies(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    pkg = variant(signed, tmp_path / "resign", "unsigned", keys)
    r = edge_cli("sign", "--key", str(keys["key"]), str(pkg))
    assert r.returncode == 0, r.stderr
    verify_package_signature(pkg, keys["pub"])
    bad = variant(signed, tmp_path / "bad", "model_bin", keys)
    r = edge_cli("sign", "--key", str(keys["key"]), str(bad))
    assert r.returncode == EX_CONFIG and "SHA-256 mismatch" in r.stderr


def test_config_refuses_public_key_without_hash_checks(tmp_path: Path, signed: Path, keys: dict[str, Path]) -> None:
    data = station(tmp_path, signed, None, {"type": "synthetic", "count": 1},
                   model={"public_key": str(keys["pub"]), "verify_hashes": False})
    r = edge_cli("check-config", str(write_config(tmp_path / "s.yaml", data)))
    assert r.returncode == EX_CONFIG and "verify_hashes" in r.stderr


def test_daemon_runs_signed_and_refuses_tampered_packages(tmp_path: Path, signed: Path, keys: dict[str, Path],
                                                          broker: Broker) -> None:
    sub = Subscriber(broker, ["inspection/l1/s1/#"])
    source = {"type": "synthetic", "count": 3, "fps": 20, "stop_at_end": True}
    try:
        data = station(tmp_path, signed, broker, source, model={"public_key": str(keys["pub"])})
        d = Daemon(write_config(tmp_path / "ok.yaml", data), tmp_path / "ok.log")
        assert d.wait(120) == 0, d.text()
        wait_results(sub, 3)
        for how, words in BROKEN.items():
            pkg = variant(signed, tmp_path / how, how, keys)
            data = station(tmp_path, pkg, broker, source, model={"public_key": str(keys["pub"])})
            d = Daemon(write_config(tmp_path / f"{how}.yaml", data), tmp_path / f"{how}.log")
            assert d.wait(120) == EX_CONFIG, f"{how}: {d.text()}"
            assert words in d.text() and str(pkg) in d.text(), f"{how}: {d.text()}"
        assert len(results(sub)) == 3, "a refused package inspected something"
    finally:
        sub.close()


def test_reload_of_an_unsigned_package_keeps_the_old_model(tmp_path: Path, signed: Path, keys: dict[str, Path],
                                                           broker: Broker) -> None:
    sub = Subscriber(broker, ["inspection/l1/s1/#"])
    unsigned = make_tiny_package(tmp_path / "v2", version="2.0.0")  # valid, just not signed
    data = station(tmp_path, signed, broker, {"type": "synthetic", "count": 10_000, "fps": 10, "stop_at_end": False},
                   model={"public_key": str(keys["pub"])})
    cfg = write_config(tmp_path / "station.yaml", data)
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_results(sub, 2, 60)
        write_config(cfg, {**data, "model": {**data["model"], "path": str(unsigned)}})
        d.signal(signal.SIGHUP)
        assert sub.wait_for(lambda ms: any(a["alarm"] == "model_reload" and a["state"] == "raised"
                                           and "package.json.sig: missing" in a["message"] for a in alarms(sub)),
                            30), d.text()
        n = len(results(sub))
        wait_results(sub, n + 3)
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.text()
    finally:
        d.kill()
        sub.close()
    assert {e["model"]["version"] for e in results(sub)} == {"1.0.0"}


# -- package paths ----------------------------------------------------------------------------------
def _with_files(src: Path, dest: Path, extra: dict[str, str]) -> Path:
    pkg = Path(shutil.copytree(src, dest))
    meta = json.loads((pkg / "package.json").read_text())
    meta["files"].update(extra)
    (pkg / "package.json").write_text(json.dumps(meta, indent=2))
    return pkg


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "fp32/../../outside.bin"])
def test_package_file_names_must_stay_inside(tmp_path: Path, tiny_package: Path, name: str) -> None:
    pkg = _with_files(tiny_package, tmp_path / "pkg", {name: "0" * 64})
    with pytest.raises(PackageError, match="must be a relative path inside the package"):
        read_package(pkg)


def test_symlink_out_of_the_package_is_refused_by_the_daemon(tmp_path: Path, tiny_package: Path,
                                                             broker: Broker) -> None:
    pkg = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    outside = tmp_path / "elsewhere.bin"
    shutil.move(pkg / "model.bin", outside)  # same bytes, same hash: only the location is wrong
    (pkg / "model.bin").symlink_to(outside)
    with pytest.raises(PackageError, match="outside the package"):
        read_package(pkg)
    data = station(tmp_path, pkg, broker, {"type": "synthetic", "count": 1})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")
    assert d.wait(120) == EX_CONFIG, d.text()
    assert "outside the package" in d.text()


def test_training_export_sign(tmp_path: Path, keys: dict[str, Path]) -> None:
    """`python -m training export --sign KEY` writes a signature the station accepts (needs torch)."""
    pytest.importorskip("torch")
    from tests.training.test_export import make_checkpoint, make_dataset
    from training.release import export as ex

    data = make_dataset(tmp_path / "data", n=8)
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")  # untrained: only the packaging matters here
    out = tmp_path / "model"
    assert ex.main(["--checkpoint", str(ckpt), "--out", str(out), "--calib-data", str(data), "--precision", "fp32",
                    "--sign", str(keys["key"])]) == 0
    verify_package_signature(out, keys["pub"])
    read_package(out)
    assert ex.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "nokey"), "--calib-data", str(data),
                    "--precision", "fp32", "--sign", str(tmp_path / "missing.key")]) == 2
    assert not (tmp_path / "nokey").exists(), "a failed signature must not leave a package behind"


def test_check_config_warns_about_an_unsigned_package(tmp_path: Path, tiny_package: Path,
                                                      keys: dict[str, Path]) -> None:
    data = station(tmp_path, tiny_package, None, {"type": "synthetic", "count": 1},
                   model={"public_key": str(keys["pub"])})
    r = edge_cli("check-config", str(write_config(tmp_path / "s.yaml", data)))
    assert r.returncode == 0 and "package.json.sig: missing" in r.stderr, r.stderr
