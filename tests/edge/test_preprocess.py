"""The shared input contract: colour conversion, scaling, tiling and stitching."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge.contract import InputSpec
from edge.preprocess import FrameError, plan_tiles, preprocess, scale_mask, stitch, to_model_color


@pytest.mark.parametrize("shape", [(8, 8), (63, 64), (64, 64), (100, 250), (300, 421), (1, 1000)])
def test_tiles_cover_the_frame_and_stitch_back_exactly(shape: tuple[int, int]) -> None:
    spec = InputSpec(tile=64, overlap=16)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if min(shape) < 8:
        with pytest.raises(FrameError, match="too small"):
            preprocess(frame, spec)
        return
    tiles, layout = preprocess(frame, spec)
    assert tiles.dtype == np.float32 and tiles.shape[1:] == (1, 64, 64)
    # identity "model": each tile's output is its own input -> stitching must rebuild the frame
    back = stitch(tiles[:, 0] / 255.0, layout, spec.overlap)
    assert back.shape == shape
    np.testing.assert_allclose(back, frame / 255.0, atol=1e-5)


def test_tile_origins_never_leave_the_padded_frame() -> None:
    spec = InputSpec(tile=256, overlap=32)
    layout = plan_tiles(300, 630, spec)
    for y, x in layout.origins:
        assert 0 <= y <= layout.padded_height - 256 and 0 <= x <= layout.padded_width - 256
    assert len(layout.origins) == 2 * 3


def test_colour_conversion_and_bad_frames() -> None:
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in BGR
    gray = to_model_color(bgr, "gray")
    assert gray.shape == (10, 12) and 70 <= gray[0, 0] <= 80  # ITU-R 601 luma of red
    assert to_model_color(gray, "bgr").shape == (10, 12, 3)
    assert to_model_color(np.full((10, 12), 65535, np.uint16), "gray")[0, 0] == 255
    assert to_model_color(np.zeros((10, 12, 4), np.uint8), "bgr").shape == (10, 12, 3)
    with pytest.raises(FrameError, match="empty"):
        to_model_color(np.zeros((0, 5), np.uint8), "gray")
    with pytest.raises(FrameError, match="dtype"):
        to_model_color(np.zeros((10, 10), np.float64), "gray")
    with pytest.raises(FrameError, match="shape"):
        to_model_color(np.zeros((10, 10, 5), np.uint8), "gray")


def test_colour_tiles_are_nchw_in_bgr_order() -> None:
    spec = InputSpec(color="bgr", tile=32, overlap=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[..., 0] = 10
    frame[..., 2] = 30
    tiles, _ = preprocess(frame, spec)
    assert tiles.shape == (1, 3, 32, 32)
    assert tiles[0, 0, 0, 0] == 10 and tiles[0, 2, 0, 0] == 30


def test_input_spec_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        InputSpec(tile=100).validate()
    with pytest.raises(ValueError, match="mean/std"):
        InputSpec(color="bgr").validate()
    with pytest.raises(ValueError, match="scale"):
        InputSpec(scale=0.0).validate()
    with pytest.raises(ValueError, match="scale"):
        InputSpec(scale=1.5).validate()
    spec = InputSpec(tile=128, overlap=16, scale=0.5)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "scale"}).scale == 1.0


@pytest.mark.parametrize("shape", [(300, 421), (101, 57)])
def test_scaled_frames_tile_at_model_scale_and_stitch_back_to_frame_size(shape: tuple[int, int]) -> None:
    spec = InputSpec(tile=64, overlap=16, scale=0.5)
    _, xx = np.mgrid[: shape[0], : shape[1]]
    frame = (xx * 255 // shape[1]).astype(np.uint8)  # a smooth ramp survives down- and upscaling
    tiles, layout = preprocess(frame, spec)
    assert (layout.height, layout.width) == (round(shape[0] / 2), round(shape[1] / 2))
    assert (layout.frame_height, layout.frame_width) == shape
    full = preprocess(frame, InputSpec(tile=64, overlap=16))[0]
    assert len(tiles) < len(full)  # fewer tiles: that is what the scale is for
    back = stitch(tiles[:, 0] / 255.0, layout, spec.overlap)
    assert back.shape == shape
    np.testing.assert_allclose(back, frame / 255.0, atol=2.5 / 255 + 255 / shape[1] / 255)


def test_too_small_at_model_scale_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match=r"scale 0\.1"):
        preprocess(np.zeros((40, 40), np.uint8), InputSpec(tile=32, overlap=0, scale=0.1))


def test_scaled_mask_keeps_defects_too_small_for_one_model_pixel() -> None:
    mask = np.zeros((200, 200), np.uint8)
    mask[100:102, 50:52] = 1  # 2x2 px: 1/16 of a model pixel at scale 0.25
    mask[0:100, 100:200] = 255  # a large region, any value > 0 is defect
    small = scale_mask(mask, 0.25)
    assert small.shape == (50, 50) and small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert small[25, 12] == 1 and small[25, 13] == 0  # the tiny defect keeps exactly one pixel
    assert small[:25, 25:].all() and not small[26:, 14:].any()
    np.testing.assert_array_equal(scale_mask(mask, 1.0), (mask > 0).astype(np.uint8))


def test_coarse_mask_keeps_small_and_thin_defects_and_large_outlines() -> None:
    from edge.preprocess import coarse_mask

    m = np.zeros((64, 64), np.uint8)
    m[8:40, 8:40] = 1  # large: 32 x 32 -> exactly 8 x 8 blocks, no rim added
    m[50, 20:60] = 1  # 1 px crack, 40 px long: a target all along it
    m[57:59, 5:8] = 1  # 6 px speck straddling blocks
    out = coarse_mask(m, 4)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert out[2:10, 2:10].all() and out[:, :].sum() - out[2:10, 2:10].sum() > 0
    assert out[12, 5:15].all()  # the crack: 10 blocks, at 25 % coverage each
    assert out[14, 1] == 1  # the speck
    assert out[0:12, 10:].sum() == 0 and out[0:2].sum() == 0  # nothing grows around the large blob
    # today's 50 % rule (scale_mask) keeps at most one pixel of the crack
    assert scale_mask(m, 0.25)[12].sum() <= 1


def _coarse_mask_whole(mask: np.ndarray, factor: int, small_blocks: float = 4.0) -> np.ndarray:
    """coarse_mask as it was before it looked only at the box of the set pixels: components over the whole mask."""
    import cv2

    m = (mask > 0).astype(np.uint8)
    m = np.pad(m, ((0, -m.shape[0] % factor), (0, -m.shape[1] % factor)))
    hb, wb = m.shape[0] // factor, m.shape[1] // factor
    out = (cv2.resize(m.astype(np.float32), (wb, hb), interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 1:
        dist = cv2.distanceTransform(m, cv2.DIST_L2, 3)
        thick = np.zeros(n, bool)
        thick[np.unique(labels[dist > (factor + 1) / 2])] = True
        small = (stats[:, cv2.CC_STAT_AREA] < small_blocks * factor * factor) | ~thick
        small[0] = False
        out |= small[labels].reshape(hb, factor, -1).max(axis=1).reshape(hb, wb, factor).max(axis=2)
    return out


def test_coarse_mask_looks_at_the_defects_box_and_gives_what_the_whole_mask_gives() -> None:
    """Components and distances are taken in the box of the set pixels (plus a background ring): the result is
    the whole-mask computation's, for specks, cracks and blobs anywhere, including on the patch's borders."""
    import cv2

    from edge.preprocess import coarse_mask

    rng = np.random.default_rng(7)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(5, 97, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            kind = rng.integers(3)
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            if kind == 0:  # a speck or a blob
                r = int(rng.integers(0, 12))
                cv2.circle(m, (x, y), r, 1, -1)
            elif kind == 1:  # a crack of 1-3 px
                cv2.line(m, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), 1, int(rng.integers(1, 4)))
            else:  # a block flush with a border
                m[: int(rng.integers(1, h + 1)), x:] = 1 if rng.random() < 0.5 else 0
        for factor in (2, 4):
            np.testing.assert_array_equal(coarse_mask(m, factor), _coarse_mask_whole(m, factor),
                                          err_msg=f"trial {trial}, factor {factor}, {h}x{w}")


def test_coarse_mask_half_rule_for_large_blobs_and_padding() -> None:
    from edge.preprocess import coarse_mask

    m = np.zeros((30, 30), np.uint8)  # not a multiple of 4: padded to 32
    m[2:26, 2:26] = 1  # 24 x 24, offset by half a block: edge blocks are 50 % covered
    out = coarse_mask(m, 4)
    assert out.shape == (8, 8)
    # blocks 0..6 are touched; edge blocks are 50 % covered (kept), the corners 25 % (dropped): no rim
    assert out[:7, :7].sum() == 49 - 4 and out.sum() == 45
    assert out[0, 0] == out[6, 6] == 0 and out[0, 3] == out[3, 6] == 1
    np.testing.assert_array_equal(coarse_mask(m, 1), m)
    with pytest.raises(ValueError):
        coarse_mask(m, 0)


@pytest.mark.parametrize("shape", [(150, 210), (40, 50), (64, 64)])
def test_coarse_outputs_stitch_to_the_frame(shape: tuple[int, int]) -> None:
    """A model whose map comes out at tile / 4 (output_stride 4): tile origins fall on whole 4 x 4
    blocks, the coarse tiles blend at 1/4, and the map is resized once to the frame's own size; a
    smooth map survives the round trip (block means -> stitch) within interpolation error."""
    spec = InputSpec(color="gray", tile=64, overlap=16, multiple_of=16, output_stride=4)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    truth = 0.5 + 0.4 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
    _, layout = preprocess((truth * 255).astype(np.uint8), spec)
    assert all(y % 4 == 0 and x % 4 == 0 for y, x in layout.origins)
    padded = cv2.copyMakeBorder(truth, 0, layout.padded_height - h, 0, layout.padded_width - w,
                                cv2.BORDER_REFLECT_101)
    coarse = np.stack([cv2.resize(padded[y : y + 64, x : x + 64], (16, 16), interpolation=cv2.INTER_AREA)
                       for y, x in layout.origins])
    prob = stitch(coarse, layout, spec.overlap)
    assert prob.shape == (h, w)
    assert np.abs(prob - truth)[4:-4, 4:-4].max() < 0.03
    with pytest.raises(ValueError, match="do not divide"):
        stitch(coarse[:, :15, :15], layout, spec.overlap)


class _Echo:
    """A back end that returns each tile's own pixels / 255 as its map and the tile's max as its part score."""

    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        maps = tiles[:, 0] / 255.0
        return maps.astype(np.float32), maps.reshape(len(maps), -1).max(axis=1)


@pytest.mark.parametrize("shape", [(97, 131), (300, 200), (64, 64)])
def test_predict_frame_is_tiling_and_stitching_of_any_back_end(shape: tuple[int, int]) -> None:
    """An identity model gives the frame back through the one tiled prediction (padding and blending
    leave no seam), and the part score is the max over tiles."""
    from edge.tiled import predict_frame

    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    prob, part = predict_frame(_Echo(), frame, InputSpec(color="gray", tile=64, overlap=16, multiple_of=16))
    assert prob.shape == shape
    np.testing.assert_allclose(prob, frame / 255.0, atol=1e-5)
    assert part == pytest.approx(frame.max() / 255.0)


def test_padding_keeps_a_single_channel_axis() -> None:
    from edge.preprocess import pad_bottom_right

    assert pad_bottom_right(np.zeros((5, 7, 1), np.uint8), 3, 1).shape == (8, 8, 1)
    assert pad_bottom_right(np.zeros((5, 7), np.uint8), 3, 1).shape == (8, 8)
    assert pad_bottom_right(np.arange(3, dtype=np.uint8)[None, :], 2, 0).tolist() == [[0, 1, 2]] * 3
