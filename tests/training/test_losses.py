"""Losses with values that can be checked by hand, and the class-imbalance knobs."""

from __future__ import annotations

import math

import pytest
import torch

from training.core.losses import SegmentationLoss, bce_loss, dice_loss, focal_loss, peak_loss

BIG = 30.0  # a logit this large is a certain prediction


def _target() -> torch.Tensor:
    t = torch.zeros(2, 1, 8, 8)
    t[0, 0, 2:4, 2:5] = 1
    return t


def test_perfect_prediction_costs_nothing() -> None:
    t = _target()
    logits = (t * 2 - 1) * BIG
    for name in ("bce", "dice", "bce_dice", "focal", "focal_dice"):
        assert float(SegmentationLoss(name)(logits, t)) == pytest.approx(0.0, abs=1e-6), name


def test_hand_checked_values() -> None:
    t = _target()
    zero = torch.zeros_like(t)
    assert float(bce_loss(zero, t)) == pytest.approx(math.log(2))  # p = 0.5 everywhere
    # focal at p = 0.5: ln2 x 0.5**2 x (alpha on positives, 1 - alpha on negatives)
    pos = float(t.mean())
    want = math.log(2) * 0.25 * (0.25 * pos + 0.75 * (1 - pos))
    assert float(focal_loss(zero, t, gamma=2.0, alpha=0.25)) == pytest.approx(want, rel=1e-5)
    # all wrong: dice ~ 1
    assert float(dice_loss((1 - 2 * t) * BIG, t)) == pytest.approx(1.0, abs=1e-2)
    # p = 0.5 everywhere: dice = 1 - (2 * 0.5 * P + 1) / (0.5 * N + P + 1)
    n, p = t.numel(), float(t.sum())
    assert float(dice_loss(zero, t)) == pytest.approx(1 - (p + 1) / (0.5 * n + p + 1), rel=1e-5)


def test_empty_masks_do_not_explode() -> None:
    t = torch.zeros(4, 1, 16, 16)
    assert float(dice_loss(torch.full_like(t, -BIG), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(torch.full_like(t, BIG), t)) > 0.99  # flagging a good part is punished


def test_pos_weight_counts_defect_pixels_more() -> None:
    t = _target()
    zero = torch.zeros_like(t)
    pos, n = float(t.sum()), t.numel()
    # mean over pixels of ln2 x (w on positives, 1 on negatives)
    assert float(bce_loss(zero, t, pos_weight=10.0)) == pytest.approx(math.log(2) * (10 * pos + n - pos) / n)
    # predicting "all good" costs far more with a high pos_weight: imbalance is countered
    allgood = torch.full_like(t, -5.0)
    assert float(bce_loss(allgood, t, 20.0)) > 5 * float(bce_loss(allgood, t, 1.0))


def test_focal_down_weights_easy_pixels() -> None:
    t = _target()
    easy = (t * 2 - 1) * 3.0  # correct with p ~ 0.95
    assert float(focal_loss(easy, t, alpha=None)) < 0.01 * float(bce_loss(easy, t))


def test_deep_supervision_adds_weighted_aux_losses() -> None:
    t = _target()
    main = (t * 2 - 1) * BIG  # perfect
    aux = [torch.zeros_like(t), torch.zeros_like(t)]  # p = 0.5: ln2 each with bce
    loss = SegmentationLoss("bce", aux_weight=0.4)
    assert float(loss((main, aux), t)) == pytest.approx(0.4 * math.log(2), rel=1e-5)
    assert float(SegmentationLoss("bce", aux_weight=0.0)((main, aux), t)) == pytest.approx(0.0, abs=1e-6)
    # gradients reach the aux outputs
    a = torch.zeros_like(t, requires_grad=True)
    loss((main, [a]), t).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_peak_loss_is_bce_of_each_patch_peak_against_its_label() -> None:
    t = _target()  # sample 0 holds a defect, sample 1 is good
    logits = torch.full_like(t, -6.0)
    logits[0, 0, 7, 7] = 1.0  # defective patch: peak 1.0, and not on the defect
    logits[1, 0, 0, 3] = 2.0  # good patch: a confident false spot
    want = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0)))
    assert float(peak_loss(logits, t)) == pytest.approx(want, rel=1e-6)


