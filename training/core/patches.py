"""Training patches cut at model resolution from images held in memory.

Why patches and not whole images: parts come in any size, defects are a few pixels wide, and
squeezing a 600 px part into a fixed input would erase a 10 px blowhole. The trainer hands over
images at the package's `input.scale` (1 = frame pixels; edge.preprocess resizes frames the same
way), and cutting P x P patches (P a multiple of the network stride) keeps the pixels as the edge
sees them and lets us choose *what* the network looks at:

- defect patches: centred on a random pixel of a random defect component, shifted by a random
  offset so the defect is not always in the middle (the network must not learn "centre = bad");
- hard negatives: good surface where the current model fires falsely. The trainer mines them
  each epoch (`mine_hard_negatives`) and hands them over with `set_hard_negatives`; until the
  first mining, or without good images, these slots fall back to random good patches;
- random patches anywhere, so the plain background keeps its true frequency.

Hard positives: a share (`hard_positive_fraction`) of the defect patches is centred on defect
components the current model misses (peak probability < 0.5), mined each epoch on a bounded
number of defective images (`mine_hard_positives`), so the small blowholes that a random
component draw rarely shows get shown until they are found.

Pasted defects: a share (`paste_fraction`) of the defect patches is a random good patch with a
small defect component of another training image pasted in (training/core/paste.py), so each
defect is also seen on surfaces other than its own part's.

With a folding stem that trains on coarse targets (`target_stride` s > 1, the model's views stem),
patches are cut and augmented at input resolution and the target is made after augmentation with
edge.preprocess.coarse_mask: items are then C x P x P pixels and a 1 x P/s x P/s target.

Every image is reflect-padded on the bottom and right by P/2 (and at least to P x P), and
patches may reach into that margin. Why: edge.preprocess pads frames bottom/right by reflection
up to its tile grid, so at the edge a defect on a part's right or bottom border is followed by
mirrored surface. Patches clamped inside the image would only ever show such a defect against
the patch border (the convolutions' zero padding), and the network would meet mirrored
context for the first time on the line: a blowhole 5 px from the right border was missed that
way on Magnetic-Tile. Top/left borders need nothing: there the edge's first tile starts at the
frame border too.
Each patch goes through the joint augmentation of training.core.augment. Items are raw pixels:
float32 C x P x P in 0..255 (the model normalises inside its graph) and a float32 1 x P x P mask.

Determinism: the patches of an epoch depend only on (seed, epoch, rank, dataloader worker),
so a run is reproducible and DDP ranks / workers draw disjoint, non-repeating streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import IterableDataset, get_worker_info

from edge.preprocess import coarse_mask, pad_bottom_right
from training.core.augment import build_augmentation
from training.core.paste import cut_stamps, paste


@dataclass(frozen=True)
class HardNegative:
    """A location (in image coordinates) where the model predicted a defect on good surface."""

    image: int  # index into the dataset's image list
    y: int
    x: int
    score: float  # the false-positive probability there


@dataclass(frozen=True)
class HardPositive:
    """A defect component (index into PatchDataset.components[image]) the model misses."""

    image: int
    component: int
    score: float  # the model's peak probability on it (< the miss threshold)


def _pad_bottom_right(a: np.ndarray, margin: int, size: int) -> np.ndarray:
    """Reflect-pad by `margin` (> 0) below and to the right, and at least to size x size."""
    h, w = a.shape[:2]
    return pad_bottom_right(a, max(margin, size - h), max(margin, size - w))


class PatchDataset(IterableDataset):
    """An epoch = `patches_per_epoch` patches, split over DDP ranks and dataloader workers."""

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], patch_size: int,
                 patches_per_epoch: int, defect_fraction: float = 0.5, hard_negative_fraction: float = 0.25,
                 jitter: float = 0.35, augment: str = "default", seed: int = 0, rank: int = 0,
                 world_size: int = 1, target_stride: int = 1, hard_positive_fraction: float = 0.0,
                 paste_fraction: float = 0.0) -> None:
        if patch_size <= 0 or patch_size % 16:
            raise ValueError(f"patch size must be a positive multiple of 16, got {patch_size}")
        if target_stride < 1 or patch_size % target_stride:
            raise ValueError(f"target_stride must be >= 1 and divide the patch size {patch_size}, "
                             f"got {target_stride}")
        if not 0 <= hard_positive_fraction <= 1:
            raise ValueError(f"hard_positive_fraction must be in [0, 1], got {hard_positive_fraction}")
        if not 0 <= paste_fraction <= 1:
            raise ValueError(f"paste_fraction must be in [0, 1], got {paste_fraction}")
        if len(images) != len(masks) or not images:
            raise ValueError("need the same, non-zero number of images and masks")
        if defect_fraction < 0 or hard_negative_fraction < 0 or defect_fraction + hard_negative_fraction > 1:
            raise ValueError("defect_fraction and hard_negative_fraction must be >= 0 and sum to <= 1")
        if not 0 <= jitter <= 0.5:
            raise ValueError(f"jitter must be in [0, 0.5], got {jitter}")
        self.size = patch_size
        margin = patch_size // 2
        self.images = [_pad_bottom_right(im, margin, patch_size) for im in images]
        self.masks = [_pad_bottom_right(m, margin, patch_size) for m in masks]
        self.patches_per_epoch = patches_per_epoch
        self.defect_fraction = defect_fraction
        self.hard_negative_fraction = hard_negative_fraction
        self.jitter = jitter
        self.augment = augment
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.hard_negatives: list[HardNegative] = []
        self.target_stride = target_stride
        self.hard_positive_fraction = hard_positive_fraction
        self.hard_positives: list[HardPositive] = []
        self.good = [i for i, m in enumerate(masks) if not m.any()]
        # defect components per image: a random component first, then a pixel in it, so a small
        # blowhole next to a large break still gets its share of patches
        self.components: dict[int, list[np.ndarray]] = {}
        for i, m in enumerate(masks):
            if m.any():
                n, labels = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
                self.components[i] = [np.argwhere(labels == k) for k in range(1, n)]
        self.defective = sorted(self.components)
        self.paste_fraction = paste_fraction
        self.stamps = cut_stamps(images, masks, patch_size // 2) if paste_fraction > 0 and self.good else []

    # -------------------------------------------------------------------- trainer hooks

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new patches (like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def set_hard_negatives(self, entries: Sequence[HardNegative]) -> None:
        self.hard_negatives = list(entries)

    def set_hard_positives(self, entries: Sequence[HardPositive]) -> None:
        for h in entries:
            if h.image not in self.components or not 0 <= h.component < len(self.components[h.image]):
                raise ValueError(f"hard positive {h} names no defect component of this dataset")
        self.hard_positives = list(entries)

    def __len__(self) -> int:
        """Patches this rank yields per epoch (the same on every rank, so DDP steps stay in lockstep)."""
        return self.patches_per_epoch // self.world_size

    # -------------------------------------------------------------------- sampling

    def _crop_at(self, i: int, cy: float, cx: float, rng: np.random.Generator) -> tuple[int, int, int]:
        """Origin of a patch containing (cy, cx) at a random offset from the patch centre."""
        p = self.size
        h, w = self.masks[i].shape[:2]
        oy, ox = rng.uniform(-self.jitter, self.jitter, size=2) * p
        y0 = int(np.clip(round(cy - p / 2 + oy), 0, h - p))
        x0 = int(np.clip(round(cx - p / 2 + ox), 0, w - p))
        return i, y0, x0

    def _random_in(self, i: int, rng: np.random.Generator) -> tuple[int, int, int]:
        h, w = self.masks[i].shape[:2]
        return i, int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))

    def choose(self, rng: np.random.Generator) -> tuple[str, int, int, int]:
        """(kind, image index, y0, x0) of the next patch."""
        u = rng.random()
        if u < self.defect_fraction and self.defective:
            if self.stamps and rng.random() < self.paste_fraction:  # a defect on another part's good surface
                return ("paste", *self._random_in(self.good[int(rng.integers(len(self.good)))], rng))
            kind = "defect"
            if self.hard_positives and rng.random() < self.hard_positive_fraction:
                hp = self.hard_positives[int(rng.integers(len(self.hard_positives)))]
                kind, i, pix = "hard_positive", hp.image, self.components[hp.image][hp.component]
            else:
                i = self.defective[int(rng.integers(len(self.defective)))]
                comps = self.components[i]
                pix = comps[int(rng.integers(len(comps)))]
            cy, cx = pix[int(rng.integers(len(pix)))]
            return (kind, *self._crop_at(i, float(cy), float(cx), rng))
        if u < self.defect_fraction + self.hard_negative_fraction and self.good:
            if self.hard_negatives:
                hn = self.hard_negatives[int(rng.integers(len(self.hard_negatives)))]
                return ("hard", *self._crop_at(hn.image, hn.y, hn.x, rng))
            return ("good", *self._random_in(self.good[int(rng.integers(len(self.good)))], rng))
        return ("random", *self._random_in(int(rng.integers(len(self.images))), rng))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        aug_seed = int(rng.integers(2**31 - 1))
        aug = build_augmentation(self.augment, seed=aug_seed)
        p = self.size
        for _ in range(worker, n, n_workers):
            kind, i, y0, x0 = self.choose(rng)
            img = self.images[i][y0 : y0 + p, x0 : x0 + p]
            msk = self.masks[i][y0 : y0 + p, x0 : x0 + p]
            if kind == "paste":
                stamp = self.stamps[int(rng.integers(len(self.stamps)))]
                h, w = stamp.mask.shape
                img, msk = paste(img, msk, stamp, int(rng.integers(p - h + 1)), int(rng.integers(p - w + 1)))
            img, msk = aug(np.ascontiguousarray(img), np.ascontiguousarray(msk))
            if self.target_stride > 1:  # after augmentation, so the warp cannot erase a small target
                msk = coarse_mask(msk, self.target_stride)
            if img.ndim == 2:
                img = img[:, :, None]
            yield (torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32)),
                   torch.from_numpy(msk[None].astype(np.float32)))


# ------------------------------------------------------------------------ hard-negative mining


@torch.no_grad()
def full_image_probs(model: torch.nn.Module, image: np.ndarray, stride: int = 16) -> np.ndarray:
    """Probability map of a whole image in one forward pass (reflect-padded to the stride).

    Mining only needs to know *where* the model fires, not the edge's exact tile blending,
    and one pass over the image costs about half of the overlapping 256 px tiles.
    """
    h, w = image.shape[:2]
    ph, pw = -h % stride, -w % stride
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.sigmoid(out)[0, 0, :h, :w].numpy()


def peaks(prob: np.ndarray, count: int, spacing: int, min_prob: float) -> list[tuple[int, int, float]]:
    """Up to `count` local maxima (y, x, p) of `prob`, at least ~`spacing` px apart, p >= min_prob."""
    k = max(3, spacing | 1)
    dil = cv2.dilate(prob, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    ys, xs = np.nonzero((prob >= dil) & (prob >= min_prob))
    if ys.size == 0:
        return []
    vals = prob[ys, xs]
    order = np.argsort(-vals, kind="stable")[:count]
    return [(int(ys[j]), int(xs[j]), float(vals[j])) for j in order]


def mine_hard_negatives(model: torch.nn.Module, images: Sequence[np.ndarray], indices: Sequence[int],
                        per_image: int = 4, spacing: int = 32, min_prob: float = 0.05,
                        stride: int = 16) -> list[HardNegative]:
    """Highest false-positive locations on the given good images (model must be in eval mode)."""
    found: list[HardNegative] = []
    for i in indices:
        prob = full_image_probs(model, images[i], stride)
        found.extend(HardNegative(int(i), y, x, s) for y, x, s in peaks(prob, per_image, spacing, min_prob))
    return found


def mine_hard_positives(model: torch.nn.Module, images: Sequence[np.ndarray],
                        components: dict[int, list[np.ndarray]], indices: Sequence[int],
                        miss_prob: float = 0.5, stride: int = 16) -> list[HardPositive]:
    """Defect components of the given images whose peak probability is below `miss_prob` (eval mode).

    `components` is PatchDataset.components (pixel lists per image), so the result indexes them.
    """
    found: list[HardPositive] = []
    for i in indices:
        prob = full_image_probs(model, images[i], stride)
        h, w = prob.shape
        for k, pix in enumerate(components.get(int(i), [])):
            inside = pix[(pix[:, 0] < h) & (pix[:, 1] < w)]
            if not len(inside):
                continue
            peak = float(prob[inside[:, 0], inside[:, 1]].max())
            if peak < miss_prob:
                found.append(HardPositive(int(i), k, peak))
    return found


def update_pool(pool: Sequence[HardNegative], mined: Sequence[HardNegative], mined_images: Sequence[int],
                capacity: int) -> list[HardNegative]:
    """Replace the entries of re-mined images by the new ones; keep the `capacity` strongest."""
    redone = set(int(i) for i in mined_images)
    merged = [h for h in pool if h.image not in redone] + list(mined)
    merged.sort(key=lambda h: (-h.score, h.image, h.y, h.x))
    return merged[:capacity]
