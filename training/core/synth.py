"""Synthetic textured parts with exact defect masks, for tests, demos and smoke training.

A part is a textured surface (brushed metal, woven fabric or speckled casting) under an
uneven illumination with sensor noise. A defect is painted onto the noise-free surface and
the same noise is added to the clean and the defective rendering, so the two differ only
where the defect altered the part. The mask is then *derived from the pixels*: a pixel is
defective iff it changed by at least `VISIBLE_DELTA` grey levels, and smaller changes (the
faint antialiased fringe of a stroke) are reverted. So `mask == (image != clean)` holds
exactly, and a network is never asked to find a defect that is not in the image.

Layout written by `generate_dataset` (the generic layout of `training.core.data`)::

    out/images/<type>_<index:05d>.png   uint8 gray or BGR
    out/masks/<type>_<index:05d>.png    0 = good, 255 = defect; good parts get an all-zero mask

Two profiles (`PROFILES`):

- ``part`` (default): compact square-ish parts with the five defect types above;
- ``strip``: long commutator-like strips (500 x 1250 px by default): copper bars separated by
  thin dark insulating gaps, brushed along the bars, with a cylinder's shading, a specular band
  and uneven lighting; the defects are hairline cracks 1-3 px wide (half of the defective
  strips) plus small pits and fine scratches. The regular gaps look like cracks to a careless
  model, which is the point: a product of long parts with hairline cracks, for the automatic
  recipe (training/core/recipe_auto.py) and the benchmarks.

Numpy and OpenCV only (no torch), so the daemon's demo can import it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

DEFECT_TYPES: tuple[str, ...] = ("scratch", "crack", "pit", "stain", "missing")
TEXTURES: tuple[str, ...] = ("brushed", "fabric", "speckled")
VISIBLE_DELTA = 8  # grey levels; a smaller change is not visible enough to demand detection
MIN_DEFECT_PIXELS = 6  # a defect rendering with fewer visible pixels is redrawn
_NAME_RE = re.compile(r"^(good|" + "|".join(DEFECT_TYPES) + r")_\d{5}\.png$")


@dataclass(frozen=True)
class RenderedPart:
    """A part before and after its defect; `image` equals `clean` wherever `mask` is 0."""

    image: np.ndarray  # uint8 HxW or HxWx3
    clean: np.ndarray  # same part without the defect (same noise)
    mask: np.ndarray  # uint8 {0,1} HxW
    texture: str
    defect_type: str | None


# --------------------------------------------------------------------------- surfaces


def _normalise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    return a / (a.std() + 1e-6)


def _brushed(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Directional streaks: noise smeared along one random direction."""
    d = int(np.ceil(np.hypot(h, w))) + 2
    noise = rng.standard_normal((d, d)).astype(np.float32)
    streaks = cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(8, 25)), sigmaY=0.6)
    # a few longer, stronger grooves, as left by a worn brush
    grooves = np.zeros((d, d), np.float32)
    for _ in range(int(rng.integers(3, 10))):
        y = int(rng.integers(0, d))
        grooves[y, :] = rng.uniform(-1, 1) * 6
    streaks = _normalise(streaks) + cv2.GaussianBlur(grooves, (0, 0), sigmaX=30, sigmaY=0.5)
    rot = cv2.getRotationMatrix2D((d / 2, d / 2), float(rng.uniform(0, 180)), 1.0)
    streaks = cv2.warpAffine(streaks, rot, (d, d), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    y0, x0 = (d - h) // 2, (d - w) // 2
    return _normalise(streaks[y0 : y0 + h, x0 : x0 + w])


def _fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Plain weave: warp and weft threads passing over and under each other."""
    period = float(rng.uniform(6, 14))
    angle = float(rng.uniform(0, np.pi))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / period
    warp, weft = np.abs(np.sin(np.pi * u)), np.abs(np.sin(np.pi * v))
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    weave = np.where(over, warp * 0.8 + 0.2 * weft, weft * 0.8 + 0.2 * warp)
    fibres = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8)
    return _normalise(weave + 0.25 * fibres)


def _speckled(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Granular surface (sand casting, ceramic): fine grain plus sparse light and dark grains."""
    grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.7, 1.5)))
    dots = np.zeros((h, w), np.float32)
    n = int(h * w * rng.uniform(0.002, 0.01))
    dots[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.choice([-1.0, 1.0], n) * 4
    return _normalise(_normalise(grain) + cv2.GaussianBlur(dots, (0, 0), 0.9))


_TEXTURE_FN: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "brushed": _brushed,
    "fabric": _fabric,
    "speckled": _speckled,
}


