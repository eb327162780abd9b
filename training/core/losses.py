"""Segmentation losses for rare, small defects.

Defect pixels are often well under 1 % of a part, so plain BCE is dominated by the easy
background and a network can score a low loss by predicting "no defect" everywhere. The
usual remedies, all available here and selected by name from the training config:

- `bce` with `pos_weight` > 1: each defect pixel counts as `pos_weight` background pixels.
- `dice`: soft Dice over the whole batch, indifferent to how much background there is.
  Computed per batch rather than per image so all-good patches (empty masks) do not make
  it explode or vanish.
- `focal`: down-weights well-classified pixels (gamma) and balances classes (alpha).
- `bce_dice` / `focal_dice`: a pixel-wise term for calibrated probabilities plus Dice for
  overlap; the usual robust default.

Image term (`image_weight` > 0): a part is judged by the peak of its map (edge.postprocess),
but a pixel loss averages over ~10^4 pixels, so one confident false spot on a good part, or
a faint small defect, barely moves it. The image term is BCE between each patch's highest
logit and whether the patch holds any defect pixel: it trains the very statistic that ranks
parts (multiple-instance learning with max pooling), at no cost in the exported graph.

Component term (`component_weight` > 0): the image term pushes a patch's single highest logit, so
on a part with a large break and a small blowhole only the break is trained to peak. The line's
recall is decided by those weakest components (a 35 px blowhole scoring 0.05 sets the threshold
that flags most good parts). The component term is BCE between the highest logit inside *each*
defect component of the target and "defect", averaged over the components of the batch: every
blowhole must reach a peak of its own, whatever else the patch holds. It is hard-positive mining
done by the loss, on every patch, and adds nothing to the exported graph.

Deep supervision: the model may return `(logits, [aux logits])`; the aux losses are averaged
and added with weight `aux_weight`, so coarse decoder stages learn to localise early on.

Decision term (`decision_weight` > 0, model with a decision head): BCE of the head's part logit
against the same per-patch label as the image term. The output may be a `training.core.unet.UNetOutput`
(logits, aux, part) or the older `(logits, aux)` / plain logits.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LossName = Literal["bce", "dice", "bce_dice", "focal", "focal_dice"]
LOSS_NAMES: tuple[str, ...] = ("bce", "dice", "bce_dice", "focal", "focal_dice")


def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy on logits; `pos_weight` scales the loss of defect pixels."""
    pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch. `smooth` keeps an all-empty batch at ~0 loss."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    denom = prob.sum() + target.sum()
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = 0.25) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): BCE scaled by (1 - p_t)^gamma, optionally alpha-balanced."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def patch_labels(target: torch.Tensor) -> torch.Tensor:
    """[N] 1.0 where the sample holds any defect pixel: the label of the part decision."""
    return (target.flatten(1).amax(dim=1) > 0).float()


