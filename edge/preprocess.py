"""Frame -> model input tiles, and tile outputs -> one full-resolution probability map.

Input contract (the same for training validation and the daemon):
- A frame is a numpy uint8 array, HxW (grayscale) or HxWx3 (BGR, OpenCV order), any size
  of at least 8x8 pixels. 16-bit frames are scaled to 8 bit; HxWx4 (BGRA) drops alpha.
- It is converted to the package's colour mode and, if the package's `scale` is below 1,
  resized by that factor (area interpolation: what a lower-resolution camera would see).
- It is cut into square tiles of `spec.tile` pixels overlapping by `spec.overlap` (images
  smaller than a tile are padded by reflection). Pixels stay raw (float32 0..255): the
  network normalises inside its graph.
- Tile outputs (probabilities) are blended back with a weight that falls off towards tile
  borders and resized back (bilinear), giving a probability map of exactly the frame's height
  and width.

At the default scale 1 nothing is resized, so a defect of a few pixels stays a few pixels.
Training resizes its images and masks with `scale_image` / `scale_mask`, the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

from edge.contract import InputSpec


class FrameError(ValueError):
    """The frame cannot be inspected (empty, wrong dtype or shape); the part gets an `error` verdict."""


@dataclass(frozen=True)
class TileLayout:
    """Where each tile came from, to stitch the outputs back."""

    height: int  # image size at model scale
    width: int
    padded_height: int
    padded_width: int
    origins: tuple[tuple[int, int], ...]  # (y, x) of each tile in the padded image
    tile: int
    frame_height: int = 0  # original frame size (0: same as the model-scale size)
    frame_width: int = 0


def to_model_color(frame: np.ndarray, color: str) -> np.ndarray:
    """Convert a frame to uint8 gray (HxW) or BGR (HxWx3), rejecting what is not an image."""
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise FrameError("frame is empty")
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif frame.dtype != np.uint8:
        raise FrameError(f"frame dtype must be uint8 or uint16, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        gray = frame
        if color == "gray":
            return np.ascontiguousarray(gray)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise FrameError(f"frame must be HxW, HxWx3 or HxWx4, got shape {frame.shape}")
    if frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if color == "gray":
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(frame)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) of a frame at model scale; identity at scale 1."""
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an image to model scale (area interpolation); unchanged at scale 1."""
    h, w = image.shape[:2]
    sh, sw = scaled_size(h, w, scale)
    if (sh, sw) == (h, w):
        return image
    return cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)


def scale_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """Resize a defect mask to model scale: uint8 0/1, a pixel is defect if >= half of it is.

    A defect too small to cover half a pixel at model scale keeps its strongest pixel, so a
    3 px blowhole still has a target at scale 0.25 instead of vanishing from training.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if scaled_size(m.shape[0], m.shape[1], scale) == m.shape[:2]:
        return m
    frac = scale_image(m.astype(np.float32), scale)
    out = (frac >= 0.5).astype(np.uint8)
    n, labels = cv2.connectedComponents((frac > 0).astype(np.uint8), connectivity=8)
    if n > 1:  # one pass over the pixels, not one per component: masks may hold thousands of specks
        lab, f = labels.ravel(), frac.ravel()
        order = np.lexsort((-f, lab))  # by component, strongest pixel first
        comps, first = np.unique(lab[order], return_index=True)
        kept = np.zeros(n, bool)
        kept[lab[out.ravel() > 0]] = True
        rescue = order[first[(comps > 0) & ~kept[comps]]]
        out.flat[rescue] = 1
    return out


