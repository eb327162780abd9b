"""Resolve the "auto" fields of a training recipe from statistics of the training data.

`configs/train/default.yaml` leaves `input.scale`, `input.tile`, `patches.size`,
`model.space_to_depth`, `schedule.val_every_s` and `validation.max_min_area` at "auto" so
that one untuned recipe serves compact parts with blobs (Magnetic-Tile) and long strips with
hairline cracks alike. train()
calls `resolve_auto` once, right after the data is loaded, and prints the reasons; the resolved
numbers are what config.yaml, the checkpoints and the model package record. A value given in
the config or with `--set` is never changed: it only constrains the automatic ones.

Three resolutions, related by the space-to-depth factor s = a / b:

- frame      the part as photographed;
- input      what the exported graph is fed: the frame x `input.scale` a (tiles and patches are
             cut here, so every pixel the input keeps reaches the network);
- body       where the U-Net's convolutions run: the input folded by s x s into channels, i.e.
             the frame x b.

The rules (constants below):

1. Context decides the body scale b. A body patch of 96-128 px (`BODY_PATCH`) must hold a
   useful context: a whole compact part, or the full short side of a long part (aspect >= 2),
   because that is what makes a training step informative and still cheap on a 2-core CPU
   (docs/benchmarks.md: more passes over whole parts beat more pixels per step). b is the
   largest power of two <= 1 at which the typical (median) context side fits 128 px.
2. The smallest defects decide the input scale a. The thinnest defects (5th percentile of
   the components' thin side: twice the largest inscribed radius, so a 1-px crack is 1 and a
   7-px blowhole 7) should keep >= `KEEP_PX` input pixels across, so a = 1 unless the
   smallest defects are large; otherwise the smallest power of two that keeps them (cheaper
   input and augmentation).
3. s = a / b in {1, 2, 4} folds the difference into channels. `max_fold()` is 4 with the
   pooled-views stem (`model.stem: views`, chosen for s > 1 where the config schema has it)
   and 2 with plain pixel unshuffling (a plain space_to_depth 4 stem at scale 1 learned
   slowly on Magnetic-Tile, docs/benchmarks.md). When the fold cannot bridge context and
   defects, the order of priority is: the thinnest defects keep >= `MIN_PX` input pixel
   (below that they vanish, and no context brings them back), then the context of rule 1,
   then `KEEP_PX`. So 3-px blowholes with s <= 2 give a = 0.5, b = 0.25 (1.5 px, whole
   parts in view), while 1-px cracks give a = 1 and b = 0.5 (half a strip's width in view).
4. patches.size = s x the body patch (the median context at b, rounded up to the stride and
   clamped to 96-128 body px).
5. input.tile is the multiple of the stride 2**depth x s that covers the training frames with
   the least tiled area (plus a per-tile overhead, so a part fits in few tiles), as the edge
   tiles them (edge.preprocess.plan_tiles): square tiles over long parts without padding a
   500 px strip up to 1280.
6. schedule.val_every_s keeps validation <= ~10 % of the training time: 9 x the estimated
   seconds of one validation (validation pixels at body resolution / `BODY_PX_PER_S`, a
   rate measured on a 2-core machine, halved for slower ones), and at least 30 s.
7. validation.max_min_area caps the min_area calibration may choose at `MIN_AREA_SHARE` of the
   smallest defects' area (p5 of the components, frame px). The calibration parts hold few of
   the smallest defects, so a min_area that costs them nothing there (64 px on Magnetic-Tile)
   let three 30-100 px blowholes of the held-out parts pass.
8. schedule.usual_steps (the step count under which a run warns at minute one that this machine is
   too slow for its budget) is what the recipe's measured figures were trained with, in body
   pixels seen: `USUAL_BODY_PX`, 3,000 steps of 16 (96 px)^2 body patches (the Magnetic-Tile tables
   in docs/benchmarks.md came from 3,200-3,750 such steps), divided by the chosen batch's body pixels.
   A larger body patch costs more per step and needs fewer of them (strips: 128 px, ~1,700).

Numpy and OpenCV only; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from training.core.train_config import (
    AUTO,
    ConfigError,
    ModelSection,
    TrainConfig,
    config_from_dict,
    deep_merge,
)

BODY_PATCH = (96, 128)  # body-resolution patch side: enough context, steps still cheap
COMPACT_ASPECT = 2.0  # long/short side below which a part counts as compact (whole part in context)
KEEP_PX = 2.0  # the thinnest defects should keep this many input pixels across ...
MIN_PX = 1.0  # ... and must keep at least this many (below, they vanish into their neighbours)
MIN_COMPONENT_AREA = 5  # px; smaller mask components are annotation specks, not the smallest defects
THIN_PERCENTILE = 5  # "the smallest defects": robust to a few one-pixel annotation specks
SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # powers of two: s = a / b stays an integer
TILE_OVERHEAD = 0.25  # per-tile cost as a share of a (128 body px)^2 tile: favours few tiles
BODY_PX_PER_S = 1.0e6  # validation throughput at body resolution; ~2.4e6 measured on the 2-core dev box
VAL_SHARE = 0.10  # validation's share of the training time
MIN_VAL_EVERY_S = 30.0
USUAL_BODY_PX = 3000 * 16 * 96**2  # rule 8: body pixels the recipe's measured figures were trained on
USUAL_SHARE = 0.8  # rule 8: a run its budget gives fewer than this share of usual_steps is warned
MIN_AREA_SHARE = 0.5  # calibration's min_area stays <= this x the p5 area of the training defects
USE_VIEWS_STEM = "stem" in ModelSection.model_fields  # the pooled-views stem exists (branch b-views)


def max_fold() -> int:
    """Largest space-to-depth factor auto may pick (see rule 3)."""
    return 4 if USE_VIEWS_STEM else 2


@dataclass(frozen=True)
class DataStats:
    """What the recipe depends on: frame sizes and defect component sizes of the training split."""

    heights: np.ndarray  # per image
    widths: np.ndarray
    thin: dict[str, np.ndarray] = field(default_factory=dict)  # per category: thin side of each component
    area: dict[str, np.ndarray] = field(default_factory=dict)  # per category: pixels of each component

    @property
    def long_side(self) -> float:
        return float(np.median(np.maximum(self.heights, self.widths)))

    @property
    def short_side(self) -> float:
        return float(np.median(np.minimum(self.heights, self.widths)))

    @property
    def aspect(self) -> float:
        return self.long_side / max(1.0, self.short_side)

    @property
    def compact(self) -> bool:
        return self.aspect < COMPACT_ASPECT

    @property
    def context_side(self) -> float:
        """Frame pixels a body patch should hold: the whole part, or the width of a long one."""
        return self.long_side if self.compact else self.short_side

    @staticmethod
    def _smallest(per_category: dict[str, np.ndarray]) -> float | None:
        """The `THIN_PERCENTILE` of one measure over every category's components, None without defects."""
        parts = [v for v in per_category.values() if v.size]
        return float(np.percentile(np.concatenate(parts), THIN_PERCENTILE)) if parts else None

    def smallest_thin(self) -> float | None:
        """Thin side of the smallest defects (percentile), None without defects."""
        return self._smallest(self.thin)

    def smallest_area(self) -> float | None:
        """Area of the smallest defects (frame px, same percentile as the thin side), None without defects."""
        return self._smallest(self.area)

    def describe(self) -> list[str]:
        """Per-category table lines for the log."""
        lines = [f"{len(self.heights)} training frames, median {np.median(self.heights):.0f} x "
                 f"{np.median(self.widths):.0f} px (h x w), aspect {self.aspect:.2f} "
                 f"({'compact' if self.compact else 'long'} parts)"]
        for cat in sorted(self.thin):
            t, a = self.thin[cat], self.area[cat]
            if t.size:
                lines.append(f"  {cat}: {t.size} components, thin side min {t.min():.0f} / p5 "
                             f"{np.percentile(t, 5):.0f} / median {np.median(t):.0f} px, area min {a.min():.0f} / "
                             f"p5 {np.percentile(a, 5):.0f} / median {np.median(a):.0f} px")
        return lines


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thin side, area) of each 8-connected defect component of a {0,1} mask.

    Thin side = 2 x the median distance to the background along the component's ridge (the
    pixels where that distance peaks locally, at least half its maximum) - 1: 1 for a 1-px crack
    of any shape or direction (a bounding box would call a diagonal crack fat), 3 for a 3-px one
    even where branches meet (the largest inscribed circle would be fatter there), ~d for a disc
    of diameter d, and the body's width, not its spurs', for a ragged stain.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8)
    ys, xs = np.nonzero(m)
    if ys.size:  # the defects' bounding box only: a 1250 x 500 frame with one crack costs a crack's worth
        m = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    n, labels = cv2.connectedComponents(m, connectivity=8)
    if n <= 1:
        return np.zeros(0), np.zeros(0)
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    peak = np.zeros(n, np.float32)
    np.maximum.at(peak, labels.ravel().astype(np.intp), dist.ravel())
    ridge = (m > 0) & (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8)) - 1e-4)
    ridge &= dist >= 0.5 * peak[labels]  # not the spurs of a ragged outline: they would make a blob thin
    lab, d = labels[ridge], dist[ridge]
    order = np.lexsort((d, lab))  # by component, then distance: the middle of each run is its median
    counts = np.bincount(lab, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    med = d[order][np.minimum(starts + counts // 2, len(d) - 1)][1:]  # every component has a ridge pixel
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)[1:]
    return np.maximum(1.0, np.round(2.0 * med - 1.0)), area


def data_stats(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], categories: Sequence[str]) -> DataStats:
    """Statistics of the training split (frames as loaded, before any input.scale); components
    below `MIN_COMPONENT_AREA` px are annotation specks (Magnetic-Tile has 1-px ones) and left out."""
    thin: dict[str, list[np.ndarray]] = {}
    area: dict[str, list[np.ndarray]] = {}
    for m, cat in zip(masks, categories, strict=True):
        if m.any():
            t, a = component_sizes(m)
            t, a = t[a >= MIN_COMPONENT_AREA], a[a >= MIN_COMPONENT_AREA]
            thin.setdefault(cat, []).append(t)
            area.setdefault(cat, []).append(a)
    return DataStats(np.array([im.shape[0] for im in images], float), np.array([im.shape[1] for im in images], float),
                     {k: np.concatenate(v) for k, v in thin.items()}, {k: np.concatenate(v) for k, v in area.items()})


def _ceil_to(x: float, m: int) -> int:
    return int(math.ceil(x / m - 1e-9) * m)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _tile_count(length: int, tile: int, overlap: int) -> int:
    """Tiles along one side as edge.preprocess.plan_tiles lays them out (frames padded up to a tile)."""
    length = max(length, tile)
    if length <= tile:
        return 1
    return len(range(0, length - tile, tile - overlap)) + 1


def _choose_scales(stats: DataStats, cfg: TrainConfig, depth_stride: int,
                   reasons: list[str]) -> tuple[float, int]:
    """(input scale a, space_to_depth s) by rules 1-3, respecting explicit values."""
    c = stats.context_side
    b_ctx = next((b for b in SCALES if c * b <= BODY_PATCH[1]), SCALES[-1])
    what = "a whole part" if stats.compact else "the full width of a long part"
    t = stats.smallest_thin()
    a_need = 1.0 if t is None else min(1.0, KEEP_PX / t)
    a_min = 1.0 if t is None else min(1.0, MIN_PX / t)
    a_fixed = None if cfg.input.scale == AUTO else float(cfg.input.scale)
    s_fixed = None if cfg.model.space_to_depth == AUTO else int(cfg.model.space_to_depth)
    folds = [s_fixed] if s_fixed else [s for s in (1, 2, 4) if s <= max_fold()]
    for side in (cfg.patches.size, cfg.input.tile):
        if side != AUTO:  # an explicit side must stay a multiple of the stride
            folds = [s for s in folds if int(side) % (depth_stride * s) == 0]
    if not folds:
        raise ConfigError(f"auto space_to_depth: no factor in 1/2/4 fits the explicit patches.size "
                          f"{cfg.patches.size} and input.tile {cfg.input.tile} (stride 2**depth x s)")
    cands = [(a, s) for a in ([a_fixed] if a_fixed else SCALES) for s in folds if a / s >= SCALES[-1] / 2]

    def key(cand: tuple[float, int]) -> tuple[bool, bool, bool, float, float]:
        a, s = cand
        b = a / s
        fits = b <= b_ctx * (1 + 1e-9)
        return (a >= a_min - 1e-9, fits, a >= a_need - 1e-9, b if fits else -b, -a)

    a, s = max(cands, key=key)
    b = a / s
    if t is None:
        reasons.append("no defect masks in the training split: input scale from context alone")
    else:
        kept = t * a
        reasons.append(f"input.scale {_fmt(a)}{'' if a_fixed is None else ' (set in the config)'}: the smallest "
                       f"defects are {t:.0f} px thin (p{THIN_PERCENTILE} of all components) and keep {kept:.1f} "
                       f"input px across (wanted >= {KEEP_PX:g}"
                       + (", so every pixel is kept" if a == 1.0 else "") + ")")
    reasons.append(f"body at {_fmt(b)} of the frame: the parts are ~{stats.long_side:.0f} x {stats.short_side:.0f} px"
                   f" and a {BODY_PATCH[0]}-{BODY_PATCH[1]} px body patch should hold {what} ({c:.0f} px -> "
                   f"{c * b:.0f} body px)" + ("" if b <= b_ctx * (1 + 1e-9)
                                              else f"; the context would need {_fmt(b_ctx)}, but the thinnest "
                                                   f"defects would vanish at the largest fold {max(folds)}"))
    reasons.append(f"model.space_to_depth {s}{'' if s_fixed is None else ' (set in the config)'}: "
                   f"input {_fmt(a)} / body {_fmt(b)} folds {s} x {s} pixel blocks into channels"
                   + ("" if s > 1 or s_fixed else " (nothing to fold)"))
    return a, s


def _choose_tile(stats: DataStats, a: float, stride: int, overlap: int, s: int) -> int:
    """Rule 5: the stride multiple with the least tiled area (+ per-tile overhead) over the frames."""
    hs = np.maximum(1, np.round(stats.heights * a)).astype(int)
    ws = np.maximum(1, np.round(stats.widths * a)).astype(int)
    lo = max(stride, _ceil_to(2 * overlap + 1, stride), 32)
    hi = max(lo, min(2048, _ceil_to(float(np.max(np.maximum(hs, ws))), stride)))
    overhead = TILE_OVERHEAD * (BODY_PATCH[1] * s) ** 2
    best, best_cost = lo, float("inf")
    for tile in range(lo, hi + 1, stride):
        n = np.array([_tile_count(h, tile, overlap) * _tile_count(w, tile, overlap) for h, w in zip(hs, ws, strict=True)])
        cost = float(np.mean(n * (tile * tile + overhead)))
        if cost < best_cost - 1e-6:
            best, best_cost = tile, cost
    return best


def val_seconds_estimate(stats: DataStats, n_val: int, a: float, tile: int, overlap: int, s: int) -> float:
    """Seconds of one validation pass on a slow 2-core machine (rule 6)."""
    hs = np.maximum(1, np.round(stats.heights * a)).astype(int)
    ws = np.maximum(1, np.round(stats.widths * a)).astype(int)
    tiles = np.mean([_tile_count(h, tile, overlap) * _tile_count(w, tile, overlap) for h, w in zip(hs, ws, strict=True)])
    return float(n_val * tiles * (tile / s) ** 2 / BODY_PX_PER_S)


def val_interval(measured_s: float) -> float:
    """The validation interval for a measured validation time (rule 6 without the estimate).

    For the training loop to refine an auto `schedule.val_every_s` once the first validation
    has been timed (a shared or slower CPU can be several times off the estimate).
    """
    return max(MIN_VAL_EVERY_S, measured_s * (1 - VAL_SHARE) / VAL_SHARE)


def choose(stats: DataStats, cfg: TrainConfig, n_val: int) -> tuple[dict[str, Any], list[str]]:
    """The overrides that resolve cfg's auto fields (nested like the YAML) and why each was chosen."""
    reasons: list[str] = []
    depth_stride = 2**cfg.model.depth
    a, s = _choose_scales(stats, cfg, depth_stride, reasons)
    stride = depth_stride * s
    over: dict[str, Any] = {"input": {}, "model": {}, "patches": {}, "schedule": {}, "validation": {}}
    if cfg.input.scale == AUTO:
        over["input"]["scale"] = a
    if cfg.model.space_to_depth == AUTO:
        over["model"]["space_to_depth"] = s
        if USE_VIEWS_STEM and s > 1:
            over["model"]["stem"] = "views"
            reasons.append("model.stem views: mean, min and max of each s x s block, so a dark or bright "
                           "1-px defect keeps its full contrast in the body")
    b = a / s
    if cfg.patches.size == AUTO:
        body = min(BODY_PATCH[1], max(BODY_PATCH[0], _ceil_to(stats.context_side * b, depth_stride)))
        over["patches"]["size"] = body * s
        reasons.append(f"patches.size {body * s}: a {body} px body patch x space_to_depth {s} "
                       f"({body / b:.0f} frame px)")
    if cfg.input.tile == AUTO:
        tile = _choose_tile(stats, a, stride, cfg.input.overlap, s)
        over["input"]["tile"] = tile
        n = [_tile_count(round(h * a), tile, cfg.input.overlap) * _tile_count(round(w * a), tile, cfg.input.overlap)
             for h, w in zip(stats.heights, stats.widths, strict=True)]
        reasons.append(f"input.tile {tile}: a multiple of the stride {stride} (2**depth x s) covering a typical "
                       f"frame in {float(np.median(n)):.0f} tile(s) ({tile / a:.0f} frame px, overlap "
                       f"{cfg.input.overlap})")
    if cfg.schedule.val_every_s == AUTO:
        tile = int(over["input"].get("tile", cfg.input.tile))
        est = val_seconds_estimate(stats, n_val, a, tile, cfg.input.overlap, s)
        every = round(val_interval(est))
        over["schedule"]["val_every_s"] = float(every)
        reasons.append(f"schedule.val_every_s {every}: one validation of {n_val} frames is estimated at "
                       f"{est:.1f} s on a slow 2-core machine, so validation stays <= {VAL_SHARE:.0%} of the time")
    if cfg.schedule.usual_steps == AUTO:
        side = int(over["patches"].get("size", cfg.patches.size)) // s
        usual = max(100, int(round(USUAL_BODY_PX / (cfg.patches.batch_size * side**2), -2)))
        over["schedule"]["usual_steps"] = usual
        reasons.append(f"schedule.usual_steps {usual}: the recipe's measured figures saw ~{USUAL_BODY_PX / 1e6:.0f}M "
                       f"body px ({cfg.patches.batch_size} x {side}^2 per step); a budget this machine cannot "
                       f"fit {USUAL_SHARE:.0%} of them into gets a warning at minute one")
    if cfg.validation.max_min_area == AUTO:
        smallest = stats.smallest_area()
        cap = None if smallest is None else int(MIN_AREA_SHARE * smallest)
        over["validation"]["max_min_area"] = cap
        reasons.append("validation.max_min_area: no defect masks, the whole grid" if cap is None else
                       f"validation.max_min_area {cap}: the smallest defects cover {smallest:.0f} frame px "
                       f"(p{THIN_PERCENTILE} of all components), so calibration may not drop regions over "
                       f"{MIN_AREA_SHARE:g} of that (a larger min_area let small blowholes pass)")
    return {k: v for k, v in over.items() if v}, reasons


def resolve_auto(cfg: TrainConfig, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 categories: Sequence[str], n_val: int) -> tuple[TrainConfig, list[str]]:
    """cfg with every "auto" replaced by a number chosen from the training split, and the reasons.

    Returns cfg itself (and no reasons) when nothing is auto. Raises ConfigError when the
    explicit values leave no consistent choice.
    """
    if not cfg.auto_fields():
        return cfg, []
    stats = data_stats(images, masks, categories)
    over, reasons = choose(stats, cfg, n_val)
    resolved = config_from_dict(deep_merge(cfg.model_dump(mode="json"), over), "<auto recipe>")
    left = resolved.auto_fields()
    if left:
        raise ConfigError(f"auto recipe: {', '.join(left)} left unresolved")
    return resolved, [*stats.describe(), *reasons]
