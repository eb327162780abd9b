"""Will one frame fit in the service's memory? Asked before a file is decoded.

The unit runs under a cgroup memory limit (deploy/: MemoryMax=1G). A frame inside
`source.max_pixels` (40 MP by default) can still need far more than is left: decoding and
inspecting it allocates the decoded image plus several float32 maps per pixel. The kernel's
answer would be an OOM kill, a restart, and the same file again. So the folder source
estimates the cost (`inspection_bytes`), reads the limit and current use of the cgroup
(`read_budget`) and refuses the file with an `error` verdict, with the numbers, when it would
not fit. A file that still kills the daemon is caught by the crash counter (edge.sources.crashes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge.contract import InputSpec
from edge.preprocess import plan_tiles, scaled_size

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_ROOT_ENV = "EDGE_CGROUP_ROOT"  # where the cgroup fs is mounted (tests point it at a fake tree)
_UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a huge number near 2**63
MiB = 1 << 20


@dataclass(frozen=True)
class MemoryBudget:
    """The tightest cgroup memory limit over this process's cgroup and its ancestors."""

    limit: int  # bytes
    usage: int  # bytes in use, minus the reclaimable file cache (what `docker stats` calls the working set)
    source: str  # the limit file read, for messages

    @property
    def free(self) -> int:
        return self.limit - self.usage


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file(stat: Path, key: str) -> int:
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    return 0


def _own_paths(self_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup path in the v2 hierarchy and in the v1 memory hierarchy ('/' if unknown)."""
    v2 = v1 = "/"
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2] or "/"
        elif "memory" in parts[1].split(","):
            v1 = parts[2] or "/"
    return v2, v1


def _dirs(base: Path, rel: str) -> list[Path]:
    """base/rel and each of its ancestors up to base (a parent slice may have the tighter limit)."""
    out, d = [], base / rel.strip("/")
    while True:
        out.append(d)
        if d == base or base not in d.parents:
            return out
        d = d.parent


def read_budget(root: Path | None = None, self_cgroup: Path = Path("/proc/self/cgroup")) -> MemoryBudget | None:
    """The cgroup memory limit that applies to this process and its current use; None if unlimited.

    cgroup v2: memory.max / memory.current (minus inactive_file of memory.stat); cgroup v1:
    memory/memory.limit_in_bytes / memory.usage_in_bytes (minus total_inactive_file).
    `root` defaults to $EDGE_CGROUP_ROOT or /sys/fs/cgroup.
    """
    root = root if root is not None else Path(os.environ.get(CGROUP_ROOT_ENV) or CGROUP_ROOT)
    v2, v1 = _own_paths(self_cgroup)
    layouts = ((_dirs(root, v2), "memory.max", "memory.current", "inactive_file"),
               (_dirs(root / "memory", v1), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    best: MemoryBudget | None = None
    for dirs, limit_name, usage_name, cache_key in layouts:
        for d in dirs:
            limit, usage = _read_int(d / limit_name), _read_int(d / usage_name)
            if limit is None or limit >= _UNLIMITED or usage is None:
                continue
            usage = max(0, usage - _inactive_file(d / "memory.stat", cache_key))
            budget = MemoryBudget(limit, usage, str(d / limit_name))
            if best is None or budget.free < best.free:
                best = budget
    return best


def inspection_bytes(width: int, height: int, spec: InputSpec, decoded_bytes_per_pixel: float = 3.0) -> int:
    """Upper estimate of the memory one frame costs from decoding to its event (edge.preprocess,
    edge.inference, edge.postprocess, edge.evidence), everything counted as alive at once."""
    px = width * height
    mh, mw = scaled_size(height, width, spec.scale)
    layout = plan_tiles(mh, mw, spec)
    tile_px = len(layout.origins) * spec.tile**2  # overlapping tiles cover more than the frame
    model_px = layout.padded_height * layout.padded_width
    decoded = int(px * decoded_bytes_per_pixel)  # the frame as decoded (kept for evidence)
    model_input = 2 * model_px * spec.channels  # colour conversion + scaled/padded copy, uint8
    tiles = tile_px * spec.channels * 4  # float32 network input, N x C x tile x tile
    outputs = tile_px * 4  # float32 network output per tile
    blend = 2 * model_px * 4 + px * 4  # float32 accumulator and weight sum, then the map at frame size
    post = px * (1 + 1 + 2 + 4 + 2)  # threshold bool, mask, two morphology results, int32 labels, kept mask
    evidence = px * (3 + 1 + 3)  # BGR overlay, mask image, encoded file (at most raw size)
    return decoded + model_input + tiles + outputs + blend + post + evidence


def refusal(width: int, height: int, cost: int, budget: MemoryBudget | None, reserve: int) -> str | None:
    """Why a frame of this cost must not be decoded (None: it fits, or there is no limit)."""
    if budget is None or cost <= budget.free - reserve:
        return None
    return (f"inspecting a {width}x{height} frame needs about {cost / MiB:.0f} MiB, but only "
            f"{max(0, budget.free) / MiB:.0f} MiB of the service's {budget.limit / MiB:.0f} MiB memory limit "
            f"are free ({budget.source}) and source.memory_reserve_mb={reserve / MiB:.0f} must stay free")