def test_image_term_adds_gradient_only_at_each_peak() -> None:
    t = _target()
    base = torch.full_like(t, -6.0)
    base[1, 0, 5, 6] = 3.0  # the false spot on the good patch
    grads = {}
    for w in (0.0, 2.0):
        x = base.clone().requires_grad_(True)
        SegmentationLoss("bce_dice", image_weight=w)(x, t).backward()
        assert x.grad is not None
        grads[w] = x.grad
    extra = grads[2.0] - grads[0.0]  # d(w x mean BCE(peak))/d logit, batch of 2
    sig = lambda v: torch.sigmoid(torch.tensor(v)).item()  # noqa: E731
    # the good patch: its false spot is pushed down, no other pixel is touched
    assert float(extra[1, 0, 5, 6]) == pytest.approx(2.0 * sig(3.0) / 2, rel=1e-4)
    elsewhere = torch.ones_like(extra[1], dtype=torch.bool)
    elsewhere[0, 5, 6] = False
    assert float(extra[1][elsewhere].abs().max()) == pytest.approx(0.0, abs=1e-7)
    # the defective patch is flat at -6 (all pixels tie for the peak): its peak is pushed up
    assert float(extra[0].sum()) == pytest.approx(2.0 * (sig(-6.0) - 1) / 2, rel=1e-4)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="loss name"):
        SegmentationLoss("l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pos_weight"):
        SegmentationLoss("bce", pos_weight=0.0)
    with pytest.raises(ValueError, match="image_weight"):
        SegmentationLoss("bce", image_weight=-1.0)


def test_decision_term_trains_the_part_logit_only_through_its_output() -> None:
    """decision_weight adds BCE(part logit, patch holds a defect) for a UNetOutput; plain logits and
    (logits, aux) outputs give the same loss as before."""
    from training.core.losses import SegmentationLoss, decision_loss
    from training.core.unet import UNetOutput

    logits = torch.full((2, 1, 8, 8), -3.0)
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2, 2] = 1.0
    part = torch.tensor([[2.0], [-2.0]], requires_grad=True)  # right on both patches
    plain = SegmentationLoss(decision_weight=1.0)(logits, target)
    assert torch.allclose(SegmentationLoss(decision_weight=1.0)((logits, []), target), plain)
    with_part = SegmentationLoss(decision_weight=1.0)(UNetOutput(logits, [], part), target)
    assert torch.allclose(with_part - plain, decision_loss(part, target))
    assert torch.allclose(SegmentationLoss(decision_weight=0.0)(UNetOutput(logits, [], part), target), plain)
    wrong = decision_loss(torch.tensor([[-2.0], [2.0]]), target)
    assert float(wrong) > float(decision_loss(part.detach(), target)) + 1.0


def test_component_term_pushes_the_peak_of_every_defect_component() -> None:
    """A patch with a large break and a faint blowhole: the image term trains only the break's peak (the
    patch's highest logit); the component term also pushes the blowhole's own peak, and nothing else."""
    from training.core.losses import component_loss, component_peaks

    t = torch.zeros(2, 1, 16, 16)
    t[0, 0, 2:6, 2:12] = 1  # the large break
    t[0, 0, 12, 13] = 1  # a one-pixel blowhole, apart from it
    t[1, 0, 9:11, 3:5] = 1  # another patch, one component
    logits = torch.full_like(t, -6.0)
    logits[0, 0, 3, 4] = 5.0  # the break is found ...
    logits[0, 0, 12, 13] = -4.0  # ... the blowhole is not
    logits[1, 0, 10, 4] = 1.0
    peaks = component_peaks(logits, t)
    assert sorted(peaks.tolist()) == [-4.0, 1.0, 5.0]  # one peak per component, over the batch

    def extra_grad(**weights: float) -> torch.Tensor:
        grads = []
        for w in (0.0, 1.0):
            x = logits.clone().requires_grad_(True)
            SegmentationLoss("bce_dice", **{k: w * v for k, v in weights.items()})(x, t).backward()
            assert x.grad is not None
            grads.append(x.grad)
        return grads[1] - grads[0]

    image = extra_grad(image_weight=1.0)
    assert float(image[0, 0, 12, 13]) == pytest.approx(0.0, abs=1e-7)  # the image term never sees the blowhole
    comp = extra_grad(component_weight=1.0)
    want = (torch.sigmoid(torch.tensor(-4.0)) - 1) / 3  # mean over the batch's 3 components
    assert float(comp[0, 0, 12, 13]) == pytest.approx(float(want), rel=1e-4)
    touched = comp != 0
    assert int(touched.sum()) == 3 and bool(touched[0, 0, 3, 4]) and bool(touched[1, 0, 10, 4])
    # a batch without defects adds nothing, and still backpropagates
    x = logits.clone().requires_grad_(True)
    loss = component_loss(x, torch.zeros_like(t))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad is not None and float(x.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="component_weight"):
        SegmentationLoss("bce", component_weight=-1.0)