def _illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative lighting: a linear gradient in a random direction plus a soft hot spot."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / w - 0.5) * np.cos(a) + (yy / h - 0.5) * np.sin(a)) * rng.uniform(0.1, 0.4)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (rng.uniform(0.3, 0.8) * max(h, w)) ** 2))
    return (1.0 + ramp + rng.uniform(0.0, 0.15) * (spot - spot.mean())).astype(np.float32)


def _strip_surface(rng: np.random.Generator, h: int, w: int, channels: int) -> tuple[np.ndarray, str]:
    """Commutator strip, float32 HxWxC: bars across the long axis, gaps, brushing, cylinder shading."""
    long_x = w >= h
    if not long_x:  # draw it lying down, then stand it up
        surf, kind = _strip_surface(rng, w, h, channels)
        return np.ascontiguousarray(np.transpose(surf, (1, 0, 2))), kind
    xx = np.arange(w, dtype=np.float32)
    bar_w = float(rng.uniform(40, 90))
    gap_w = float(rng.uniform(3.0, 5.0))
    phase = float(rng.uniform(0, bar_w))
    pos = (xx + phase) % bar_w
    gap = np.clip(1.0 - np.abs(pos - bar_w / 2) / (gap_w / 2), 0, 1) ** 0.5  # soft-edged dark gap per bar
    bar_idx = np.floor((xx + phase) / bar_w).astype(int)
    bar_gain = 1.0 + rng.normal(0, 0.04, bar_idx.max() + 1).astype(np.float32)[bar_idx]
    streaks = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=0.7,
                               sigmaY=float(rng.uniform(15, 40)))  # brushed along the bars
    yy = (np.arange(h, dtype=np.float32) / max(1, h - 1) - 0.5) * 2
    shade = 1.0 - rng.uniform(0.15, 0.35) * yy**2  # the cylinder turns away from the camera
    band_y, band_w = rng.uniform(-0.6, 0.6), rng.uniform(0.08, 0.25)
    band = rng.uniform(0.1, 0.35) * np.exp(-((yy - band_y) ** 2) / (2 * band_w**2))  # specular band
    level = rng.uniform(110, 160)
    gray = (level * bar_gain[None, :] * (1 - 0.6 * gap[None, :]) + rng.uniform(4, 9) * _normalise(streaks))
    gray = gray * (shade + band)[:, None] * _illumination(rng, h, w)
    if channels == 1:
        return gray[:, :, None], "commutator"
    tint = np.array([0.55, 0.75, 1.0], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # copper, BGR
    return gray[:, :, None] * tint[None, None, :], "commutator"


def _surface(rng: np.random.Generator, h: int, w: int, channels: int) -> tuple[np.ndarray, str]:
    """Noise-free surface, float32 HxWxC in grey levels."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    tex = _TEXTURE_FN[kind](rng, h, w)
    mottle = cv2.resize(rng.standard_normal((6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    level, contrast = rng.uniform(100, 160), rng.uniform(8, 18)
    gray = (level + contrast * tex + rng.uniform(2, 6) * mottle) * _illumination(rng, h, w)
    if channels == 1:
        return gray[:, :, None], kind
    tint = rng.uniform(0.75, 1.2, 3).astype(np.float32)  # steel, copper, anodised...
    return gray[:, :, None] * tint[None, None, :], kind


# --------------------------------------------------------------------------- defects


def _blend(base: np.ndarray, alpha: np.ndarray, target: np.ndarray | float) -> np.ndarray:
    """Move `base` towards `target` by `alpha` (HxW, 0..1)."""
    a = alpha[:, :, None]
    return base * (1 - a) + np.asarray(target, np.float32) * a


def _stroke(h: int, w: int, pts: np.ndarray, thickness: int) -> np.ndarray:
    layer = np.zeros((h, w), np.uint8)
    cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=4)
    return layer.astype(np.float32) / 255.0


def _scratch(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Thin curved line (quadratic Bezier), 1-3 px, bright (bare metal) or dark (groove)."""
    h, w = base.shape[:2]
    length = rng.uniform(0.1, 0.7) * min(h, w)
    p0 = rng.uniform([0, 0], [w, h])
    a = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.cos(a), np.sin(a)])
    p1 = (p0 + p2) / 2 + rng.normal(0, length * 0.25, 2)
    t = np.linspace(0, 1, max(8, int(length)))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    target = rng.uniform(210, 250) if rng.random() < 0.6 else rng.uniform(20, 60)
    return _blend(base, _stroke(h, w, pts, int(rng.integers(1, 4))) * rng.uniform(0.6, 1.0), target)


