"""Torch inference of one full image through the edge's own pre/postprocessing.

Validation, calibration and the export accuracy gate all predict through here, and the
tiling, padding and blending are edge.preprocess functions, so a model is judged exactly
as the daemon will run it.
"""

from __future__ import annotations

import numpy as np
import torch

from edge.contract import InputSpec
from edge.preprocess import preprocess, stitch


@torch.no_grad()
def predict_tiles(model: torch.nn.Module, tiles: np.ndarray, batch: int = 8, tta: bool = False) -> np.ndarray:
    """N x C x T x T raw tiles -> N x T x T probabilities. `tta` averages over flips."""
    out = np.empty((tiles.shape[0], tiles.shape[2], tiles.shape[3]), dtype=np.float32)
    for i in range(0, tiles.shape[0], batch):
        x = torch.from_numpy(tiles[i : i + batch])
        if tta:
            p = torch.zeros_like(x[:, :1])
            for dims in ((), (-1,), (-2,), (-2, -1)):
                xf = torch.flip(x, dims) if dims else x
                pf = torch.sigmoid(model(xf))
                p += torch.flip(pf, dims) if dims else pf
            p /= 4
        else:
            p = torch.sigmoid(model(x))
        out[i : i + batch] = p[:, 0].numpy()
    return out


def predict_image(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, tta: bool = False,
                  batch: int = 8) -> np.ndarray:
    """Full-resolution HxW probability map of one image (model must be in eval mode)."""
    tiles, layout = preprocess(image, spec)
    return stitch(predict_tiles(model, tiles, batch=batch, tta=tta), layout, spec.overlap)
