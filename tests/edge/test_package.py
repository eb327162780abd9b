"""A damaged or inconsistent model package is refused with a message that says what is wrong.

Uses the torch-free tiny package (tests.tiny_package): each test copies it and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.inference import Inferencer
from edge.package import REQUIRED_KEYS, PackageError, read_package, sha256_file
from tests.tiny_package import make_tiny_package


@pytest.fixture
def pkg(tiny_package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_package, tmp_path / "pkg"))


def edit_json(pkg: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = pkg / "package.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rehash(pkg: Path, rel: str) -> None:
    """Make package.json agree with a file we changed on purpose (a consistent but bad package)."""
    edit_json(pkg, lambda d: d["files"].__setitem__(rel, sha256_file(pkg / rel)))


def test_valid_package_loads(pkg: Path) -> None:
    meta = read_package(pkg)
    assert meta.precision == "fp32" and meta.input.tile == 64
    assert Inferencer(pkg, num_requests=1).info.sha256 == meta.files["model.bin"]


def test_truncated_bin_is_refused(pkg: Path) -> None:
    data = (pkg / "model.bin").read_bytes()
    (pkg / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match=r"model\.bin: SHA-256 mismatch"):
        read_package(pkg)
    with pytest.raises(PackageError, match="SHA-256 mismatch"):
        Inferencer(pkg)
    rehash(pkg, "model.bin")  # even with a matching hash OpenVINO must not accept half the weights
    with pytest.raises(PackageError, match=r"model\.xml: OpenVINO cannot read the model"):
        Inferencer(pkg)


def test_wrong_hash_is_refused(pkg: Path) -> None:
    edit_json(pkg, lambda d: d["files"].__setitem__("model.xml", "0" * 64))
    with pytest.raises(PackageError, match=r"model\.xml: SHA-256 mismatch .*expected 0000000000000000"):
        read_package(pkg)


def test_bad_xml_is_refused(pkg: Path) -> None:
    (pkg / "model.xml").write_text("<net name='x'><layers><layer></net>")
    rehash(pkg, "model.xml")
    with pytest.raises(PackageError, match=r"model\.xml: not a valid IR XML file"):
        read_package(pkg)


def test_missing_package_json_is_refused(pkg: Path) -> None:
    (pkg / "package.json").unlink()
    with pytest.raises(PackageError, match=r"package\.json: missing .*training export"):
        read_package(pkg)
    with pytest.raises(PackageError, match="is not a folder"):
        read_package(pkg / "nowhere")


def test_invalid_json_is_refused(pkg: Path) -> None:
    (pkg / "package.json").write_text('{"name": ')
    with pytest.raises(PackageError, match="not valid JSON"):
        read_package(pkg)
    (pkg / "package.json").write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")  # a RecursionError once
    with pytest.raises(PackageError, match="JSON nested too deeply"):
        read_package(pkg)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_field_is_refused(pkg: Path, key: str) -> None:
    edit_json(pkg, lambda d: d.pop(key))
    with pytest.raises(PackageError, match=f"missing metadata field\\(s\\): {key}"):
        read_package(pkg)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.__setitem__("format", "other"), "'format' must be"),
    (lambda d: d.__setitem__("format_version", 99), "'format_version' 99 is not supported"),
    (lambda d: d["input"].__setitem__("tile", 60), "field 'input' is invalid: input.tile must be a positive multiple"),
    (lambda d: d["input"].__setitem__("scale", 2.0), "field 'input' is invalid: input.scale must be in"),
    (lambda d: d["postprocess"].__setitem__("pixel_threshold", 1.5), "field 'postprocess' is invalid"),
    (lambda d: d["files"].pop("model.bin"), "field 'files' must list model.xml and model.bin"),
    # shapes no exporter writes: once an AttributeError out of the loader instead of a PackageError
    (lambda d: d.__setitem__("postprocess", [0.5, 16]), r"field\(s\) 'postprocess' \(a list\) must be JSON objects"),
    (lambda d: d.update(input="gray", extra=3), r"'input' \(a str\), 'extra' \(a int\) must be JSON objects"),
])
def test_invalid_field_is_refused(pkg: Path, change: Callable[[dict[str, Any]], None], message: str) -> None:
    edit_json(pkg, change)
    with pytest.raises(PackageError, match=message):
        read_package(pkg)


def test_listed_file_missing_is_refused(pkg: Path) -> None:
    (pkg / "model.bin").unlink()
    with pytest.raises(PackageError, match=r"model\.bin: listed in package\.json but missing"):
        read_package(pkg)


@pytest.mark.parametrize(("change", "want"), [
    (lambda d: d["input"].__setitem__("tile", 128), r"\[1, 1, 128, 128\]"),
    (lambda d: d["input"].update(color="bgr", mean=[0, 0, 0], std=[1, 1, 1]), r"\[1, 3, 64, 64\]"),
])
def test_input_shape_inconsistent_with_package_json(pkg: Path, change: Callable[[dict[str, Any]], None],
                                                     want: str) -> None:
    """package.json is self-consistent, but the IR expects another input: refused at load."""
    edit_json(pkg, change)
    read_package(pkg)  # the metadata alone is fine
    with pytest.raises(PackageError, match=r"model\.xml: input shape \[1,1,64,64\] does not match package\.json input " + want):
        Inferencer(pkg)


def test_scaled_package_maps_defects_in_frame_pixels(tmp_path: Path) -> None:
    """A package with input.scale 0.5 runs on half-size tiles but reports frame-size maps and regions."""
    pkg = make_tiny_package(tmp_path / "half", scale=0.5, min_area=4)
    frame = np.full((200, 300), 200, np.uint8)
    frame[120:132, 40:52] = 20  # a 12x12 px dark spot -> 6x6 at model scale
    inf = Inferencer(pkg, num_requests=1)
    prob = inf.predict(frame)
    assert prob.shape == (200, 300)
    det = inf.inspect(frame)
    assert len(det.regions) == 1
    x, y, w, h = det.regions[0].bbox
    assert abs(x - 40) <= 2 and abs(y - 120) <= 2 and 10 <= w <= 14 and 10 <= h <= 14
