"""One tiled prediction for every back end: preprocess -> infer the tiles -> stitch -> part score.

The daemon (OpenVINO, edge.inference), validation and calibration (torch, training.core.predict), the
export's accuracy gate and quantization (OpenVINO on an in-memory graph, training.release.quantize) all
predict a whole frame through `predict_frame`, so the tiling, padding, blending and the frame's part
score are one rule. A back end only turns N raw tiles into N maps (and N tile part probabilities).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edge.contract import InputSpec
from edge.postprocess import part_score
from edge.preprocess import CoarseMap, blend_tiles, preprocess


class TileBackend(Protocol):
    """What a model must do for `predict_frame`: N x C x T x T raw tiles -> (N x t x t probabilities,
    N part probabilities or None without a part output); t = T, or T / output_stride for a coarse map."""

    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def predict_frame(backend: TileBackend, frame: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, float | None]:
    """Frame -> (full-resolution HxW probability map, part score or None); NonFiniteError for a NaN
    part output (edge.postprocess.part_score)."""
    prob, part = predict_coarse(backend, frame, spec)
    return prob.full(), part


def predict_coarse(backend: TileBackend, frame: np.ndarray, spec: InputSpec) -> tuple[CoarseMap, float | None]:
    """`predict_frame` before the final resize: the blended map at output resolution, for
    edge.postprocess.postprocess_map, which judges it without building the full map."""
    tiles, layout = preprocess(frame, spec)
    maps, parts = backend.infer_tiles_parts(tiles)
    return blend_tiles(maps, layout, spec.overlap), None if parts is None else part_score(parts)
