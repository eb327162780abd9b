"""The U-Net à la timm's test_models: every variant built small, shapes, no NaNs, all params learn."""

from __future__ import annotations

import pytest
import torch

from training.core.unet import UNetConfig, UNetOutput, build_model, count_parameters

torch.set_num_threads(1)

VARIANTS = {
    "plain": dict(base_width=4, depth=2, max_width=16),
    "deep": dict(base_width=4, depth=4, max_width=16),
    "separable": dict(base_width=4, depth=3, max_width=16, separable=True),
    "dropout": dict(base_width=4, depth=2, max_width=16, dropout=0.3),
    "deep_supervision": dict(base_width=4, depth=3, max_width=16, deep_supervision=True),
    "space_to_depth": dict(base_width=4, depth=2, max_width=16, space_to_depth=2),
    "space_to_depth_bgr": dict(base_width=4, depth=2, max_width=16, space_to_depth=4, in_channels=3,
                               mean=[127.5] * 3, std=[64.0] * 3),
    "nearest_upsample": dict(base_width=4, depth=3, max_width=16, upsample="nearest"),
    "bgr": dict(base_width=4, depth=2, max_width=16, in_channels=3, mean=[127.5] * 3, std=[64.0] * 3),
    "decision_head": dict(base_width=4, depth=3, max_width=16, decision_head=True),
    "decision_head_attached": dict(base_width=4, depth=2, max_width=16, decision_head=True, decision_detach=False,
                                   deep_supervision=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_shapes_finite_and_every_parameter_learns(name: str) -> None:
    cfg = UNetConfig(**VARIANTS[name])
    model = build_model(cfg)
    torch.manual_seed(0)
    x = torch.rand(2, cfg.in_channels, 48, 64) * 255  # raw pixels; H != W and not a power of two
    model.train()
    out = model(x)
    assert isinstance(out, UNetOutput)  # one training-mode convention for every variant
    logits, aux, part = out
    assert len(aux) == (cfg.depth - 1 if cfg.deep_supervision else 0)
    assert all(a.shape == (2, 1, 48, 64) for a in aux)
    assert (part is None) != cfg.decision_head and (part is None or part.shape == (2, 1))
    loss = logits.mean() + sum(a.mean() for a in aux) + (0 if part is None else part.mean())
    assert logits.shape == (2, 1, 48, 64)
    assert torch.isfinite(logits).all()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    model.eval()  # eval returns plain logits, even with deep supervision; (logits, part) with a head
    with torch.no_grad():
        y = model(x)
    if cfg.decision_head:
        y, p = y
        assert p.shape == (2, 1) and torch.isfinite(p).all()
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, 48, 64) and torch.isfinite(y).all()


def test_decision_head_is_light_and_detach_keeps_its_loss_off_the_segmentation() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32) * 255
    for detach in (True, False):
        model = build_model(UNetConfig(base_width=4, depth=2, max_width=16, decision_head=True,
                                       decision_detach=detach)).train()
        assert model.decision is not None and count_parameters(model.decision) < 5000
        model(x).part.sum().backward()
        stem_grad = sum(float(p.grad.abs().sum()) for p in model.stem.parameters() if p.grad is not None)
        assert (stem_grad == 0) == detach
    old = build_model(UNetConfig(base_width=4, depth=2, max_width=16)).state_dict()
    assert not any(k.startswith("decision.") for k in old)  # default: checkpoints without a head unchanged


def test_default_model_is_small_and_starts_near_no_defect() -> None:
    model = build_model(UNetConfig())
    assert count_parameters(model) < 1_000_000
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.full((1, 1, 32, 32), 128.0)))
    assert float(p.mean()) < 0.1  # head bias: rare defects, so start from "good"


def test_space_to_depth_sees_every_pixel_at_a_fraction_of_the_cost() -> None:
    """s = 4: the stem runs on 16 folded channels at 1/4 resolution, and a one-pixel change in the
    input changes the output there (a plain resize by 1/4 would average it away)."""
    cfg = UNetConfig(base_width=4, depth=2, max_width=16, space_to_depth=4)
    assert cfg.stride == 16
    model = build_model(cfg).eval()
    assert model.stem[0][0].in_channels == 16
    x = torch.full((1, 1, 32, 32), 128.0)
    y = x.clone()
    y[0, 0, 13, 6] = 0.0
    with torch.no_grad():
        diff = (model(x) - model(y)).abs()[0, 0]
    assert diff.shape == (32, 32) and float(diff[13, 6]) > 0
    with pytest.raises(ValueError, match="space_to_depth"):
        build_model(UNetConfig(space_to_depth=3))


