"""Frame sources: camera/video (OpenCV), hot folder, synthetic parts. `make_source` picks one by config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge.config import (
    CameraSourceConfig,
    FolderSourceConfig,
    SyntheticSourceConfig,
    VideoSourceConfig,
)
from edge.contract import InputSpec
from edge.sources.base import Frame, FrameSource, SourceError, check_frame, parse_trigger
from edge.sources.camera import CameraSource
from edge.sources.folder import FolderSource
from edge.sources.synthetic import SyntheticSource

__all__ = [
    "CameraSource",
    "FolderSource",
    "Frame",
    "FrameSource",
    "SourceError",
    "SyntheticSource",
    "check_frame",
    "make_source",
    "parse_trigger",
]


def make_source(
    cfg: CameraSourceConfig | VideoSourceConfig | FolderSourceConfig | SyntheticSourceConfig,
    state_dir: Path | None = None,
    model_spec: Callable[[], InputSpec] | None = None,
) -> FrameSource:
    """The source for a `source:` config section (not opened yet). A folder keeps its crash counter
    in `state_dir` and sizes its memory check with `model_spec` (the current model's input)."""
    if isinstance(cfg, CameraSourceConfig | VideoSourceConfig):
        return CameraSource(cfg)
    if isinstance(cfg, FolderSourceConfig):
        return FolderSource(cfg, state_dir=state_dir, model_spec=model_spec)
    return SyntheticSource(cfg)
