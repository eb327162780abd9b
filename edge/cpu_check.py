"""Does this CPU compute the package as the export machine did? Checked at every model load.

Why: an INT8 package is judged by the export gate on the machine that exported it, but OpenVINO picks
its kernels per CPU (AVX2, AVX-512 VNNI, AMX). On an AMX Xeon the saved INT8 IR of the default
recipe's model computed its first layer wrongly: maps off by up to 0.99, part scores by 0.84, while
the same file was right on AVX-512 VNNI (issue 15, 2026-12-06). A line PC of another CPU generation
would have let defects through with nothing in the logs. So the export puts a few of its own tiles and
the FP32 reference outputs for them into the package (`cpu_check.npz`, hashed like every file), with
how far the shipped model was from that reference where it was validated; the daemon runs the same
tiles at load and compares. A model that is further off than the export allowed is not used: the
package's FP32 IR (which the gate's reference is) is loaded instead when it passes the same check,
else the load fails with the figures.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

CHECK_FILE = "cpu_check.npz"
MIN_MAP_TOLERANCE = 0.01  # mean |map - FP32 map|: a float model on any CPU is ~1e-6 off, INT8 ~0.004
MIN_PART_TOLERANCE = 0.05  # max |part - FP32 part|


class TileModel(Protocol):
    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class CpuCheck:
    """How far this CPU's outputs are from the FP32 reference, against what the export allowed."""

    map_mean_diff: float
    map_tolerance: float
    part_max_diff: float | None
    part_tolerance: float | None
    export_map_mean_diff: float
    tiles: int

    @property
    def passed(self) -> bool:
        part_ok = self.part_max_diff is None or self.part_tolerance is None or self.part_max_diff <= self.part_tolerance
        return bool(self.map_mean_diff <= self.map_tolerance and part_ok)

    def describe(self) -> str:
        part = "" if self.part_max_diff is None else (
            f", part scores up to {self.part_max_diff:.3f} off (allowed {self.part_tolerance:.3f})")
        return (f"on {self.tiles} check tiles the map is {self.map_mean_diff:.4f} off the FP32 reference on average "
                f"(allowed {self.map_tolerance:.4f}; {self.export_map_mean_diff:.4f} where it was exported){part}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tiles": self.tiles, "map_mean_diff": round(self.map_mean_diff, 6),
                "map_tolerance": round(self.map_tolerance, 6), "export_map_mean_diff": round(self.export_map_mean_diff, 6),
                "part_max_diff": None if self.part_max_diff is None else round(self.part_max_diff, 6),
                "part_tolerance": None if self.part_tolerance is None else round(self.part_tolerance, 6)}


def deviation(model: TileModel, tiles: np.ndarray, map_ref: np.ndarray,
              part_ref: np.ndarray | None) -> tuple[float, float | None]:
    """(mean |map - reference| over every pixel of every tile, max |part - reference| or None)."""
    maps, parts = model.infer_tiles_parts(tiles.astype(np.float32))
    map_diff = float(np.mean(np.abs(maps.reshape(map_ref.shape).astype(np.float32) - map_ref.astype(np.float32))))
    if part_ref is None or part_ref.size == 0 or parts is None:
        return map_diff, None
    return map_diff, float(np.max(np.abs(parts.reshape(-1) - part_ref.reshape(-1))))


def tolerances(map_diff: float, part_diff: float | None) -> tuple[float, float | None]:
    """What another CPU may deviate, from what the validated model deviated: 3x the map's mean
    difference and 2x the largest part-score difference, never below the floors above (a broken
    kernel moves the map ~10x more than INT8 rounding does)."""
    part_tol = None if part_diff is None else max(MIN_PART_TOLERANCE, 2.0 * part_diff)
    return max(MIN_MAP_TOLERANCE, 3.0 * map_diff), part_tol


def write_check(path: Path, tiles: np.ndarray, map_ref: np.ndarray, part_ref: np.ndarray | None,
                shipped: TileModel) -> CpuCheck:
    """Write the package's check file: tiles (uint8), the FP32 reference and the tolerances that follow
    from how far `shipped` (the package's model as the daemon runs it, here) is from it."""
    map_diff, part_diff = deviation(shipped, tiles, map_ref, part_ref)
    map_tol, part_tol = tolerances(map_diff, part_diff)
    np.savez_compressed(path, tiles=tiles.astype(np.uint8), map_ref=map_ref.astype(np.float16),
                        part_ref=np.zeros(0, np.float32) if part_ref is None else part_ref.astype(np.float32).reshape(-1),
                        map_tolerance=np.float32(map_tol), part_tolerance=np.float32(-1 if part_tol is None else part_tol),
                        export_map_mean_diff=np.float32(map_diff))
    return CpuCheck(map_diff, map_tol, part_diff, part_tol, map_diff, len(tiles))


def run_check(model_dir: Path, model: TileModel) -> CpuCheck | None:
    """Run the package's check tiles on `model`; None when the package carries no check file (older
    exports). The file's hash was verified with the package; a malformed one raises ValueError."""
    path = Path(model_dir) / CHECK_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            tiles, map_ref, part_ref = z["tiles"], z["map_ref"], z["part_ref"]
            map_tol, part_tol, export_diff = float(z["map_tolerance"]), float(z["part_tolerance"]), float(z["export_map_mean_diff"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable check file ({e})") from e
    if tiles.ndim != 4 or tiles.dtype != np.uint8 or len(tiles) == 0 or len(map_ref) != len(tiles):
        raise ValueError(f"{path}: expected N x C x T x T uint8 tiles and N reference maps, "
                         f"got {tiles.dtype} {tiles.shape} and {map_ref.shape}")
    map_diff, part_diff = deviation(model, tiles, map_ref, part_ref if part_ref.size else None)
    return CpuCheck(map_diff, map_tol, part_diff, None if part_tol < 0 else part_tol, export_diff, len(tiles))


def warn_if_off(model_dir: Path, model: TileModel, ir: str) -> CpuCheck | None:
    """For tools that run a package outside the daemon (`edge inspect`, `training evaluate`): their
    figures are this CPU's, so say on stderr when it computes `ir` differently than the export did."""
    check = run_check(model_dir, model)
    if check is not None and not check.passed:
        print(f"WARNING: {Path(model_dir) / ir} computes differently on this CPU than where it was exported: "
              f"{check.describe()}; the daemon would run fp32/model.xml instead", file=sys.stderr)
    return check
