"""Types shared by training, export and the daemon, with no heavy imports.

The model package metadata is the single source of truth for how a frame becomes a
model input and how the model output becomes a verdict. Training writes it (through
export), the daemon reads it; neither hand-copies settings from the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PACKAGE_FORMAT = "defect-inspection-package"
PACKAGE_FORMAT_VERSION = 1
PACKAGE_JSON = "package.json"

ColorMode = Literal["gray", "bgr"]
Verdict = Literal["pass", "fail", "error"]


class NonFiniteError(ValueError):
    """The model produced NaN or infinite values. `prob >= threshold` is False for NaN, so
    without this check such a model would pass every part: the part gets `error` instead."""


@dataclass(frozen=True)
class InputSpec:
    """How a frame becomes model input tiles (see edge.preprocess for the contract).

    The network normalises inside its own graph, so the daemon feeds raw pixel values
    (float32, 0..255); `mean`/`std` are recorded here for information and checks.
    `scale` < 1 resizes the frame before tiling (the network then sees more of the part per
    tile, at the cost of fine detail); the probability map is resized back to the frame, so
    regions and areas are always in frame pixels. `tile` and `overlap` count model pixels.
    """

    color: ColorMode = "gray"
    tile: int = 256  # square tile side fed to the network (static input shape)
    overlap: int = 32  # pixels shared by neighbouring tiles; predictions are blended there
    scale: float = 1.0  # frame -> model resolution factor, in (0, 1]
    multiple_of: int = 16  # network stride: tile must be divisible by it
    output_stride: int = 1  # the map comes out at tile / output_stride; the edge resizes it to the frame
    mean: tuple[float, ...] = (127.5,)
    std: tuple[float, ...] = (64.0,)
    layout: str = "NCHW"

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def validate(self) -> None:
        if self.color not in ("gray", "bgr"):
            raise ValueError(f"input.color must be 'gray' or 'bgr', got {self.color!r}")
        if self.tile <= 0 or self.tile % self.multiple_of:
            raise ValueError(f"input.tile must be a positive multiple of {self.multiple_of}, got {self.tile}")
        if not 0 <= self.overlap < self.tile // 2:
            raise ValueError(f"input.overlap must be in [0, tile/2), got {self.overlap}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"input.mean/std need {self.channels} value(s) for color {self.color!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError("input.std values must be > 0")
        if not 0.05 <= self.scale <= 1.0:
            raise ValueError(f"input.scale must be in [0.05, 1], got {self.scale}")
        if self.output_stride < 1 or self.tile % self.output_stride or self.overlap % self.output_stride:
            raise ValueError(f"output_stride must be >= 1 and divide tile ({self.tile}) and overlap "
                             f"({self.overlap}), got {self.output_stride}")

    @property
    def out_tile(self) -> int:
        """Side of the model's output map per tile."""
        return self.tile // self.output_stride

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["channels"] = self.channels
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        known = {k: d[k] for k in ("color", "tile", "overlap", "multiple_of", "layout", "output_stride") if k in d}
        spec = cls(mean=tuple(float(x) for x in d.get("mean", cls.mean)),  # absent: the class's default
                   std=tuple(float(x) for x in d.get("std", cls.std)),
                   scale=float(d.get("scale", cls.scale)), **known)
        spec.validate()
        return spec


@dataclass(frozen=True)
class PostprocessParams:
    """How a probability map becomes defect regions; calibrated in training, tunable at the edge."""

    pixel_threshold: float = 0.5
    min_area: int = 0  # pixels; smaller connected components are ignored (noise, texture)
    open_radius: int = 0  # morphological opening removes specks before counting regions
    close_radius: int = 1  # closing joins fragments of one defect into one region
    # Verdict threshold on the part score (max over tiles of the model's part output). None: the
    # model has no part output (older packages) and the verdict comes from the regions alone.
    part_threshold: float | None = None

    def validate(self) -> None:
        if not 0.0 < self.pixel_threshold < 1.0:
            raise ValueError(f"pixel_threshold must be in (0, 1), got {self.pixel_threshold}")
        if self.min_area < 0 or self.open_radius < 0 or self.close_radius < 0:
            raise ValueError("min_area, open_radius and close_radius must be >= 0")
        if self.part_threshold is not None and not 0.0 < self.part_threshold < 1.0:
            raise ValueError(f"part_threshold must be in (0, 1) or null, got {self.part_threshold}")

    def to_dict(self) -> dict[str, Any]:
        """Without `part_threshold` when it is None, so a package without a part output reads as before."""
        d = asdict(self)
        if d["part_threshold"] is None:
            del d["part_threshold"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PostprocessParams:
        p = cls(
            pixel_threshold=float(d.get("pixel_threshold", cls.pixel_threshold)),  # absent: the class's default
            min_area=int(d.get("min_area", cls.min_area)),
            open_radius=int(d.get("open_radius", cls.open_radius)),
            close_radius=int(d.get("close_radius", cls.close_radius)),
            part_threshold=None if d.get("part_threshold") is None else float(d["part_threshold"]),
        )
        p.validate()
        return p


@dataclass(frozen=True)
class Region:
    """One connected defect region in frame coordinates (pixels)."""

    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    centroid: tuple[float, float]  # x, y
    max_score: float
    mean_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "bbox": list(self.bbox),
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "max_score": round(self.max_score, 4),
            "mean_score": round(self.mean_score, 4),
        }


@dataclass
class Detection:
    """Postprocessing result of one image: regions, binary mask and a ranking score."""

    regions: list[Region]
    mask: Any  # np.ndarray uint8 HxW, 1 = defect (after morphology and area filter)
    score: float  # image-level defect score, >= pixel_threshold iff a region survived
    # The model's part decision (max over tiles of its part output) and the threshold it is judged
    # by; both None for a model without a part output (the verdict then comes from the regions).
    part_score: float | None = None
    part_threshold: float | None = None

    @property
    def total_area(self) -> int:
        return sum(r.area for r in self.regions)


@dataclass
class ModelInfo:
    """What an event records about the model that decided it."""

    name: str
    version: str
    sha256: str
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackageMeta:
    """Parsed `package.json` of a model package (see edge.package for checks)."""

    name: str
    version: str
    created: str
    precision: str
    input: InputSpec
    postprocess: PostprocessParams
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    tools: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "precision": self.precision,
            "input": self.input.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "files": dict(self.files),
            "metrics": self.metrics,
            "data_fingerprint": self.data_fingerprint,
            "tools": self.tools,
            **({"extra": self.extra} if self.extra else {}),
        }
