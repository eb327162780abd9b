#!/usr/bin/env python3
"""Training-step benchmark: how many steps a minute the recipe's network gets on this CPU.

    .venv/bin/python scripts/bench_train_step.py --config RUN_DIR/config.yaml [--rounds 5]

With a time budget, steps per minute decide how far a run gets, so layout and decoder choices are
measured here side by side, in one process, rounds interleaved (the machine is shared and noisy):

  nchw/bilinear   the layout and decoder before NHWC training (the reference, ratio 1.00)
  nhwc/bilinear   what `train` does now with model.upsample = bilinear
  nhwc/nearest    the same with model.upsample = nearest

Each step is a real training step of the config's model, loss, optimiser and autocast setting on
random patches of the config's size and batch: forward, loss, backward, clip, AdamW. Prints the
median ms per step and the ratio to the reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.core.losses import build_loss  # noqa: E402
from training.core.train_config import TrainConfig, load_config  # noqa: E402
from training.core.train_utils import autocast_dtype, train_step  # noqa: E402
from training.core.unet import UNetConfig, build_model  # noqa: E402

VARIANTS = {"nchw/bilinear": (False, "bilinear"), "nhwc/bilinear": (True, "bilinear"),
            "nhwc/nearest": (True, "nearest")}


def make_step(cfg: TrainConfig, channels_last: bool, upsample: str) -> Callable[[], object]:
    """One training step of the config's network (train.py's own `train_step`) on fixed random patches."""
    torch.manual_seed(0)
    model = build_model(UNetConfig(**{**cfg.model.model_dump(), "upsample": upsample})).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay)
    loss_fn = build_loss(cfg.loss)
    amp = autocast_dtype(cfg.optim.autocast)
    size, batch = cfg.patches.size, cfg.patches.batch_size
    x = (torch.rand(batch, 1, size, size) * 255).contiguous(memory_format=fmt)
    target = size // model.cfg.space_to_depth if model.views else size  # the views stem trains on coarse targets
    y = (torch.rand(batch, 1, target, target) > 0.97).float()

    return lambda: train_step(model, optimizer, loss_fn, x, y, amp, cfg.optim.grad_clip)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True,
                    help="a training config with explicit sides, e.g. RUN_DIR/config.yaml of a run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over rounds)")
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if cfg.auto_fields():  # chosen from the data at train time (training/core/recipe_auto.py): no data here
        print(f"error: {args.config}: {', '.join(cfg.auto_fields())} are 'auto'; pass a run's RUN_DIR/config.yaml "
              f"(it holds the numbers chosen) or a config with explicit values", file=sys.stderr)
        return 2
    amp = autocast_dtype(cfg.optim.autocast)
    print(f"{args.config}: {cfg.patches.batch_size} x {cfg.patches.size} px patches, "
          f"{'bf16 autocast' if amp else 'fp32'}, {torch.get_num_threads()} thread(s)")
    steps = {name: make_step(cfg, *v) for name, v in VARIANTS.items()}
    for step in steps.values():  # warm-up: oneDNN picks and caches its kernels
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps)
    ref = statistics.median(times["nchw/bilinear"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14s} {med * 1000:7.1f} ms/step  ratio {med / ref:.2f}  ({60 / med:,.0f} steps/min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