def _crack_path(rng: np.random.Generator, start: np.ndarray, angle: float, length: float) -> np.ndarray:
    steps = max(3, int(length / rng.uniform(3, 7)))
    turns = np.cumsum(rng.normal(0, 0.45, steps)) * 0.5 + angle
    seg = length / steps
    moves = np.stack([np.cos(turns), np.sin(turns)], 1) * seg
    return np.vstack([start, start + np.cumsum(moves, 0)])


def _crack(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Jagged dark polyline with a few thinner side branches."""
    h, w = base.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    main = _crack_path(rng, rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h]),
                       rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.6) * min(h, w))
    alpha = np.maximum(alpha, _stroke(h, w, main, int(rng.integers(1, 3))))
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(1, len(main)))
        d = main[i] - main[i - 1]
        ang = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
        branch = _crack_path(rng, main[i], ang, rng.uniform(0.1, 0.3) * min(h, w))
        alpha = np.maximum(alpha, _stroke(h, w, branch, 1) * 0.85)
    return _blend(base, alpha, rng.uniform(5, 40))


def _pit(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """One to three small dark roundish spots (blowholes), many only 10-30 px in area."""
    h, w = base.shape[:2]
    layer = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(1.8, 5.5)
        c = rng.uniform([r + 1, r + 1], [w - r - 1, h - r - 1])
        axes = (r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
        cv2.ellipse(layer, (c * 16).astype(np.int32).tolist(), tuple(int(x * 16) for x in axes),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), 0.6)
    return _blend(base, alpha, rng.uniform(5, 45))


def _stain(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Soft-edged blob that darkens or lightens (and in colour, tints) the surface."""
    h, w = base.shape[:2]
    layer = np.zeros((h, w), np.uint8)
    r = rng.uniform(0.03, 0.15) * min(h, w)
    c = rng.uniform([0, 0], [w, h])
    for _ in range(int(rng.integers(1, 5))):
        cc = c + rng.normal(0, r * 0.5, 2)
        axes = (max(2, int(r * rng.uniform(0.5, 1.2))), max(2, int(r * rng.uniform(0.5, 1.2))))
        cv2.ellipse(layer, tuple(int(v) for v in cc), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    alpha = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), max(1.0, r * rng.uniform(0.15, 0.4)))
    delta = float(rng.uniform(20, 55) * rng.choice([-1.0, 1.0]))
    tint = np.asarray(rng.uniform(0.6, 1.4, base.shape[2]), np.float32) if base.shape[2] == 3 else np.ones(1, np.float32)
    return base + alpha[:, :, None] * delta * tint[None, None, :]


