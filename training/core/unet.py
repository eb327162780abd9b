"""A lightweight U-Net for defect segmentation, sized for a 2-core line PC.

Order as in timm: blocks, then the model, then its config and `build_model(cfg)`.
The network takes raw pixels (0..255) and normalises inside the graph with buffers, so
the exported IR carries its own normalisation and the edge feeds frames as they are.
Only static-shape, export-friendly ops (conv, BN, ReLU, max-pool, bilinear upsample, concat, reductions,
pixel (un)shuffle).

`space_to_depth` s > 1 folds each s x s block of pixels into channels before the stem (the
"Focus"/space-to-depth stem of YOLOv5 and TResNet) and upsamples the logits bilinearly back to the
input size: the network runs at 1/s resolution (the cost of `input.scale` = 1/s), yet every input
pixel reaches it, so a blowhole of a few pixels is not averaged away as a resize would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn
from torch.nn import functional as F

Upsample = Literal["bilinear", "nearest"]  # the decoder's x2 upsampling
Stem = Literal["pixels", "views"]  # how space_to_depth folds s x s blocks: raw pixels or mean/min/max


class ConvBNAct(nn.Sequential):
    """3x3 conv (or depthwise-separable: 3x3 depthwise + 1x1 pointwise), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, separable: bool = False) -> None:
        if separable and cin > 1:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=False),
            ]
        else:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        super().__init__(*layers, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """The U-Net stage: two conv blocks, with optional dropout between them."""

    def __init__(self, cin: int, cout: int, separable: bool = False, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [ConvBNAct(cin, cout, separable)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers.append(ConvBNAct(cout, cout, separable))
        super().__init__(*layers)


class Up(nn.Module):
    """Upsample x2 (bilinear or nearest), concatenate the skip connection, fuse with a DoubleConv.

    Nearest is the cheaper choice for training on a CPU: the backward pass of a bilinear
    upsample was 12 % of a whole U-Net step here (profiled), and the 3x3 fuse convs that follow
    smooth the blocky result anyway.
    """

    def __init__(self, cin: int, cskip: int, cout: int, separable: bool = False, dropout: float = 0.0,
                 mode: Upsample = "bilinear") -> None:
        super().__init__()
        self.mode = mode
        self.align_corners = False if mode == "bilinear" else None  # nearest takes no align_corners
        self.fuse = DoubleConv(cin + cskip, cout, separable, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode=self.mode, align_corners=self.align_corners)
        return self.fuse(torch.cat([x, skip], dim=1))


class UNetOutput(NamedTuple):
    """What the network returns in training mode (see the module docstring)."""

    logits: torch.Tensor  # [N, 1, H, W]
    aux: list[torch.Tensor]  # deep-supervision logits upsampled to H x W ([] without)
    part: torch.Tensor | None  # [N, 1] part logit per input (None without a decision head)


class DecisionHead(nn.Module):
    """Part logit from the bottleneck features and the pooled segmentation logits (~1.6k parameters).

    Features: 1x1 conv (cin -> width) + ReLU, global average and max; the segmentation logits'
    global max and average join them (they carry the "is there a strong spot" evidence), then one
    linear layer. Pooling is global, so the head works for any tile size.
    """

    def __init__(self, cin: int, width: int = 16, detach: bool = True) -> None:
        super().__init__()
        self.detach = detach
        self.conv = nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(2 * width + 2, 1)
        nn.init.constant_(self.fc.bias, -2.0)  # start near "good part", as the pixel head does

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.detach:
            feats, logits = feats.detach(), logits.detach()
        f = self.conv(feats)
        pooled = [f.mean(dim=(2, 3)), f.amax(dim=(2, 3)),
                  logits.amax(dim=(2, 3)), logits.mean(dim=(2, 3))]
        return self.fc(torch.cat(pooled, dim=1))


class UNet(nn.Module):
    """Contracting path, expanding path, skip connections by concatenation.

    Returns a `UNetOutput` in training mode; in eval mode the logits `[N, 1, H, W]`, or
    `(logits, part logits [N, 1])` with a decision head (see the module docstring). Exception: the
    views stem in training mode returns logits (and aux) at body size H/s x W/s, for coarse targets.
    """

    mean: torch.Tensor  # buffers [1, C, 1, 1]: normalisation inside the graph (exported with it)
    std: torch.Tensor

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1))
        s = cfg.space_to_depth
        stem_in = cfg.in_channels * (3 if self.views else s * s)
        self.stem = DoubleConv(stem_in, widths[0], separable=False)
        self.down = nn.ModuleList(
            DoubleConv(widths[i], widths[i + 1], cfg.separable, cfg.dropout if i + 1 == cfg.depth else 0.0)
            for i in range(cfg.depth)
        )
        self.up = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], cfg.separable, mode=cfg.upsample)
            for i in reversed(range(cfg.depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(widths[i], 1, 1) for i in reversed(range(1, cfg.depth))
        ) if cfg.deep_supervision else nn.ModuleList()
        assert self.head.bias is not None  # Conv2d's default bias=True
        nn.init.constant_(self.head.bias, cfg.head_bias)
        self.decision = DecisionHead(widths[-1], detach=cfg.decision_detach) if cfg.decision_head else None

    @property
    def views(self) -> bool:
        """Pooled-views stem active (it needs a fold, s > 1)."""
        return self.cfg.stem == "views" and self.cfg.space_to_depth > 1

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> normalised stem input (at 1/s resolution when space_to_depth s > 1)."""
        s = self.cfg.space_to_depth
        if self.views:  # reduce raw pixels first: the affine normalisation commutes with mean/min/max
            # per channel: unshuffle the block into s*s channels and reduce over them; in OpenVINO this
            # ran in 3.8 ms per 640 px tile against 7.0 ms for avg_pool + two max_pools (FP32, same CPU)
            n, c, h, w = x.shape
            u = F.pixel_unshuffle(x, s).reshape(n, c, s * s, h // s, w // s)
            views = [u.mean(2), u.amin(2), u.amax(2)]
            return torch.cat([(v - self.mean) / self.std for v in views], dim=1)
        x = (x - self.mean) / self.std
        return F.pixel_unshuffle(x, s) if s > 1 else x

    def forward(self, x: torch.Tensor) -> Any:
        size = x.shape[-2:]
        x = self.fold(x)
        coarse = self.training and self.views  # trains on coarse targets: outputs stay at body size
        if coarse:
            size = x.shape[-2:]
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        bottleneck = y
        aux: list[torch.Tensor] = []
        for i, up in enumerate(self.up):
            y = up(y, skips.pop())
            if self.training and self.aux_heads and i < len(self.aux_heads):
                aux.append(F.interpolate(self.aux_heads[i](y), size=size, mode="bilinear",
                                         align_corners=False))
        logits = self.head(y)
        # the head pools the body-resolution logits: the same in training and in eval/export
        part = self.decision(bottleneck, logits) if self.decision is not None else None
        # the views model's map stays at body resolution in eval/export too (package output_stride s):
        # the edge blends the coarse tiles and resizes once, instead of an in-graph upsample that
        # cost 1.4-3.2x the whole model per tile (docs/benchmarks.md, issue 15)
        if self.cfg.space_to_depth > 1 and not self.views:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.training:
            return UNetOutput(logits, aux, part)
        return logits if part is None else (logits, part)


@dataclass
class UNetConfig:
    """Size and options of the network; stored in every checkpoint so it rebuilds alone."""

    in_channels: int = 1
    base_width: int = 16
    depth: int = 4  # number of 2x downsamplings; input sides must be multiples of `stride`
    max_width: int = 96  # caps the deep stages: default ~0.8M parameters
    separable: bool = False
    dropout: float = 0.1
    deep_supervision: bool = False
    mean: list[float] = field(default_factory=lambda: [127.5])
    std: list[float] = field(default_factory=lambda: [64.0])
    head_bias: float = -4.0  # start predicting "no defect" (defects are rare): stable early training
    space_to_depth: int = 1  # fold s x s pixel blocks into channels: runs at 1/s resolution, sees every pixel
    upsample: Upsample = "bilinear"  # nearest is cheaper to train on a CPU
    decision_head: bool = False  # part logit per tile (False: checkpoints from before it load unchanged)
    decision_detach: bool = True  # the head's loss trains the head only (gradient-flow adjustment)
    stem: Stem = "pixels"  # with space_to_depth > 1: raw pixel channels or mean/min/max views per block

    def widths(self) -> list[int]:
        return [min(self.base_width * 2**i, self.max_width) for i in range(self.depth + 1)]

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return network_stride(self.depth, self.space_to_depth)

    @property
    def output_stride(self) -> int:
        """The eval/exported map comes out at input / this (the views stem keeps it at body size)."""
        return network_output_stride(self.stem, self.space_to_depth)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def network_output_stride(stem: str, space_to_depth: int) -> int:
    """The one rule for the package's output_stride: the views stem's map stays at body resolution."""
    return space_to_depth if stem == "views" and space_to_depth > 1 else 1


def network_stride(depth: int, space_to_depth: int = 1) -> int:
    """Total downsampling of the network: the one rule for valid patch and tile sides."""
    return 2**depth * space_to_depth


def build_model(cfg: UNetConfig) -> UNet:
    if cfg.space_to_depth not in (1, 2, 4):
        raise ValueError(f"model space_to_depth must be 1, 2 or 4, got {cfg.space_to_depth}")
    if cfg.stem not in get_args(Stem):
        raise ValueError(f"model stem must be 'pixels' or 'views', got {cfg.stem!r}")
    if cfg.upsample not in get_args(Upsample):
        raise ValueError(f"model upsample must be 'bilinear' or 'nearest', got {cfg.upsample!r}")
    if len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
        raise ValueError(f"model mean/std need {cfg.in_channels} value(s)")
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