def test_upsample_option_changes_the_decoder_only_and_is_checked() -> None:
    """Same weights, other decoder upsampling: another output, same shape; unknown modes fail."""
    torch.manual_seed(0)
    bilinear = build_model(UNetConfig(base_width=4, depth=2, max_width=16)).eval()
    nearest = build_model(UNetConfig(base_width=4, depth=2, max_width=16, upsample="nearest")).eval()
    nearest.load_state_dict(bilinear.state_dict())
    x = torch.rand(1, 1, 32, 48) * 255
    with torch.no_grad():
        a, b = bilinear(x), nearest(x)
    assert a.shape == b.shape == (1, 1, 32, 48)
    assert float((a - b).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="upsample must be 'bilinear' or 'nearest'"):
        build_model(UNetConfig(upsample="bicubic"))


def test_config_round_trip_and_unknown_option() -> None:
    cfg = UNetConfig(base_width=8, separable=True)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="widht"):
        UNetConfig.from_dict({"widht": 3})


@pytest.mark.parametrize("channels,deep", [(1, False), (3, True)])
def test_views_stem_trains_coarse_and_predicts_full_size(channels: int, deep: bool) -> None:
    """s = 4 views: 3 views x C channels into the stem; training returns logits (and aux) at 1/4,
    for coarse targets; eval returns them at 1/4 too (the package's output_stride: the edge resizes)."""
    cfg = UNetConfig(base_width=4, depth=2, max_width=16, space_to_depth=4, stem="views", in_channels=channels,
                     mean=[127.5] * channels, std=[64.0] * channels, deep_supervision=deep)
    assert cfg.output_stride == 4 and UNetConfig(space_to_depth=4).output_stride == 1
    model = build_model(cfg)
    assert model.stem[0][0].in_channels == 3 * channels
    x = torch.rand(2, channels, 64, 96) * 255
    model.train()
    out = model(x)
    logits, aux = out.logits, out.aux
    assert logits.shape == (2, 1, 16, 24)
    assert len(aux) == (1 if deep else 0) and all(a.shape == (2, 1, 16, 24) for a in aux)
    (logits.mean() + sum(a.mean() for a in aux)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 1, 16, 24)


def test_views_are_block_mean_min_and_max() -> None:
    """The mean view equals the area downscale (what input.scale = 1/s feeds today) and a single dark
    pixel keeps its full contrast in the min view, where the mean dilutes it 16-fold."""
    import numpy as np

    from edge.preprocess import scale_image

    cfg = UNetConfig(base_width=4, depth=2, max_width=16, space_to_depth=4, stem="views", mean=[0.0], std=[1.0])
    model = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    img = rng.integers(100, 200, (32, 48), dtype=np.uint8)
    img[9, 22] = 0  # a one-pixel blowhole
    folded = model.fold(torch.from_numpy(img).float()[None, None])[0].numpy()
    assert folded.shape == (3, 8, 12)
    np.testing.assert_allclose(folded[0], scale_image(img, 0.25).astype(np.float32), atol=0.51)  # uint8 rounding
    np.testing.assert_array_equal(folded[1], img.reshape(8, 4, 12, 4).min(axis=(1, 3)))
    np.testing.assert_array_equal(folded[2], img.reshape(8, 4, 12, 4).max(axis=(1, 3)))
    assert folded[1][2, 5] == 0 and folded[0][2, 5] > 80


def test_old_config_without_stem_loads_as_pixels() -> None:
    cfg = UNetConfig.from_dict({k: v for k, v in UNetConfig(space_to_depth=2).to_dict().items() if k != "stem"})
    assert cfg.stem == "pixels"
    assert build_model(cfg).stem[0][0].in_channels == 4
    with pytest.raises(ValueError, match="stem"):
        build_model(UNetConfig(stem="pooled"))  # type: ignore[arg-type]
    # views without a fold is the plain network
    assert build_model(UNetConfig(stem="views")).stem[0][0].in_channels == 1
