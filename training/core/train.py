"""Train the defect U-Net on full-resolution patches and write self-describing checkpoints.

    python -m training train --config configs/train/magnetic-tile.yaml --data DIR --out RUN_DIR \
        [--time-budget MINUTES] [--epochs N] [--resume] [--init-from CKPT] [--extra-data DIR] [--seed S] [--tta]
        [--set K=V]
    torchrun --nproc_per_node 2 -m training train ...      # data-parallel on CPU (gloo)

One loop, in order: setup, data, model, then per epoch: mine hard negatives, train steps,
validate (the edge's own tiling -> calibrate threshold/min area -> metrics), checkpoint, log.
RUN_DIR gets best.pt (best combined score), last.pt (+ optimizer/rng state for --resume),
log.csv, tb/, curves.png, val_grid.png, summary.json and config.yaml.

With a time budget the lr schedule runs on elapsed time, so a short run still anneals to a
low lr before its final validation. Under torchrun every rank trains on its own patch
stream; rank 0 alone validates, logs and saves, and broadcasts the stop decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from edge.contract import InputSpec, PostprocessParams
from edge.preprocess import scale_image, scale_mask
from training.core.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from training.core.data import DataError, load_dataset, merge_datasets, split_holdout
from training.core.losses import build_loss
from training.core.patches import (
    HardNegative,
    PatchDataset,
    mine_hard_negatives,
    mine_hard_positives,
    update_pool,
)
from training.core.recipe_auto import resolve_auto
from training.core.train_config import ConfigError, TrainConfig, fixed, load_config, parse_overrides
from training.core.train_utils import (
    Clock,
    Overhead,
    RunLog,
    autocast_dtype,
    broadcast,
    detect_color,
    load_images,
    lr_at,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    speed_report,
    train_step,
    validate,
)
from training.core.unet import UNet, UNetConfig, build_model, count_parameters, network_output_stride


@dataclass
class TrainResult:
    """What a run achieved; on DDP ranks other than 0 only `stopped` is filled in."""

    run_dir: Path
    best_path: Path | None = None
    last_path: Path | None = None
    best_score: float = float("-inf")
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    elapsed_s: float = 0.0
    stopped: str = ""
    overhead_pct: float | None = None  # validation + mining, % of the run (time budgets only)
    test_metrics: dict[str, Any] = field(default_factory=dict)  # best.pt on the held-out parts


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, init_from: str | Path | None = None,
          extra_data: Sequence[str | Path] = ()) -> TrainResult:
    """Run one training as configured; raises ConfigError/DataError/CheckpointError on bad input.
    `extra_data`: more dataset folders joined to data.root before the split (e.g. reviewed parts)."""
    # ---------------------------------------------------------------- setup
    t_start = time.monotonic()  # a time budget covers data loading too
    d = setup_distributed()
    out = Path(out)
    torch.set_num_threads(cfg.log.threads or max(1, (os.cpu_count() or 1) // d.world))
    seed_everything(cfg.seed + d.rank)
    say = print if d.main else (lambda *a, **k: None)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    last_path, best_path = out / "last.pt", out / "best.pt"

    # ---------------------------------------------------------------- data
    if not cfg.data.root:
        raise ConfigError("no dataset: pass --data DIR (or set data.root in the config)")
    dataset = load_dataset(cfg.data.root, strict=cfg.data.strict)
    say(f"data: {cfg.data.root}: {dataset.summary()}")
    for root in extra_data:
        extra = load_dataset(root, strict=cfg.data.strict)
        say(f"extra data: {root}: {extra.summary()}")
        dataset = merge_datasets(dataset, extra)
    for path, reason in dataset.skipped[:5]:
        say(f"  skipped {path}: {reason}")
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    split = split_holdout(dataset.samples, cfg.data.val_fraction, cfg.data.test_fraction, split_seed)
    train_s, val_s, test_s = split.train, split.val, split.test
    if not train_s or not val_s:
        raise DataError(f"{cfg.data.root}: too few images for a train/val split ({len(dataset.samples)})")
    color = detect_color(dataset.samples) if cfg.input.color == "auto" else cfg.input.color
    channels = 1 if color == "gray" else 3
    train_images, train_masks = load_images(train_s, color)
    val_images, val_masks = load_images(val_s, color)
    cfg, why = resolve_auto(cfg, train_images, train_masks, [s.category for s in train_s], len(val_s))
    if why and d.main:  # the recipe chose from the data: say what and why; config.yaml keeps the numbers
        say("auto recipe:\n  " + "\n  ".join(why))
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    spec = InputSpec(color=color, tile=fixed(cfg.input.tile, "input.tile"), overlap=cfg.input.overlap,
                     scale=fixed(cfg.input.scale, "input.scale"),
                     multiple_of=cfg.model.stride, output_stride=network_output_stride(cfg.model.stem, int(cfg.model.space_to_depth)),
                     mean=tuple(cfg.input.mean or [127.5] * channels), std=tuple(cfg.input.std or [64.0] * channels))
    try:
        spec.validate()
    except ValueError as e:
        raise ConfigError(f"input: {e}") from None
    # patches and mining work at model scale; validation predicts full frames through the edge
    train_images = [scale_image(im, spec.scale) for im in train_images]
    train_masks = [scale_mask(m, spec.scale) for m in train_masks]
    fingerprint = dataset.fingerprint()
    say(f"split: {len(train_s)} train / {len(val_s)} calibration / {len(test_s)} held-out test "
        f"(val_fraction {cfg.data.val_fraction}, test_fraction {cfg.data.test_fraction}, seed {split_seed}), "
        f"color {color}")

    # ---------------------------------------------------------------- model, loss, optimizer
    mcfg = UNetConfig(in_channels=channels, mean=list(spec.mean), std=list(spec.std), **cfg.model.model_dump())
    init_state = None
    if init_from is not None:  # fine-tune: the checkpoint's architecture and weights, new data
        init_model, init_meta = load_model(init_from)
        if init_meta.model_config.in_channels != channels:
            raise CheckpointError(f"{init_from}: model has {init_meta.model_config.in_channels} input channel(s) "
                                  f"but the data is {color}; set input.color to match")
        mcfg = UNetConfig.from_dict({**init_meta.model_config.to_dict(), "mean": list(spec.mean),
                                     "std": list(spec.std), "dropout": cfg.model.dropout,
                                     "deep_supervision": cfg.model.deep_supervision,
                                     "decision_head": cfg.model.decision_head,
                                     "decision_detach": cfg.model.decision_detach})
        init_state = init_model.state_dict()
        say(f"init-from {init_from}: {init_meta.name} {init_meta.version} (epoch {init_meta.epoch})")
    unet = build_model(mcfg)
    if init_state is not None:
        missing, unexpected = unet.load_state_dict(init_state, strict=False)
        bad = [k for k in [*missing, *unexpected] if not k.startswith(("aux_heads.", "decision."))]
        if bad:
            raise CheckpointError(f"{init_from}: weights do not fit the model: {', '.join(bad[:5])}")
    # NHWC is the layout oneDNN's CPU convolutions run fastest in: a step took 0.75x the time of
    # NCHW here, in bf16 and in fp32 alike (scripts/bench_train_step.py); the maths is the same up to rounding
    raw_model = unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    model: torch.nn.Module = raw_model  # what trains: raw_model, or its DDP wrapper
    loss_fn = build_loss(cfg.loss)
    opt_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    amp = autocast_dtype(cfg.optim.autocast)
    say(f"model: {count_parameters(model) / 1e6:.3f}M parameters, widths {mcfg.widths()}, "
        f"{d.world} process(es) x {torch.get_num_threads()} thread(s), "
        f"forward in {'bf16 (autocast)' if amp else 'fp32'}, input scale {spec.scale}")

    # ---------------------------------------------------------------- resume
    params, metrics = PostprocessParams(), {}  # of the latest validation
    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "best_score": float("-inf"),
                             "best_epoch": 0, "bad_validations": 0, "pool": [], "best_metrics": {}}
    ts: dict[str, Any] = {}  # the training state of the run being resumed
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: nothing to resume (no last.pt in {out})")
        payload = read_checkpoint(last_path)
        ts = payload.get("training_state") or {}
        raw_model.load_state_dict(ts.get("raw_state_dict") or payload["state_dict"])
        optimizer.load_state_dict(ts["optimizer"])
        set_rng_state(ts.get("rng", {}) if d.main else {})
        state.update({k: ts[k] for k in state if k in ts})
        params, metrics = PostprocessParams.from_dict(payload["postprocess"]), payload.get("metrics", {})
        if payload.get("data_fingerprint") != fingerprint:
            say("warning: the data differs from the run being resumed (fingerprint changed)")
        say(f"resume: {last_path} after epoch {state['epoch']} (step {state['step']})")
    # the weight average is what gets validated, calibrated and saved; the raw weights train on.
    # BN statistics are averaged too (use_buffers), so the average needs no extra BN pass
    ema = (AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema), use_buffers=True)
           if cfg.optim.ema else None)
    if ema is not None and "raw_state_dict" in ts:
        ema.module.load_state_dict(payload["state_dict"])
        ema.n_averaged.fill_(1)
    eval_model = cast(UNet, ema.module) if ema is not None else raw_model
    if d.ddp:
        model = DistributedDataParallel(raw_model)  # also makes rank 0's initial weights everyone's

    # ---------------------------------------------------------------- patches
    pc = cfg.patches
    patch = fixed(pc.size, "patches.size")
    patches = PatchDataset(train_images, train_masks, patch, pc.per_epoch, pc.defect_fraction,
                           pc.hard_negative_fraction, pc.jitter, pc.augment, seed=cfg.seed, rank=d.rank,
                           world_size=d.world, target_stride=mcfg.space_to_depth if raw_model.views else 1,
                           hard_positive_fraction=pc.hard_positive_fraction)
    pool = [HardNegative(*t) for t in state["pool"]]
    patches.set_hard_negatives(pool)
    batch = max(1, pc.batch_size // d.world)
    loader = DataLoader(patches, batch_size=batch, num_workers=pc.workers, drop_last=True)
    steps_per_epoch = max(1, len(patches) // batch)
    budget_s = cfg.schedule.time_budget_min * 60 if cfg.schedule.time_budget_min else None
    clock = Clock(cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch, budget_s,
                  elapsed_s=state["elapsed_s"] + time.monotonic() - t_start)
    # with a time budget, validation and mining are spaced out to stay within overhead_share of it
    overhead = Overhead(cfg.schedule.overhead_share) if budget_s else None
    log = RunLog(out, cfg.log.tensorboard, resume) if d.main else None
    train_config = {**cfg.to_yaml_dict(), "val_fraction": cfg.data.val_fraction,
                    "test_fraction": cfg.data.test_fraction, "seed": split_seed, "model_seed": cfg.seed,
                    "data_root": str(cfg.data.root), "world_size": d.world,
                    "train_names": [s.name for s in train_s], "val_names": [s.name for s in val_s],
                    "test_names": [s.name for s in test_s]}

    def meta(epoch: int, step: int, p: PostprocessParams, m: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(name=cfg.name, version=cfg.version, model_config=mcfg, input_spec=spec,
                              postprocess=p, metrics=m, data_fingerprint=fingerprint,
                              train_config=train_config, epoch=epoch, step=step)

    # ---------------------------------------------------------------- the loop
    epoch, step, stopped = state["epoch"], state["step"], ""
    lr = lr_at(clock.fraction(step), cfg.optim.lr, cfg.optim.warmup, cfg.optim.min_lr_ratio)  # as logged
    last_val_t, last_val_step = clock.elapsed(), -1
    row_sum, row_n = 0.0, 0  # step losses since the last CSV row: its train_loss covers them all
    best_probs: list[np.ndarray] | None = None  # maps of the best validation, for the final picture
    good_train = [i for i, m in enumerate(train_masks) if not m.any()]
    step_s, run_steps, speed_told = 0.0, 0, False  # time spent in training steps (this process)
    pad = (spec.tile / max(1, spec.tile - spec.overlap)) ** 2  # overlapping tiles predict some pixels twice
    val_pixels = sum(im.shape[0] * im.shape[1] for im in val_images) * spec.scale**2 * pad
    show = cfg.log.progress and d.main
    epoch_bar = tqdm(total=None if budget_s else cfg.schedule.epochs, initial=epoch, desc="epochs", unit="ep",
                     disable=not show)
    while epoch < cfg.schedule.epochs and not stopped:
        patches.set_epoch(epoch)
        # hard negatives: where the current model fires on good training parts (ranks share the work)
        mine = epoch > 0 and pc.hard_negative_fraction > 0 and pc.mine_images > 0 and bool(good_train)
        if mine and overhead is not None:
            mine = overhead.affordable("mine", clock.elapsed())
            mine = broadcast(mine, d) if d.ddp else mine
        if mine and (broadcast(clock.fraction(step), d) if d.ddp else clock.fraction(step)) < 1.0:
            t_mine = time.monotonic()
            rng = np.random.default_rng([cfg.seed, epoch, 7])
            chosen = sorted(rng.choice(good_train, min(pc.mine_images, len(good_train)), replace=False).tolist())
            raw_model.eval()
            found = mine_hard_negatives(raw_model, train_images, chosen[d.rank :: d.world], pc.mine_per_image,
                                        spacing=patch // 4, min_prob=pc.mine_min_prob, stride=mcfg.stride)
            if d.ddp:
                parts: list[Any] = [None] * d.world
                dist.all_gather_object(parts, found)
                found = [h for part in parts for h in part]
            pool = update_pool(pool, found, chosen, pc.pool_size)
            patches.set_hard_negatives(pool)
            if overhead is not None:
                overhead.add("mine", time.monotonic() - t_mine)
        # hard positives: defect components the current model misses (bounded: mine_positive_images)
        mine_pos = epoch > 0 and pc.hard_positive_fraction > 0 and pc.mine_positive_images > 0
        if mine_pos and overhead is not None:
            mine_pos = overhead.affordable("mine_positives", clock.elapsed())
            mine_pos = broadcast(mine_pos, d) if d.ddp else mine_pos
        if mine_pos and patches.defective and (broadcast(clock.fraction(step), d) if d.ddp
                                               else clock.fraction(step)) < 1.0:
            t_mine = time.monotonic()
            rng = np.random.default_rng([cfg.seed, epoch, 11])
            chosen = sorted(rng.choice(patches.defective, min(pc.mine_positive_images, len(patches.defective)),
                                       replace=False).tolist())
            raw_model.eval()
            missed = mine_hard_positives(raw_model, train_images, patches.components, chosen[d.rank :: d.world],
                                         stride=mcfg.stride)
            if d.ddp:
                pos_parts: list[Any] = [None] * d.world
                dist.all_gather_object(pos_parts, missed)
                missed = [h for part in pos_parts for h in part]
            redone = set(chosen)  # images not re-mined this epoch keep their misses
            patches.set_hard_positives([h for h in patches.hard_positives if h.image not in redone] + missed)
            if overhead is not None:
                overhead.add("mine_positives", time.monotonic() - t_mine)
        model.train()
        losses: list[float] = []
        step_bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}", unit="step", leave=False,
                        disable=not show)
        for x, y in loader:
            # rank 0's clock decides the lr and the end of the budget, so all ranks agree
            frac = clock.fraction(step)
            if d.ddp:
                frac = broadcast(frac, d)
            if frac >= 1.0:
                stopped = ("time budget" if budget_s and step < clock.total_steps
                           else "max steps" if cfg.schedule.max_steps else "epochs")
                break
            lr = lr_at(frac, cfg.optim.lr, cfg.optim.warmup, cfg.optim.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = x.contiguous(memory_format=torch.channels_last)
            t_step = time.monotonic()
            loss = train_step(model, optimizer, loss_fn, x, y, amp, cfg.optim.grad_clip)
            step_s += time.monotonic() - t_step
            run_steps += 1
            if ema is not None:
                ema.update_parameters(raw_model)
            step += 1
            losses.append(loss.item())
            step_bar.update(1)
            step_bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2e}")
            if not speed_told and (step_s >= 30.0 or run_steps >= steps_per_epoch) and run_steps >= 20:
                speed_told = True
                line, warning = speed_report(run_steps, step_s, clock, cfg.schedule.usual_steps)
                for text in (line, warning):
                    if text:
                        tqdm.write(text) if show else say(text, flush=True)
                if overhead is not None:  # a forward pass costs about a third of a training step per pixel
                    overhead.expect("validate", val_pixels / (batch * patch**2) * step_s / run_steps / 3)
        step_bar.close()
        row_sum, row_n = row_sum + sum(losses), row_n + len(losses)
        epoch += 1
        epoch_bar.update(1)
        if not losses and stopped:
            epoch -= 1  # the budget ran out before this epoch trained at all
            if step == last_val_step:
                break  # and these weights were validated already
        if epoch >= cfg.schedule.epochs:
            stopped = stopped or "epochs"

        # ------------------------------------------------------------ validate, checkpoint, log
        due = epoch % cfg.schedule.val_every == 0
        if cfg.schedule.val_every_s is not None:
            due = clock.elapsed() - last_val_t >= fixed(cfg.schedule.val_every_s, "schedule.val_every_s")
        if due and overhead is not None:
            due = overhead.affordable("validate", clock.elapsed())
        if d.ddp:
            due = broadcast(due, d)  # every rank takes part in a validation, or none
        v = None
        if due or stopped:
            if d.ddp:  # validate every rank's share with the same weights and BN statistics
                for b in eval_model.buffers():
                    dist.broadcast(b, 0)
            v = validate(eval_model, val_images, val_masks, spec, cfg.validation, d)
            last_val_t, last_val_step = clock.elapsed(), step
        decision: dict[str, Any] = {"stop": stopped}
        if d.main:
            assert log is not None
            if losses:  # an epoch the budget ended before its first step has no loss to log
                log.scalar("train/loss", float(np.mean(losses)), step)
            log.scalar("train/lr", lr, step)
            log.scalar("train/hard_negatives", len(pool), step)
            log.scalar("train/hard_positives", len(patches.hard_positives), step)
        if v is not None:  # rank 0 after a validation
            clock.note_validation(v.seconds)
            if overhead is not None:
                overhead.add("validate", v.seconds)
            params, metrics = v.params, v.metrics
            state["bad_validations"] += 1
            if v.score > state["best_score"]:
                state.update(best_score=v.score, best_epoch=epoch, bad_validations=0, best_metrics=metrics)
                best_probs = v.probs
                save_checkpoint(best_path, eval_model, meta(epoch, step, params, metrics))
            patience = cfg.schedule.patience
            if not decision["stop"] and patience and state["bad_validations"] >= patience:
                decision["stop"] = f"no better score in {patience} validations"
            assert log is not None
            train_loss = row_sum / row_n if row_n else float("nan")
            row_sum, row_n = 0.0, 0
            log.row({"epoch": epoch, "step": step, "time_s": round(clock.elapsed(), 1), "lr": lr,
                     "train_loss": train_loss, "score": v.score, "val_s": round(v.seconds, 1), **metrics})
            msg = (f"epoch {epoch} step {step} {clock.elapsed():.0f}s lr {lr:.2e} loss {train_loss:.4f} | "
                   f"val score {v.score:.4f} iou {metrics['pixel_iou']:.4f} f1 {metrics['image_f1']:.4f} "
                   f"acc {metrics['image_accuracy']:.4f} @ thr {params.pixel_threshold} area {params.min_area} "
                   + (f"part_thr {params.part_threshold:.4g} " if params.part_threshold is not None else "")
                   + f"({v.seconds:.0f}s)")
            if show:
                tqdm.write(msg)
            else:
                print(msg, flush=True)
        if d.main:  # last.pt after every epoch, so --resume loses at most one epoch
            state.update(epoch=epoch, step=step, elapsed_s=clock.elapsed(),
                         pool=[(h.image, h.y, h.x, h.score) for h in pool])
            save_checkpoint(last_path, eval_model, meta(epoch, step, params, metrics), training_state={
                **state, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                **({"raw_state_dict": raw_model.state_dict()} if ema is not None else {}),
                "schedule": {"fraction": clock.fraction(step), "reserve_s": clock.reserve_s}})
        stopped = broadcast(decision, d)["stop"] if d.ddp else decision["stop"]
    epoch_bar.close()

    # ---------------------------------------------------------------- finish (rank 0)
    result = TrainResult(out, epochs=epoch, steps=step, elapsed_s=clock.elapsed(), stopped=stopped or "epochs",
                         overhead_pct=overhead.percent(clock.elapsed()) if overhead is not None else None)
    if d.main:
        assert log is not None
        log.close()
        _finish(out, cfg, spec, val_images, val_masks, val_s, best_probs, result, state, log.csv_path)
        if test_s:
            _report_test(out, spec, test_s, color, result)
    if d.ddp:
        dist.barrier()
    return result


def _finish(out: Path, cfg: TrainConfig, spec: InputSpec, val_images: list[np.ndarray],
            val_masks: list[np.ndarray], val_s: Sequence[Any], best_probs: list[np.ndarray] | None,
            result: TrainResult, state: dict[str, Any], csv_path: Path) -> None:
    """Pictures of the best model and summary.json (rank 0 only)."""
    from training.core.pictures import save_training_curves, save_validation_grid
    from training.core.train_utils import Dist

    best_path = out / "best.pt"
    result.best_path = best_path if best_path.is_file() else None
    result.last_path = out / "last.pt"
    result.best_score, result.best_epoch = state["best_score"], state["best_epoch"]
    result.best_metrics = state["best_metrics"]
    save_training_curves(csv_path, out / "curves.png")
    if result.best_path is not None and cfg.validation.grid_images > 0:
        best, best_meta = load_model(result.best_path)
        result.postprocess = best_meta.postprocess.to_dict()
        if best_probs is None:  # resumed run without a new best: predict again with best.pt
            v = validate(best, val_images, val_masks, spec, cfg.validation, Dist())
            assert v is not None
            best_probs = v.probs
        save_validation_grid(val_images, val_masks, best_probs, best_meta.postprocess, out / "val_grid.png",
                             max_rows=cfg.validation.grid_images, names=[s.name for s in val_s])
    summary = {"run_dir": str(out), "best": str(result.best_path), "best_epoch": result.best_epoch,
               "best_score": result.best_score, "metrics": result.best_metrics, "postprocess": result.postprocess,
               "epochs": result.epochs, "steps": result.steps, "elapsed_s": round(result.elapsed_s, 1),
               "stopped": result.stopped, "overhead_pct": result.overhead_pct, "config": cfg.to_yaml_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"done: {result.stopped}; best epoch {result.best_epoch} score {result.best_score:.4f} "
          f"(pixel_iou {result.best_metrics.get('pixel_iou', float('nan')):.4f}, "
          f"image_accuracy {result.best_metrics.get('image_accuracy', float('nan')):.4f}) -> {best_path}")


def _report_test(out: Path, spec: InputSpec, test_s: Sequence[Any], color: str, result: TrainResult) -> None:
    """best.pt on the held-out parts at its calibrated settings: the run's honest figures.

    Nothing was chosen on these parts (checkpoint, threshold, min area), so their metrics say
    what the line will see; the calibration figures are optimistic by construction.
    """
    from training.core.evaluate import errors_by_category, evaluate_detailed, format_errors, json_safe
    from training.core.pictures import save_errors_picture
    from training.core.predict import predict_image_part

    if result.best_path is None:
        return
    model, meta = load_model(result.best_path)
    images, masks = load_images(test_s, color)
    pairs = [predict_image_part(model, im, spec) for im in tqdm(images, desc="test", unit="img", leave=False)]
    probs = [p for p, _ in pairs]
    # the part score judges only where calibration chose it to (train_utils.choose_verdict)
    head = bool(pairs) and pairs[0][1] is not None  # without a head, postprocess scores by the map's peak
    parts = ([float(q) for _, q in pairs if q is not None] if head and meta.postprocess.part_threshold is not None
             else None)
    metrics, rows = evaluate_detailed(probs, masks, meta.postprocess, parts)
    names = [s.name for s in test_s]
    by_cat = errors_by_category(rows, [s.category for s in test_s], names)
    picture = save_errors_picture(images, masks, probs, meta.postprocess, rows, names, out / "test_errors.png",
                                  parts=parts)
    result.test_metrics = json_safe(metrics)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["test"] = {"metrics": result.test_metrics, "by_category": by_cat, "n_images": len(test_s),
                       "errors_picture": str(picture) if picture else None}
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    print(f"held-out test ({len(test_s)} parts that chose nothing): image accuracy {metrics['image_accuracy']:.4f}, "
          f"recall {metrics['image_recall']:.4f}, pixel IoU {metrics['pixel_iou']:.4f}, AP {metrics['image_ap']:.4f}")
    print(format_errors(by_cat))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="training recipe (YAML); default: built-in defaults")
    ap.add_argument("--data", help="dataset folder (overrides data.root)")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, logs, pictures)")
    ap.add_argument("--time-budget", type=float, metavar="MINUTES",
                    help="wall-clock budget; the lr follows time (without --epochs the clock alone ends the run)")
    ap.add_argument("--max-steps", type=int, metavar="N",
                    help="step budget; the lr follows the steps (with --time-budget too: whichever ends first)")
    ap.add_argument("--epochs", type=int, help="max epochs")
    ap.add_argument("--seed", type=int, help="seed of split, patches and weights")
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    ap.add_argument("--init-from", metavar="CHECKPOINT", help="fine-tune: start from these weights")
    ap.add_argument("--extra-data", action="append", default=[], metavar="DIR",
                    help="another dataset joined to --data before the split, e.g. `training review-export` "
                         "output (repeatable)")
    ap.add_argument("--tta", action="store_true", help="flip TTA in validation")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override any config field, e.g. --set optim.lr=0.001 (repeatable)")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    over = parse_overrides(args.set)
    if (args.time_budget is not None or args.max_steps is not None) and args.epochs is None:
        args.epochs = 100_000  # the budget, not the recipe's epoch count, ends this run
    for key, value in (("data.root", args.data), ("schedule.time_budget_min", args.time_budget),
                       ("schedule.max_steps", args.max_steps),
                       ("schedule.epochs", args.epochs), ("seed", args.seed),
                       ("validation.tta", True if args.tta else None)):
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (over.setdefault(section, {}) if section else over)[leaf] = value
    return load_config(args.config, over)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training train`; 0 = trained, 2 = unusable config, data or checkpoint."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        train(cfg, args.out, resume=args.resume, init_from=args.init_from, extra_data=args.extra_data)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