def _missing(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Chipped edge or corner: a jagged region at the border shows the dark background."""
    h, w = base.shape[:2]
    size = rng.uniform(0.06, 0.25) * min(h, w)
    if rng.random() < 0.5:  # corner chip
        corner = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]][int(rng.integers(4))], np.float32)
        inward = np.sign(np.array([w / 2, h / 2]) - corner)
        pts = [corner, corner + np.array([inward[0] * size * rng.uniform(0.6, 1.4), 0])]
        for t in np.linspace(0.2, 0.8, 4):
            pts.append(corner + inward * size * np.array([1 - t, t]) * rng.uniform(0.7, 1.3, 2))
        pts.append(corner + np.array([0, inward[1] * size * rng.uniform(0.6, 1.4)]))
    else:  # bite out of an edge
        side = int(rng.integers(4))
        s = rng.uniform(size, (w if side < 2 else h) - size)
        xs = np.linspace(s - size, s + size, 7)
        depth = np.concatenate([[0], rng.uniform(0.3, 0.8, 5) * size, [0]])
        pts = [np.array([x, d]) for x, d in zip(xs, depth, strict=True)]
        if side == 1:
            pts = [np.array([p[0], h - 1 - p[1]]) for p in pts]
        elif side == 2:
            pts = [np.array([p[1], p[0]]) for p in pts]
        elif side == 3:
            pts = [np.array([w - 1 - p[1], p[0]]) for p in pts]
    layer = np.zeros((h, w), np.uint8)
    cv2.fillPoly(layer, [np.round(np.array(pts) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    background = rng.uniform(5, 25)
    return _blend(base, layer.astype(np.float32) / 255.0, background)


def _hairline(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Hairline crack of a long part: a jagged 1-2 px dark line across part of the short side,
    sometimes faint, with a thin branch or two."""
    h, w = base.shape[:2]
    short = min(h, w)
    alpha = np.zeros((h, w), np.float32)
    across = 0.0 if h >= w else np.pi / 2  # mostly across the strip, where a bending load breaks it
    main = _crack_path(rng, rng.uniform([0.05 * w, 0.05 * h], [0.95 * w, 0.95 * h]),
                       across + rng.normal(0, 0.6) + rng.choice([0.0, np.pi]), rng.uniform(0.1, 0.5) * short)
    alpha = np.maximum(alpha, _stroke(h, w, main, 1 if rng.random() < 0.6 else 2))  # 1-2 px + antialiasing
    for _ in range(int(rng.integers(0, 3))):
        i = int(rng.integers(1, len(main)))
        d = main[i] - main[i - 1]
        ang = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
        alpha = np.maximum(alpha, _stroke(h, w, _crack_path(rng, main[i], ang, rng.uniform(0.03, 0.12) * short), 1)
                           * 0.85)
    return _blend(base, alpha * rng.uniform(0.55, 1.0), rng.uniform(5, 40))


_DEFECT_FN: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]] = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "stain": _stain,
    "missing": _missing,
}


@dataclass(frozen=True)
class Profile:
    """A kind of product: its default part size, surface, defect renderers and defect mix."""

    size: tuple[int, int]  # default (height, width)
    surface: Callable[[np.random.Generator, int, int, int], tuple[np.ndarray, str]]
    defects: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]]
    mix: tuple[str, ...]  # defective parts take these types in turn (repeats weight a type)


PROFILES: dict[str, Profile] = {
    "part": Profile((256, 256), _surface, _DEFECT_FN, DEFECT_TYPES),
    # half of the defective strips have a hairline crack: the defect the profile is about
    "strip": Profile((500, 1250), _strip_surface, {"crack": _hairline, "pit": _pit, "scratch": _scratch},
                     ("crack", "pit", "crack", "scratch")),
}


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


