"""Torch inference of one full image through the edge's own pre/postprocessing.

Validation, calibration and the export accuracy gate all predict through here, and a whole
image goes through edge.tiled.predict_frame - the daemon's own tiling, padding and blending -
so a model is judged exactly as the daemon will run it. A model with a decision head also gives one part probability per
tile; the image's part score is `edge.postprocess.part_score` of them, as on the line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge.contract import InputSpec
from edge.tiled import predict_frame


def _split(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode output -> (logits map, part logits or None); see training/core/unet.py."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


@torch.no_grad()
def predict_tiles_part(model: torch.nn.Module, tiles: np.ndarray, batch: int = 8,
                       tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """N x C x T x T raw tiles -> (N x T x T probabilities, N part probabilities or None).

    `tta` averages maps and part probabilities over flips."""
    out: np.ndarray | None = None  # N x t x t: t = the tile side, or tile / s for a coarse-output model
    parts: np.ndarray | None = None
    flips: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1)) if tta else ((),)
    for i in range(0, tiles.shape[0], batch):
        x = torch.from_numpy(tiles[i : i + batch])
        p: torch.Tensor | None = None
        q: torch.Tensor | None = None
        for dims in flips:
            logits, part = _split(model(torch.flip(x, dims) if dims else x))
            pf = torch.sigmoid(logits)
            pf = torch.flip(pf, dims) if dims else pf
            p = pf if p is None else p + pf
            if part is not None:
                q = torch.sigmoid(part).reshape(-1) + (0 if q is None else q)
        assert p is not None
        if out is None:
            out = np.empty((tiles.shape[0], *p.shape[-2:]), dtype=np.float32)
        out[i : i + batch] = (p / len(flips))[:, 0].numpy()
        if q is not None:
            if parts is None:
                parts = np.empty(tiles.shape[0], dtype=np.float32)
            parts[i : i + batch] = (q / len(flips)).numpy()
    assert out is not None, "no tiles"
    return out, parts


def predict_tiles(model: torch.nn.Module, tiles: np.ndarray, batch: int = 8, tta: bool = False) -> np.ndarray:
    """N x C x T x T raw tiles -> N x T x T probabilities. `tta` averages over flips."""
    return predict_tiles_part(model, tiles, batch=batch, tta=tta)[0]


@dataclass(frozen=True)
class TorchTiles:
    """The torch back end of edge.tiled.predict_frame (model in eval mode)."""

    model: torch.nn.Module
    batch: int = 8
    tta: bool = False

    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return predict_tiles_part(self.model, tiles, batch=self.batch, tta=self.tta)


def predict_image_part(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, tta: bool = False,
                       batch: int = 8) -> tuple[np.ndarray, float | None]:
    """(HxW probability map, part score or None without a decision head) of one image (eval mode)."""
    return predict_frame(TorchTiles(model, batch, tta), image, spec)


def predict_image(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, tta: bool = False,
                  batch: int = 8) -> np.ndarray:
    """Full-resolution HxW probability map of one image (model must be in eval mode)."""
    return predict_image_part(model, image, spec, tta=tta, batch=batch)[0]
