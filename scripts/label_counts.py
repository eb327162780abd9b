"""Label pixels and defect components per category: at full resolution, after downsampling to the
model's resolution, and after an augmentation warp. Which small defects lose their training target?

    python scripts/label_counts.py --data DIR [--config CFG] [--warps N] [--seed S]

Two target recipes, side by side (issue 15):
- `scale_mask`: today's recipe, the mask downscaled by input.scale (a pixel is defect if >= half of
  it is, plus one rescued pixel per vanished component), then warped at model scale with
  nearest-neighbour masks (the augmentation before issue 15);
- `coarse_mask`: the views stem, the mask warped soft at full resolution (training.core.augment.binarise)
  and only then folded to blocks of s x s (edge.preprocess.coarse_mask).

A component "vanishes" when none of its pixels has a target pixel left; components a warp moves out of
the frame are counted apart (out of view), not as lost. The factor is 1 / input.scale of
the config (default 0.25 -> 4) for scale_mask and model.space_to_depth (or the same factor) for
coarse_mask. Each augmentation column applies the default strength's affine warp (always, p = 1:
the worst case; in training it fires on half the patches) `--warps` times per image.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.preprocess import coarse_mask, scale_image, scale_mask
from training.core.augment import A, affine, binarise
from training.core.data import load_dataset
from training.core.train_config import load_config
from training.core.train_utils import load_images

COLUMNS = ("images", "comps", "px", "old_px", "old_lost_down", "old_lost_aug", "new_px", "new_lost_down",
           "new_lost_aug", "out_of_view")


def _block_any(m: np.ndarray, s: int) -> np.ndarray:
    """Blocks of s x s touched by m (the footprint of a component at coarse resolution)."""
    h, w = m.shape
    m = np.pad(m, ((0, -h % s), (0, -w % s)))
    return m.reshape(m.shape[0] // s, s, m.shape[1] // s, s).max(axis=(1, 3))


def _warp(masks: list[np.ndarray], interpolation: int, seed: int) -> list[np.ndarray]:
    """The augmentation's affine warp (one draw for all masks of an image)."""
    image = np.zeros(masks[0].shape, np.uint8)
    out = A.Compose([affine(p=1.0, mask_interpolation=interpolation)], seed=seed)(image=image, masks=masks)
    return list(out["masks"])


def count_image(mask: np.ndarray, scale: float, factor: int, warps: int, seed: int) -> dict[str, int]:
    """The counts of one defective mask (see COLUMNS)."""
    m = (mask > 0).astype(np.uint8)
    n, labels = cv2.connectedComponents(m, connectivity=8)
    comps = [(labels == k).astype(np.uint8) for k in range(1, n)]
    row = dict.fromkeys(COLUMNS, 0)
    row.update(images=1, comps=len(comps), px=int(m.sum()))
    # today: downscale, then warp at model scale with nearest masks
    old = scale_mask(m, scale)
    old_k = [old & (scale_image(c.astype(np.float32), scale) > 0) for c in comps]
    row["old_px"] = int(old.sum())
    row["old_lost_down"] = sum(int(not t.any()) for t in old_k)
    # views stem: coarse target of the full-resolution mask
    new = coarse_mask(m, factor)
    new_k = [new & _block_any(c, factor) for c in comps]
    row["new_px"] = int(new.sum())
    row["new_lost_down"] = sum(int(not t.any()) for t in new_k)
    for w in range(warps):
        # a component the warp moves out of the frame is not lost to interpolation: not counted
        soft = _warp([m.astype(np.float32)] + [c.astype(np.float32) for c in comps], cv2.INTER_LINEAR, seed + w)
        in_view = [float(c.max()) > 0.25 for c in soft[1:]]
        warped_old = _warp(old_k, cv2.INTER_NEAREST, seed + w)  # the same draw (same seed)
        row["old_lost_aug"] += sum(int(v and not t.any()) for t, v in zip(warped_old, in_view, strict=True))
        whole = binarise(soft[0])
        target = coarse_mask(whole, factor)
        row["new_lost_aug"] += sum(int(v and not (target & _block_any(binarise(c) & whole, factor)).any())
                                   for c, v in zip(soft[1:], in_view, strict=True))
        row["out_of_view"] += sum(int(not v) for v in in_view)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (generic or MVTec layout)")
    ap.add_argument("--config", help="training recipe: input.scale and model.space_to_depth (default 0.25 / 4)")
    ap.add_argument("--warps", type=int, default=2, help="affine warps per image for the augmentation columns")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scale, factor = 0.25, 4
    if args.config:
        cfg = load_config(args.config)
        if cfg.input.scale < 1.0:
            scale = cfg.input.scale
            factor = cfg.model.space_to_depth if cfg.model.space_to_depth > 1 else round(1 / scale)
        elif cfg.model.space_to_depth > 1:
            factor = cfg.model.space_to_depth
            scale = 1.0 / factor
    samples = [s for s in load_dataset(args.data).samples if s.mask_path is not None]
    _, masks = load_images(samples, "gray")
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for i, (s, m) in enumerate(zip(samples, masks, strict=True)):
        if not m.any():
            continue
        row = count_image(m, scale, factor, args.warps, args.seed + 1000 * i)
        for key in (s.category, "all"):
            for c in COLUMNS:
                totals[key][c] += row[c]
    print(f"scale_mask at scale {scale} (then nearest warp) vs coarse_mask at factor {factor} "
          f"(after a soft warp); lost = components without any target pixel; "
          f"aug columns over {args.warps} warp(s) per image, so out of {args.warps} x comps\n")
    print("| category | images | components | label px | scale_mask px | lost (down) | lost (aug) "
          "| coarse_mask px | lost (down) | lost (aug) | out of view (aug) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(totals, key=lambda k: (k == "all", k)):
        t = totals[key]
        print(f"| {key} | " + " | ".join(str(t[c]) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