def coarse_mask(mask: np.ndarray, factor: int, small_blocks: float = 4.0) -> np.ndarray:
    """Mask -> uint8 0/1 target at 1/`factor` (blocks of factor x factor pixels) that keeps small defects.

    A block is defect if >= half of it is (large defects keep their outline and IoU). A block is also
    defect if it touches a SMALL component, at any coverage: one whose area is below `small_blocks`
    blocks or that is at most about one block thick (a 1-3 px crack), so a 7 px blowhole or a
    hairline keeps a target instead of vanishing under the 50 % rule. Sides that are not a multiple
    of `factor` are padded with background (the output is ceil(H/f) x ceil(W/f)).
    """
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if m.ndim != 2:
        raise ValueError(f"coarse_mask expects an HxW mask, got shape {m.shape}")
    if factor < 1:
        raise ValueError(f"coarse_mask factor must be >= 1, got {factor}")
    if factor == 1:
        return m
    h, w = m.shape
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        m = np.pad(m, ((0, ph), (0, pw)))
    hb, wb = m.shape[0] // factor, m.shape[1] // factor
    # INTER_AREA at an integer factor is the exact block mean (and much faster than a numpy reduce)
    out = (cv2.resize(m.astype(np.float32), (wb, hb), interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
    # the components are found in the block-aligned box of the set pixels plus a ring of background:
    # the same components and distances as over the whole mask, at a fraction of the pixels (a
    # training patch is mostly background, and this ran for every defect patch)
    x, y, bw, bh = cv2.boundingRect(m)
    if not bw:  # no defect pixel: the box is empty (one pass, no separate any())
        return out
    y0, x0 = max(0, y - 1) // factor * factor, max(0, x - 1) // factor * factor
    y1, x1 = -(-min(m.shape[0], y + bh + 1) // factor) * factor, -(-min(m.shape[1], x + bw + 1) // factor) * factor
    small = _small_components(m[y0:y1, x0:x1], factor, small_blocks)
    if small.any():
        sh, sw = (y1 - y0) // factor, (x1 - x0) // factor
        out[y0 // factor : y1 // factor, x0 // factor : x1 // factor] |= (
            small.reshape(sh, factor, -1).max(axis=1).reshape(sh, sw, factor).max(axis=2))
    return out


def _small_components(m: np.ndarray, factor: int, small_blocks: float) -> np.ndarray:
    """Pixels of the components that are small (area) or thin (max inscribed half-width)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros_like(m)
    # distance to the background: a component w px thick peaks at about (w + 1) / 2
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 3)
    thick = np.zeros(n, bool)
    thick[np.unique(labels[dist > (factor + 1) / 2])] = True
    small = (stats[:, cv2.CC_STAT_AREA] < small_blocks * factor * factor) | ~thick
    small[0] = False
    return small[labels].astype(np.uint8)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # last tile flush with the border, never beyond it
    return starts


def plan_tiles(height: int, width: int, spec: InputSpec) -> TileLayout:
    """Tile origins covering a frame of the given size."""
    return _plan_tiles(height, width, spec.tile, spec.overlap, spec.output_stride)


@lru_cache(maxsize=64)
def _plan_tiles(height: int, width: int, tile: int, overlap: int, k: int) -> TileLayout:
    """A line's frames share one size: the layout (immutable) is planned once per size and model geometry,
    not per frame."""
    # a coarse map (output_stride k) is blended at 1/k: the padded grid, and so every tile origin,
    # must fall on whole k x k blocks
    ph, pw = max(-(-height // k) * k, tile), max(-(-width // k) * k, tile)
    stride = tile - overlap
    origins = tuple((y, x) for y in _starts(ph, tile, stride) for x in _starts(pw, tile, stride))
    return TileLayout(height, width, ph, pw, origins, tile)


def pad_bottom_right(img: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """The one padding rule, for frames on the line and patches in training alike: mirror the
    image below and to the right (no new edge for the model to flag; a 1-pixel side repeats).
    HxW stays HxW; HxWxC keeps its channel axis even for C = 1 (copyMakeBorder drops it)."""
    mode = cv2.BORDER_REFLECT_101 if min(img.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    out = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, mode)
    return out if out.ndim == img.ndim else out[:, :, None]


def preprocess(frame: np.ndarray, spec: InputSpec, dtype: type[np.generic] = np.float32) -> tuple[np.ndarray, TileLayout]:
    """Frame -> (tiles N x C x tile x tile, layout). Raw pixel values, NCHW, float32 as the network
    takes them; `dtype` uint8 gives the same values in a quarter of the memory (5 MP: 6 instead of
    25 MB per frame), for a caller that converts one tile at a time (Inferencer.submit)."""
    img = to_model_color(frame, spec.color)
    fh, fw = img.shape[:2]
    h, w = scaled_size(fh, fw, spec.scale)
    if h < 8 or w < 8:
        at_scale = f" for the model's scale {spec.scale}: {w}x{h} at model scale," if spec.scale != 1.0 else ";"
        raise FrameError(f"frame is too small ({fw}x{fh}){at_scale} at least 8x8 pixels expected")
    img = scale_image(img, spec.scale)
    layout = plan_tiles(h, w, spec)
    if (h, w) != (fh, fw):
        layout = replace(layout, frame_height=fh, frame_width=fw)
    if (layout.padded_height, layout.padded_width) != (h, w):
        img = pad_bottom_right(img, layout.padded_height - h, layout.padded_width - w)
    if img.ndim == 2:
        img = img[:, :, None]
    t = spec.tile
    tiles = np.empty((len(layout.origins), img.shape[2], t, t), dtype=dtype)
    for i, (y, x) in enumerate(layout.origins):
        tiles[i] = img[y : y + t, x : x + t].transpose(2, 0, 1)
    return tiles, layout


_WEIGHT_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _blend_weight(tile: int, overlap: int) -> np.ndarray:
    """Weight that ramps up over the overlap band so tile borders (less context) count less."""
    key = (tile, overlap)
    if key not in _WEIGHT_CACHE:
        ramp = np.ones(tile, dtype=np.float32)
        if overlap > 0:
            r = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
            ramp[:overlap] = r
            ramp[-overlap:] = r[::-1]
        _WEIGHT_CACHE[key] = np.outer(ramp, ramp)
    return _WEIGHT_CACHE[key]


@dataclass(frozen=True)
class CoarseMap:
    """A frame's tile outputs blended at the model's output resolution, before the final resize.

    The daemon queues this instead of the full-resolution map: at 5 MP the full float32 map is 20 MB
    per part waiting for the result thread, the coarse one ~1 MB (scale 0.25 or output_stride 4).
    `full()` gives exactly what `stitch` gives, `window()` a part of it; the result thread judges one part
    at a time from windows (edge.postprocess.postprocess_map) and builds the full map only as a fallback."""

    blended: np.ndarray
    layout: TileLayout
    k: int  # tile / output side: the blended map is at 1/k of the padded tile grid

    def full(self) -> np.ndarray:
        """HxW float32 probability map of the whole frame (bilinear resize of the blended map)."""
        prob, layout, k = self.blended, self.layout, self.k
        if k > 1:  # each coarse pixel is a k x k block of the padded grid: resize the blocks, then crop
            prob = cv2.resize(prob, (prob.shape[1] * k, prob.shape[0] * k), interpolation=cv2.INTER_LINEAR)
            prob = np.ascontiguousarray(prob[: layout.height, : layout.width])
        if layout.frame_height and (layout.frame_height, layout.frame_width) != prob.shape:
            prob = cv2.resize(prob, (layout.frame_width, layout.frame_height), interpolation=cv2.INTER_LINEAR)
        return prob

    @property
    def exact_windows(self) -> bool:
        """Whether `window` can resize a crop of the blended map instead of the whole of it.

        For k a power of two (1 included) the bilinear source coordinates (x + 0.5) / k - 0.5 are exact
        in floating point, so a crop with one coarse pixel of margin resizes to the very values the whole
        map does (tests/edge/test_coarse_post.py checks this bit for bit). A frame resized a second time
        (input scale != 1: frame size != layout size) or another k has no such guarantee."""
        layout = self.layout
        same_size = not layout.frame_height or (layout.frame_height, layout.frame_width) == (layout.height, layout.width)
        return self.k >= 1 and self.k & (self.k - 1) == 0 and same_size

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Exactly `self.full()[y0:y1, x0:x1]`, computed from the coarse pixels under it (plus one of margin)
        when `exact_windows`, else (slow: the whole map each call) by slicing `full()`."""
        height, width = (self.layout.frame_height, self.layout.frame_width) if self.layout.frame_height else (
            self.layout.height, self.layout.width)
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"window [{y0}:{y1}, {x0}:{x1}] is empty or outside the {height}x{width} map")
        if not self.exact_windows:
            return self.full()[y0:y1, x0:x1]
        k = self.k
        if k == 1:
            return self.blended[y0:y1, x0:x1]
        ch, cw = self.blended.shape
        cy0, cy1 = max(0, y0 // k - 1), min(ch, (y1 - 1) // k + 2)
        cx0, cx1 = max(0, x0 // k - 1), min(cw, (x1 - 1) // k + 2)
        crop = np.ascontiguousarray(self.blended[cy0:cy1, cx0:cx1])
        big = cv2.resize(crop, ((cx1 - cx0) * k, (cy1 - cy0) * k), interpolation=cv2.INTER_LINEAR)
        return big[y0 - cy0 * k : y1 - cy0 * k, x0 - cx0 * k : x1 - cx0 * k]


def blend_tiles(outputs: np.ndarray, layout: TileLayout, overlap: int) -> CoarseMap:
    """Tile outputs (N x t x t, or N x 1 x t x t) -> the frame's map at output resolution (CoarseMap).

    t is the tile side, or tile / k for a model whose map comes out coarse (`output_stride` k, the
    pooled-views models): the tiles are then blended at 1/k and the map is resized once, over the
    whole frame, which costs the edge 1/k^2 of blending full-size tiles and has no tile seams.
    """
    out = np.asarray(outputs, dtype=np.float32)
    if out.ndim == 4:
        out = out[:, 0]
    k = layout.tile // out.shape[-1]
    if k < 1 or out.shape[-1] * k != layout.tile or overlap % k:
        raise ValueError(f"tile outputs of side {out.shape[-1]} do not divide the tile {layout.tile} "
                         f"(overlap {overlap})")
    return CoarseMap(_blend(out, layout, overlap, k), layout, k)


def stitch(outputs: np.ndarray, layout: TileLayout, overlap: int) -> np.ndarray:
    """Tile outputs -> HxW float32 map of the frame (blend_tiles, then CoarseMap.full)."""
    return blend_tiles(outputs, layout, overlap).full()


def _blend(out: np.ndarray, layout: TileLayout, overlap: int, k: int = 1) -> np.ndarray:
    """Weighted blend of the tile outputs at 1/k of the tile grid, cropped to the part's extent."""
    h, w = -(-layout.height // k), -(-layout.width // k)
    if len(layout.origins) == 1:
        return np.ascontiguousarray(out[0, :h, :w])
    acc = np.zeros((layout.padded_height // k, layout.padded_width // k), dtype=np.float32)
    wsum = np.zeros_like(acc)
    t = layout.tile // k
    weight = _blend_weight(t, overlap // k)
    for (y, x), o in zip(layout.origins, out, strict=True):
        y, x = y // k, x // k
        acc[y : y + t, x : x + t] += o * weight
        wsum[y : y + t, x : x + t] += weight
    return acc[:h, :w] / wsum[:h, :w]
