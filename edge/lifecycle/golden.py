"""The station's golden set: reference parts with known verdicts, kept in the state dir.

    <state_dir>/golden/manifest.json    {"format": "edge-golden", "version": 1, "samples": [...]}
    <state_dir>/golden/<id><ext>        the image of each sample, copied in at `golden add`

A sample is {"id", "file", "expected": "pass"|"fail", "sha256", "added", "note"}. The daemon runs
the set through every model it is about to trust (edge.lifecycle.selftest); a plant keeps e.g. five good and
five defective parts, some borderline, so a drifting margin shows before a verdict flips.

Every write is atomic (tmp + fsync + rename, image before manifest on add, manifest before image
on remove), so a crash leaves the old set or the new one, never a manifest naming a missing file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.image_decode import ImageDecodeError, read_image_file
from edge.package import sha256_file

GOLDEN_DIR = "golden"
MANIFEST = "manifest.json"
FORMAT, VERSION = "edge-golden", 1
EXPECTED = ("pass", "fail")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")


class GoldenError(ValueError):
    """The golden set or a sample cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Sample:
    id: str
    file: str
    expected: str
    sha256: str
    added: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def golden_dir(state_dir: Path) -> Path:
    return Path(state_dir) / GOLDEN_DIR


def load_samples(state_dir: Path) -> list[Sample]:
    """The set in manifest order; [] when there is none. GoldenError names what is wrong."""
    path = golden_dir(state_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GoldenError(f"{path}: unreadable golden manifest: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise GoldenError(f"{path}: expected {{\"format\": {FORMAT!r}, \"version\": {VERSION}, \"samples\": [...]}}")
    raw = data.get("samples")
    if not isinstance(raw, list):
        raise GoldenError(f"{path}: 'samples' must be a list")
    samples = []
    for i, s in enumerate(raw):
        try:
            sample = Sample(id=str(s["id"]), file=str(s["file"]), expected=str(s["expected"]),
                            sha256=str(s["sha256"]), added=float(s["added"]), note=str(s.get("note", "")))
        except (TypeError, KeyError, ValueError) as e:
            raise GoldenError(f"{path}: samples[{i}]: missing or invalid field {e}") from None
        if sample.expected not in EXPECTED or not ID_RE.match(sample.id) or Path(sample.file).name != sample.file:
            raise GoldenError(f"{path}: samples[{i}] ({sample.id!r}): expected must be pass or fail, the id "
                              "plain, the file a name inside the golden folder")
        samples.append(sample)
    return samples


def read_image(state_dir: Path, sample: Sample) -> np.ndarray:
    """The sample's image, checked against the hash taken at `golden add` (a replaced reference
    part would make the self-test prove nothing)."""
    path = golden_dir(state_dir) / sample.file
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise GoldenError(f"{path}: golden sample {sample.id!r} unreadable: {e}") from None
    if actual != sample.sha256:
        raise GoldenError(f"{path}: golden sample {sample.id!r} changed since it was added (SHA-256 mismatch)")
    return decode_image(path)


def decode_image(path: Path) -> np.ndarray:
    """Decoded as the folder source decodes part files (unchanged depth and channels)."""
    try:
        return read_image_file(path)
    except ImageDecodeError as e:
        raise GoldenError(f"{path}: {e}") from None


def add_sample(state_dir: Path, image: Path, expected: str, sample_id: str | None = None,
               note: str = "") -> Sample:
    """Copy `image` into the set with its expected verdict; refuses duplicates and unreadable files."""
    if expected not in EXPECTED:
        raise GoldenError(f"expected verdict must be one of {EXPECTED}, got {expected!r}")
    image = Path(image)
    ext = image.suffix.lower()
    if ext not in IMAGE_EXTS:
        raise GoldenError(f"{image}: file name must end in one of {', '.join(IMAGE_EXTS)}")
    decode_image(image)
    sample_id = sample_id or image.stem
    if not ID_RE.match(sample_id):
        raise GoldenError(f"sample id {sample_id!r}: use letters, digits, '_', '.', '-' (max 64), "
                          "or pass --id")
    samples = load_samples(state_dir)
    if any(s.id == sample_id for s in samples):
        raise GoldenError(f"golden sample {sample_id!r} exists; remove it first or pass another --id")
    folder = golden_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{sample_id}{ext}"
    _atomic_write(dest, image.read_bytes())
    sample = Sample(sample_id, dest.name, expected, sha256_file(dest), round(time.time(), 3), note)
    _write_manifest(state_dir, [*samples, sample])
    return sample


def remove_sample(state_dir: Path, sample_id: str) -> Sample:
    samples = load_samples(state_dir)
    found = [s for s in samples if s.id == sample_id]
    if not found:
        raise GoldenError(f"no golden sample {sample_id!r} in {golden_dir(state_dir) / MANIFEST}")
    _write_manifest(state_dir, [s for s in samples if s.id != sample_id])
    with contextlib.suppress(FileNotFoundError):
        (golden_dir(state_dir) / found[0].file).unlink()
    return found[0]


def _write_manifest(state_dir: Path, samples: list[Sample]) -> None:
    body = {"format": FORMAT, "version": VERSION, "samples": [s.to_dict() for s in samples]}
    _atomic_write(golden_dir(state_dir) / MANIFEST, (json.dumps(body, indent=2) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync of the folder: the old file or the new one after a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