# --------------------------------------------------------------------------- parts


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def render_part(
    rng: np.random.Generator, size: tuple[int, int] | None = None, color: str = "gray",
    defect_type: str | None = None, profile: str = "part",
) -> RenderedPart:
    """Render one part (size = height, width; None = the profile's) with its clean twin; see the
    module docstring."""
    prof = _profile(profile)
    if color not in ("gray", "bgr"):
        raise ValueError(f"color must be 'gray' or 'bgr', got {color!r}")
    if defect_type is not None and defect_type not in prof.defects:
        raise ValueError(f"defect_type must be None or one of {tuple(prof.defects)} (profile {profile}), "
                         f"got {defect_type!r}")
    h, w = (int(v) for v in (size or prof.size))
    if h < 32 or w < 32:
        raise ValueError(f"size must be at least 32x32, got {h}x{w}")
    base, kind = prof.surface(rng, h, w, 1 if color == "gray" else 3)
    noise = rng.normal(0, rng.uniform(1.5, 4.0), base.shape).astype(np.float32)
    clean = _to_uint8(base + noise)
    image, mask = clean.copy(), np.zeros((h, w), np.uint8)
    if defect_type is not None:
        for _ in range(20):  # redraw the rare defect that ends up invisible (e.g. on a matching background)
            dirty = _to_uint8(prof.defects[defect_type](rng, base) + noise)
            visible = np.abs(dirty.astype(np.int16) - clean).max(axis=2) >= VISIBLE_DELTA
            if visible.sum() >= MIN_DEFECT_PIXELS:
                image = np.where(visible[:, :, None], dirty, clean)
                mask = visible.astype(np.uint8)
                break
        else:
            raise RuntimeError(f"could not render a visible {defect_type} on a {h}x{w} part")
    if color == "gray":
        image, clean = image[:, :, 0], clean[:, :, 0]
    return RenderedPart(np.ascontiguousarray(image), np.ascontiguousarray(clean), mask, kind, defect_type)


def make_part(
    rng: np.random.Generator, size: tuple[int, int] | None = (256, 256), color: str = "gray",
    defect_type: str | None = None, profile: str = "part",
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic part in memory: (image uint8, mask uint8 {0,1}); None = good part."""
    part = render_part(rng, size, color, defect_type, profile)
    return part.image, part.mask


def defect_assignments(count: int, seed: int, defect_fraction: float, mix: tuple[str, ...] = DEFECT_TYPES) -> list[str]:
    """Which part gets which defect: an exact share of defects, types in turns of `mix`, shuffled."""
    n_def = round(count * defect_fraction)
    kinds = [mix[i % len(mix)] for i in range(n_def)] + ["good"] * (count - n_def)
    order = np.random.default_rng([seed, 0x5EED]).permutation(count)
    return [kinds[i] for i in order]


def generate_dataset(
    out: Path, count: int, seed: int, size: tuple[int, int] | None = None, color: str = "gray",
    defect_fraction: float = 0.5, progress: bool = True, profile: str = "part",
) -> dict[str, int]:
    """Write `count` parts in the generic layout and return how many of each type were written.

    `profile` picks the kind of product (`PROFILES`); `size` None = the profile's default size.

    Deterministic: the same arguments give byte-identical files. Files of an earlier run
    (names matching this generator's pattern) are removed first so a smaller rerun leaves no
    stale parts behind; other files in `out` are left alone.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    prof = _profile(profile)
    out = Path(out)
    img_dir, mask_dir = out / "images", out / "masks"
    for d in (img_dir, mask_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            if _NAME_RE.match(old.name):
                old.unlink()
    counts = {"good": 0, **{t: 0 for t in prof.defects}}
    for i, kind in enumerate(tqdm(defect_assignments(count, seed, defect_fraction, prof.mix), desc="synth", unit="img",
                                  disable=not progress)):
        rng = np.random.default_rng([seed, i])  # per-part stream, independent of the other parts
        image, mask = make_part(rng, size or prof.size, color, None if kind == "good" else kind, profile)
        name = f"{kind}_{i:05d}.png"
        if not cv2.imwrite(str(img_dir / name), image) or not cv2.imwrite(str(mask_dir / name), mask * 255):
            raise OSError(f"could not write {name} to {out}")
        counts[kind] += 1
    return counts
