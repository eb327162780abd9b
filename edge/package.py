"""Read and verify a model package folder without OpenVINO or torch.

A package is a folder written by `python -m training export`:

    MODEL_DIR/package.json        metadata (edge.contract.PackageMeta), incl. SHA-256 of every file
    MODEL_DIR/model.xml + .bin    the deployable IR (INT8 by default)
    MODEL_DIR/fp32/model.xml+.bin the FP32 IR kept for comparison (optional)

The daemon refuses a package that is missing, inconsistent or corrupted, with a message that
names the file and the problem, before it touches the camera.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edge.contract import (
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    PACKAGE_JSON,
    InputSpec,
    PackageMeta,
    PostprocessParams,
)
from edge.text import loads_untrusted

REQUIRED_KEYS = ("name", "version", "created", "precision", "input", "postprocess", "files")


class PackageError(ValueError):
    """The model package cannot be used; the message says which file and what is wrong."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_hash(meta: PackageMeta) -> str:
    """One short identity of the package: the hash of the deployable weights."""
    return meta.files.get("model.bin", "")


def content_hash(model_dir: str | Path) -> str:
    """The identity of the whole package: SHA-256 of its package.json, which lists the SHA-256 of
    every file and holds the calibrated thresholds (the bytes a package signature signs). Two
    packages with the same weights but other thresholds differ here, not in package_hash."""
    return sha256_file(Path(model_dir) / PACKAGE_JSON)


def parse_meta(data: dict[str, Any], where: str) -> PackageMeta:
    """Validate the metadata dict; errors name the field."""
    if data.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{where}: 'format' must be {PACKAGE_FORMAT!r}, got {data.get('format')!r}")
    if data.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(
            f"{where}: 'format_version' {data.get('format_version')!r} is not supported "
            f"(this daemon reads version {PACKAGE_FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise PackageError(f"{where}: missing metadata field(s): {', '.join(missing)}")
    shapes = {k: type(data[k]).__name__ for k in ("input", "postprocess") if not isinstance(data[k], dict)}
    shapes |= {k: type(data[k]).__name__ for k in ("metrics", "tools", "extra")
               if data.get(k) is not None and not isinstance(data[k], dict)}
    if shapes:
        raise PackageError(f"{where}: field(s) {', '.join(f'{k!r} (a {t})' for k, t in shapes.items())} "
                           "must be JSON objects")
    try:
        spec = InputSpec.from_dict(data["input"])
    except (TypeError, ValueError) as e:
        raise PackageError(f"{where}: field 'input' is invalid: {e}") from e
    try:
        post = PostprocessParams.from_dict(data["postprocess"])
    except (TypeError, ValueError) as e:
        raise PackageError(f"{where}: field 'postprocess' is invalid: {e}") from e
    files = data["files"]
    if not isinstance(files, dict) or "model.xml" not in files or "model.bin" not in files:
        raise PackageError(f"{where}: field 'files' must list model.xml and model.bin with their SHA-256")
    return PackageMeta(
        name=str(data["name"]),
        version=str(data["version"]),
        created=str(data["created"]),
        precision=str(data["precision"]),
        input=spec,
        postprocess=post,
        files={str(k): str(v) for k, v in files.items()},
        metrics=data.get("metrics", {}) or {},
        data_fingerprint=str(data.get("data_fingerprint", "")),
        tools=data.get("tools", {}) or {},
        extra=data.get("extra", {}) or {},
    )


def confined(root: Path, rel: str, meta_path: Path) -> Path:
    """root/rel, refused unless it stays inside the package (no absolute path, '..' or symlink out)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise PackageError(f"{meta_path}: file name {rel!r} in 'files' must be a relative path inside the package "
                           "(no absolute path, no '..')")
    path = root / rel
    try:
        path.resolve(strict=False).relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        raise PackageError(f"{path}: resolves to {path.resolve(strict=False)}, outside the package {root} "
                           "(a symlink must not leave the package)") from None
    return path


def _json_object(meta_path: Path) -> dict[str, Any]:
    try:
        data = loads_untrusted(meta_path.read_bytes())
    except OSError as e:
        raise PackageError(f"{meta_path}: cannot read: {e}") from e
    except ValueError as e:  # not UTF-8, not JSON, or nested too deeply
        raise PackageError(f"{meta_path}: {e}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{meta_path}: expected a JSON object")
    return data


def read_package(model_dir: str | Path, verify_hashes: bool = True) -> PackageMeta:
    """Load `package.json`, check every listed file exists, hashes match and the XML parses."""
    root = Path(model_dir)
    if not root.is_dir():
        raise PackageError(f"model package {root} is not a folder")
    meta_path = root / PACKAGE_JSON
    if not meta_path.is_file():
        raise PackageError(f"{meta_path}: missing (is {root} a model package made by 'training export'?)")
    confined(root, PACKAGE_JSON, meta_path)
    meta = parse_meta(_json_object(meta_path), str(meta_path))
    for rel, expected in meta.files.items():
        path = confined(root, rel, meta_path)
        if not path.is_file():
            raise PackageError(f"{path}: listed in package.json but missing")
        if verify_hashes:
            actual = sha256_file(path)
            if actual != expected:
                raise PackageError(
                    f"{path}: SHA-256 mismatch (file is corrupted, truncated or replaced): "
                    f"expected {expected[:16]}..., got {actual[:16]}..."
                )
    for rel in meta.files:
        if rel.endswith(".xml"):
            try:
                ET.parse(root / rel)
            except ET.ParseError as e:
                raise PackageError(f"{root / rel}: not a valid IR XML file: {e}") from e
    return meta


def write_package_json(model_dir: str | Path, meta: PackageMeta) -> Path:
    """Write package.json atomically (tmp + rename) so a crash never leaves half a file."""
    root = Path(model_dir)
    path = root / PACKAGE_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