def decision_loss(part_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the decision head's part logit ([N, 1] or [N]) vs. "the sample holds a defect pixel"."""
    part = part_logits.reshape(-1).float()
    return F.binary_cross_entropy_with_logits(part, patch_labels(target).to(part.device))


def peak_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of each sample's highest logit against "the sample holds a defect pixel".

    Only the peak pixel of each sample gets a gradient: pushed down on good patches (the
    confident false spot), up on defective ones (the faint defect's strongest pixel).
    """
    peak = logits.flatten(1).amax(dim=1)
    label = (target.flatten(1).amax(dim=1) > 0).to(peak.dtype)
    return F.binary_cross_entropy_with_logits(peak, label)


def component_peaks(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The highest logit inside each 8-connected defect component of `target` ([N,1,H,W]): a 1-D tensor.

    Components are labelled on the CPU with OpenCV (a 96 x 96 coarse target costs ~20 us), and the
    peaks are gathered with one masked max per sample, so the gradient reaches each component's peak.
    """
    peaks: list[torch.Tensor] = []
    binary = (target.detach()[:, 0] > 0.5).to("cpu").numpy().astype(np.uint8)
    for i in range(binary.shape[0]):
        if not binary[i].any():
            continue
        n, labels = cv2.connectedComponents(binary[i], connectivity=8)
        lab = torch.from_numpy(labels.astype(np.int64)).to(logits.device)
        onehot = lab[None] == torch.arange(1, n, device=logits.device)[:, None, None]  # [K, H, W]
        masked = logits[i, 0][None].float().masked_fill(~onehot, float("-inf"))
        peaks.append(masked.flatten(1).amax(dim=1))
    return torch.cat(peaks) if peaks else logits.new_zeros(0)


def component_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of every defect component's peak logit against "defect" (0 when the batch has none)."""
    peaks = component_peaks(logits, target)
    if peaks.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(peaks, torch.ones_like(peaks))


class SegmentationLoss(nn.Module):
    """One configured loss, applied to the main output and (weighted) to deep-supervision outputs."""

    def __init__(self, name: LossName = "bce_dice", pos_weight: float = 1.0, dice_weight: float = 1.0,
                 focal_gamma: float = 2.0, focal_alpha: float | None = 0.25, aux_weight: float = 0.4,
                 image_weight: float = 0.0, decision_weight: float = 0.0,
                 component_weight: float = 0.0) -> None:
        super().__init__()
        if name not in LOSS_NAMES:
            raise ValueError(f"loss name must be one of {', '.join(LOSS_NAMES)}, got {name!r}")
        if pos_weight <= 0 or min(dice_weight, aux_weight, focal_gamma, image_weight, decision_weight,
                                  component_weight) < 0:
            raise ValueError("pos_weight must be > 0; dice_weight, aux_weight, focal_gamma, image_weight, "
                             "decision_weight and component_weight >= 0")
        self.name = name
        self.pos_weight = pos_weight
        self.dice_weight = dice_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.aux_weight = aux_weight
        self.image_weight = image_weight
        self.decision_weight = decision_weight
        self.component_weight = component_weight

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one logits map (no deep supervision)."""
        if self.name == "dice":
            return dice_loss(logits, target)
        if self.name in ("bce", "bce_dice"):
            pixel = bce_loss(logits, target, self.pos_weight)
        else:
            pixel = focal_loss(logits, target, self.focal_gamma, self.focal_alpha)
        if self.name.endswith("_dice"):
            return pixel + self.dice_weight * dice_loss(logits, target)
        return pixel

    def forward(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """`output`: plain logits, `(logits, aux)` or `UNetOutput(logits, aux, part)`."""
        part = None
        if isinstance(output, (tuple, list)):
            logits, aux, *rest = output
            part = rest[0] if rest else None
        else:
            logits, aux = output, ()
        loss = self.single(logits, target)
        if aux and self.aux_weight > 0:
            loss = loss + self.aux_weight * torch.stack([self.single(a, target) for a in aux]).mean()
        if self.image_weight > 0:
            loss = loss + self.image_weight * peak_loss(logits, target)
        if self.component_weight > 0:
            loss = loss + self.component_weight * component_loss(logits, target)
        if part is not None and self.decision_weight > 0:
            loss = loss + self.decision_weight * decision_loss(part, target)
        return loss


def build_loss(cfg: Any) -> SegmentationLoss:
    """Loss from the `loss:` section of the training config (any object with those attributes)."""
    return SegmentationLoss(name=cfg.name, pos_weight=cfg.pos_weight, dice_weight=cfg.dice_weight,
                            focal_gamma=cfg.focal_gamma, focal_alpha=cfg.focal_alpha,
                            aux_weight=cfg.aux_weight, image_weight=cfg.image_weight,
                            decision_weight=getattr(cfg, "decision_weight", 0.0),
                            component_weight=getattr(cfg, "component_weight", 0.0))
