"""Train the defect U-Net on full-resolution patches and write self-describing checkpoints.

    python -m training train --config configs/train/magnetic-tile.yaml --data DIR --out RUN_DIR \
        [--time-budget MINUTES] [--epochs N] [--resume] [--init-from CKPT] [--extra-data DIR] [--seed S] [--tta]
        [--set K=V]
    torchrun --nproc_per_node 2 -m training train ...      # data-parallel on CPU (gloo)

One loop, in order: `_setup` (data, model, optimizer, resumed state, patches; fixed for the run
in `Run`), then per epoch `_train_epoch` (mine hard negatives and positives, train steps) and
`_after_epoch` (validate: the edge's own tiling -> calibrate threshold/min area -> metrics;
checkpoint; log), then `_finish`. What changes as the run goes is one `RunState`.
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
from collections.abc import Callable, Sequence
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
from training.core.data import DataError, Sample, describe_split, load_dataset, merge_datasets, split_of_run
from training.core.losses import build_loss
from training.core.part_groups import part_ids
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
    Dist,
    Overhead,
    RunLog,
    Validation,
    autocast_dtype,
    broadcast,
    detect_color,
    load_images,
    lr_at,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    short_run_warning,
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


@dataclass
class RunState:
    """What changes as a run goes. The fields up to `best_metrics` are saved in last.pt's
    training_state (`saved`) and restored by --resume; the rest live only in this process."""

    epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    best_score: float = float("-inf")
    best_epoch: int = 0
    bad_validations: int = 0
    pool: list[HardNegative] = field(default_factory=list)  # hard negatives the patches draw from
    best_metrics: dict[str, Any] = field(default_factory=dict)
    params: PostprocessParams = field(default_factory=PostprocessParams)  # of the latest validation
    metrics: dict[str, Any] = field(default_factory=dict)  # of the latest validation
    stopped: str = ""  # why the run ends ("" = it goes on)
    lr: float = 0.0  # as logged
    last_val_t: float = 0.0
    last_val_step: int = -1
    row_sum: float = 0.0  # step losses since the last CSV row: its train_loss covers them all
    row_n: int = 0
    best_probs: list[np.ndarray] | None = None  # maps of the best validation, for the final picture
    step_s: float = 0.0  # time spent in training steps (this process)
    data_s: float = 0.0  # time spent waiting for the next batch (patch cutting + augmentation)
    run_steps: int = 0
    speed_told: bool = False

    SAVED = ("epoch", "step", "elapsed_s", "best_score", "best_epoch", "bad_validations", "pool", "best_metrics")

    def saved(self) -> dict[str, Any]:
        """The part of the state that last.pt keeps (hard negatives as plain tuples)."""
        out = {k: getattr(self, k) for k in self.SAVED}
        out["pool"] = [(h.image, h.y, h.x, h.score) for h in self.pool]
        return out

    def restore(self, ts: dict[str, Any]) -> None:
        """Take back what an earlier run saved (the keys it has)."""
        for k in self.SAVED:
            if k in ts:
                setattr(self, k, [HardNegative(*t) for t in ts[k]] if k == "pool" else ts[k])


@dataclass
class Run:
    """What setup fixes for the whole run: config, process group, data, model, optimizer, patches,
    clock and log. The loop reads these fields; the objects themselves (model, clock...) keep moving."""

    cfg: TrainConfig
    d: Dist
    out: Path
    say: Callable[..., Any]
    data: RunData
    mcfg: UNetConfig
    raw_model: UNet
    model: torch.nn.Module  # what trains: raw_model, or its DDP wrapper
    eval_model: UNet  # the weight average (or raw_model): validated, calibrated and saved
    ema: AveragedModel | None
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    amp: torch.dtype | None
    patches: PatchDataset
    loader: DataLoader[Any]
    patch: int
    batch: int
    steps_per_epoch: int
    budget_s: float | None
    clock: Clock
    overhead: Overhead | None  # with a time budget: validation and mining stay within overhead_share
    log: RunLog | None  # rank 0 only
    train_config: dict[str, Any]
    show: bool  # progress bars (rank 0)

    @property
    def spec(self) -> InputSpec:
        return self.data.spec

    def meta(self, epoch: int, step: int, p: PostprocessParams, m: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(name=self.cfg.name, version=self.cfg.version, model_config=self.mcfg,
                              input_spec=self.spec, postprocess=p, metrics=m, data_fingerprint=self.data.fingerprint,
                              train_config=self.train_config, epoch=epoch, step=step)

    def write(self, text: str) -> None:
        """A line that leaves the progress bars intact."""
        if self.show:
            tqdm.write(text)
        else:
            self.say(text, flush=True)


@dataclass
class RunData:
    """The split, loaded: training images at model scale, validation images at full resolution
    (validation predicts full frames through the edge), and the recipe resolved from them."""

    cfg: TrainConfig
    color: str
    spec: InputSpec
    split_record: dict[str, Any]  # the split's options as train_config carries them (data.split_of_run)
    train_s: list[Sample]
    val_s: list[Sample]
    test_s: list[Sample]
    train_images: list[np.ndarray]
    train_masks: list[np.ndarray]
    val_images: list[np.ndarray]
    val_masks: list[np.ndarray]
    fingerprint: str
    good_train: list[int]  # training images without defects (where hard negatives are mined)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, init_from: str | Path | None = None,
          extra_data: Sequence[str | Path] = ()) -> TrainResult:
    """Run one training as configured; raises ConfigError/DataError/CheckpointError on bad input.
    `extra_data`: more dataset folders joined to data.root before the split (e.g. reviewed parts)."""
    run, st = _setup(cfg, Path(out), resume, init_from, extra_data)
    epoch_bar = tqdm(total=None if run.budget_s else run.cfg.schedule.epochs, initial=st.epoch, desc="epochs",
                     unit="ep", disable=not run.show)
    while st.epoch < run.cfg.schedule.epochs and not st.stopped:
        losses = _train_epoch(run, st)
        epoch_bar.update(1)
        if not losses and st.stopped:
            st.epoch -= 1  # the budget ran out before this epoch trained at all
            if st.step == st.last_val_step:
                break  # and these weights were validated already
        if st.epoch >= run.cfg.schedule.epochs:
            st.stopped = st.stopped or "epochs"
        _after_epoch(run, st, losses)
    epoch_bar.close()
    return _finish(run, st)


# -------------------------------------------------------------------- setup
def _setup(cfg: TrainConfig, out: Path, resume: bool, init_from: str | Path | None,
           extra_data: Sequence[str | Path]) -> tuple[Run, RunState]:
    """Process group, data, model, loss, optimizer, the resumed state, patches, clock and log."""
    t_start = time.monotonic()  # a time budget covers data loading too
    d = setup_distributed()
    torch.set_num_threads(cfg.log.threads or max(1, (os.cpu_count() or 1) // d.world))
    seed_everything(cfg.seed + d.rank)
    say: Callable[..., Any] = print if d.main else (lambda *a, **k: None)
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where the run folder should be, a read-only disk
            raise ConfigError(f"--out {out}: cannot be the run folder ({e.strerror or e})") from None
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    data = _load_data(cfg, d, out, extra_data, say)
    cfg, spec = data.cfg, data.spec
    mcfg, raw_model = _build_model(cfg, data, init_from, say)
    model: torch.nn.Module = raw_model
    loss_fn = build_loss(cfg.loss)
    opt_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    amp = autocast_dtype(cfg.optim.autocast)
    say(f"model: {count_parameters(model) / 1e6:.3f}M parameters, widths {mcfg.widths()}, "
        f"{d.world} process(es) x {torch.get_num_threads()} thread(s), "
        f"forward in {'bf16 (autocast)' if amp else 'fp32'}, input scale {spec.scale}")
    st = RunState()
    ema = _resume(out, d, raw_model, optimizer, st, data.fingerprint, cfg, say) if resume else _ema(raw_model, cfg)
    eval_model = cast(UNet, ema.module) if ema is not None else raw_model
    if d.ddp:
        model = DistributedDataParallel(raw_model)  # also makes rank 0's initial weights everyone's

    pc = cfg.patches
    patch = fixed(pc.size, "patches.size")
    patches = PatchDataset(data.train_images, data.train_masks, patch, pc.per_epoch, pc.defect_fraction,
                           pc.hard_negative_fraction, pc.jitter, pc.augment, seed=cfg.seed, rank=d.rank,
                           world_size=d.world, target_stride=mcfg.space_to_depth if raw_model.views else 1,
                           hard_positive_fraction=pc.hard_positive_fraction, paste_fraction=pc.paste_fraction)
    patches.set_hard_negatives(st.pool)
    batch = max(1, pc.batch_size // d.world)
    loader = DataLoader(patches, batch_size=batch, num_workers=pc.workers, drop_last=True)
    steps_per_epoch = max(1, len(patches) // batch)
    budget_s = cfg.schedule.time_budget_min * 60 if cfg.schedule.time_budget_min else None
    clock = Clock(cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch, budget_s,
                  elapsed_s=st.elapsed_s + time.monotonic() - t_start)
    train_config = {**cfg.to_yaml_dict(), **data.split_record,
                    "model_seed": cfg.seed,
                    "data_root": str(cfg.data.root), "world_size": d.world,
                    "train_names": [s.name for s in data.train_s], "val_names": [s.name for s in data.val_s],
                    "test_names": [s.name for s in data.test_s]}
    run = Run(cfg, d, out, say, data, mcfg, raw_model, model, eval_model, ema, loss_fn, optimizer, amp, patches,
              loader, patch, batch, steps_per_epoch, budget_s, clock,
              Overhead(cfg.schedule.overhead_share) if budget_s else None,
              RunLog(out, cfg.log.tensorboard, resume) if d.main else None, train_config,
              show=cfg.log.progress and d.main)
    st.lr = lr_at(clock.fraction(st.step), cfg.optim.lr, cfg.optim.warmup, cfg.optim.min_lr_ratio)
    st.last_val_t = clock.elapsed()
    return run, st


def _check_defects_present(root: Any, samples: list[Sample], train_s: list[Sample], val_s: list[Sample],
                           say: Callable[..., Any]) -> None:
    """A model trained without a single defect learns that every part is good and would pass them all: refused.
    Calibration without one sets no threshold for recall: said loudly."""
    n_bad = sum(bool(s.defective) for s in samples)
    if not any(s.defective for s in train_s):
        raise DataError(f"{root}: no defective image in the training split ({len(train_s)} images; {n_bad} defective "
                        "in the whole data set): the model cannot learn what a defect looks like, and one trained "
                        "anyway would pass every part. Add images with defect masks (docs/data.md)")
    if not any(s.defective for s in val_s):
        say(f"warning: none of the {len(val_s)} calibration images is defective: the thresholds are chosen without a "
            "defect to keep (recall cannot be calibrated); add defective parts before trusting this model on a line")


def _parts_summary(samples: Sequence[Sample], rule: str) -> str:
    """How many physical parts the `data.parts` rule found, and which names it did not match."""
    ids, unmatched = part_ids(samples, rule)
    n_parts = len(set(ids.values()))
    line = (f"parts: {len(samples)} images show {n_parts} physical parts (data.parts {rule!r}); "
            f"each part's images stay on one side of the split")
    if unmatched:
        line += (f"\n  warning: {len(unmatched)} image name(s) do not match data.parts and count as parts of their "
                 f"own, first {unmatched[0]!r}")
    return line


def _load_data(cfg: TrainConfig, d: Dist, out: Path, extra_data: Sequence[str | Path],
               say: Callable[..., Any]) -> RunData:
    """Dataset (+ extra folders), the split, the images, and the recipe's autos resolved from them."""
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
    # the same record travels in train_config, so evaluate and export redraw this very split from it
    split_record = {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "seed": split_seed,
                    "parts": cfg.data.parts, "folds": cfg.data.folds, "test_fold": cfg.data.test_fold,
                    "train_share": cfg.data.train_share}
    split = split_of_run(dataset.samples, split_record)
    if cfg.data.parts:
        say(_parts_summary(dataset.samples, cfg.data.parts))
    train_s, val_s, test_s = split.train, split.val, split.test
    if not train_s or not val_s:
        raise DataError(f"{cfg.data.root}: too few images for a train/val split ({len(dataset.samples)})")
    _check_defects_present(cfg.data.root, dataset.samples, train_s, val_s, say)
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
        f"({describe_split(split_record)}), "
        f"color {color}")
    return RunData(cfg, color, spec, split_record, train_s, val_s, test_s, train_images, train_masks, val_images,
                   val_masks, fingerprint, good_train=[i for i, m in enumerate(train_masks) if not m.any()])


def _build_model(cfg: TrainConfig, data: RunData, init_from: str | Path | None,
                 say: Callable[..., Any]) -> tuple[UNetConfig, UNet]:
    """The U-Net as configured, or (fine-tune) the checkpoint's architecture and weights."""
    spec = data.spec
    channels = spec.channels
    mcfg = UNetConfig(in_channels=channels, mean=list(spec.mean), std=list(spec.std), **cfg.model.model_dump())
    init_state = None
    if init_from is not None:  # fine-tune: the checkpoint's architecture and weights, new data
        init_model, init_meta = load_model(init_from)
        if init_meta.model_config.in_channels != channels:
            raise CheckpointError(f"{init_from}: model has {init_meta.model_config.in_channels} input channel(s) "
                                  f"but the data is {data.color}; set input.color to match")
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
    return mcfg, unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it


def _ema(raw_model: UNet, cfg: TrainConfig) -> AveragedModel | None:
    """The weight average is what gets validated, calibrated and saved; the raw weights train on.
    BN statistics are averaged too (use_buffers), so the average needs no extra BN pass."""
    return (AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema), use_buffers=True)
            if cfg.optim.ema else None)


def _resume(out: Path, d: Dist, raw_model: UNet, optimizer: torch.optim.Optimizer, st: RunState,
            fingerprint: str, cfg: TrainConfig, say: Callable[..., Any]) -> AveragedModel | None:
    """Weights, optimizer, rng and run state from out/last.pt; returns the weight average, restored."""
    last_path = out / "last.pt"
    if not last_path.is_file():
        raise CheckpointError(f"{last_path}: nothing to resume (no last.pt in {out})")
    payload = read_checkpoint(last_path)
    ts = payload.get("training_state") or {}
    raw_model.load_state_dict(ts.get("raw_state_dict") or payload["state_dict"])
    optimizer.load_state_dict(ts["optimizer"])
    set_rng_state(ts.get("rng", {}) if d.main else {})
    st.restore(ts)
    st.params, st.metrics = PostprocessParams.from_dict(payload["postprocess"]), payload.get("metrics", {})
    if payload.get("data_fingerprint") != fingerprint:
        say("warning: the data differs from the run being resumed (fingerprint changed)")
    say(f"resume: {last_path} after epoch {st.epoch} (step {st.step})")
    ema = _ema(raw_model, cfg)
    if ema is not None and "raw_state_dict" in ts:
        ema.module.load_state_dict(payload["state_dict"])
        ema.n_averaged.fill_(1)
    return ema


# -------------------------------------------------------------------- one epoch
def _train_epoch(run: Run, st: RunState) -> list[float]:
    """Mine hard negatives and positives, then train until the epoch or the budget ends; the losses."""
    run.patches.set_epoch(st.epoch)
    _mine_negatives(run, st)
    _mine_positives(run, st)
    losses = _train_steps(run, st)
    st.row_sum, st.row_n = st.row_sum + sum(losses), st.row_n + len(losses)
    st.epoch += 1
    return losses


def _fraction(run: Run, step: int) -> float:
    """Progress by rank 0's clock, so all ranks agree on the lr and the end of the budget."""
    frac = run.clock.fraction(step)
    return broadcast(frac, run.d) if run.d.ddp else frac


def _affordable(run: Run, kind: str) -> bool:
    """Within the time budget's overhead share (always, without a budget); the same answer on every rank."""
    if run.overhead is None:
        return True
    ok = run.overhead.affordable(kind, run.clock.elapsed())
    return broadcast(ok, run.d) if run.d.ddp else ok


def _gather(d: Dist, found: list[Any]) -> list[Any]:
    """Every rank's findings, joined (the ranks shared the images)."""
    if not d.ddp:
        return found
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, found)
    return [h for part in parts for h in part]


def _mine_negatives(run: Run, st: RunState) -> None:
    """Hard negatives: where the current model fires on good training parts (ranks share the work)."""
    pc, d = run.cfg.patches, run.d
    good_train = run.data.good_train
    mine = st.epoch > 0 and pc.hard_negative_fraction > 0 and pc.mine_images > 0 and bool(good_train)
    if not (mine and _affordable(run, "mine") and _fraction(run, st.step) < 1.0):
        return
    t_mine = time.monotonic()
    rng = np.random.default_rng([run.cfg.seed, st.epoch, 7])
    chosen = sorted(rng.choice(good_train, min(pc.mine_images, len(good_train)), replace=False).tolist())
    run.raw_model.eval()
    found = mine_hard_negatives(run.raw_model, run.data.train_images, chosen[d.rank :: d.world], pc.mine_per_image,
                                spacing=run.patch // 4, min_prob=pc.mine_min_prob, stride=run.mcfg.stride)
    st.pool = update_pool(st.pool, _gather(d, found), chosen, pc.pool_size)
    run.patches.set_hard_negatives(st.pool)
    if run.overhead is not None:
        run.overhead.add("mine", time.monotonic() - t_mine)


def _mine_positives(run: Run, st: RunState) -> None:
    """Hard positives: defect components the current model misses (bounded: mine_positive_images)."""
    pc, d, patches = run.cfg.patches, run.d, run.patches
    mine_pos = st.epoch > 0 and pc.hard_positive_fraction > 0 and pc.mine_positive_images > 0
    if not (mine_pos and _affordable(run, "mine_positives") and patches.defective
            and _fraction(run, st.step) < 1.0):
        return
    t_mine = time.monotonic()
    rng = np.random.default_rng([run.cfg.seed, st.epoch, 11])
    chosen = sorted(rng.choice(patches.defective, min(pc.mine_positive_images, len(patches.defective)),
                               replace=False).tolist())
    run.raw_model.eval()
    missed = mine_hard_positives(run.raw_model, run.data.train_images, patches.components, chosen[d.rank :: d.world],
                                 stride=run.mcfg.stride)
    redone = set(chosen)  # images not re-mined this epoch keep their misses
    patches.set_hard_positives([h for h in patches.hard_positives if h.image not in redone] + _gather(d, missed))
    if run.overhead is not None:
        run.overhead.add("mine_positives", time.monotonic() - t_mine)


def _train_steps(run: Run, st: RunState) -> list[float]:
    """One pass over the patch loader, or until the budget ends (st.stopped says which)."""
    cfg = run.cfg
    run.model.train()
    losses: list[float] = []
    step_bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {st.epoch + 1}", unit="step", leave=False,
                    disable=not run.show)
    t_fetch = time.monotonic()
    for x, y in run.loader:
        st.data_s += time.monotonic() - t_fetch
        frac = _fraction(run, st.step)
        if frac >= 1.0:
            st.stopped = ("time budget" if run.budget_s and st.step < run.clock.total_steps
                          else "max steps" if cfg.schedule.max_steps else "epochs")
            break
        st.lr = lr_at(frac, cfg.optim.lr, cfg.optim.warmup, cfg.optim.min_lr_ratio)
        for g in run.optimizer.param_groups:
            g["lr"] = st.lr
        x = x.contiguous(memory_format=torch.channels_last)
        t_step = time.monotonic()
        loss = train_step(run.model, run.optimizer, run.loss_fn, x, y, run.amp, cfg.optim.grad_clip)
        st.step_s += time.monotonic() - t_step
        st.run_steps += 1
        if run.ema is not None:
            run.ema.update_parameters(run.raw_model)
        st.step += 1
        losses.append(loss.item())
        step_bar.update(1)
        step_bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{st.lr:.2e}")
        if not st.speed_told and (st.step_s >= 30.0 or st.run_steps >= run.steps_per_epoch) and st.run_steps >= 20:
            _tell_speed(run, st)
        t_fetch = time.monotonic()
    step_bar.close()
    return losses


def _usual_steps(cfg: TrainConfig) -> int | None:
    """schedule.usual_steps as resolved (an unresolved "auto" warns of nothing)."""
    usual = cfg.schedule.usual_steps
    return usual if isinstance(usual, int) else None


def _tell_speed(run: Run, st: RunState) -> None:
    """Steps per minute, once, with a warning if far from the recipe's usual; sizes validation's overhead."""
    st.speed_told = True
    line, warning = speed_report(st.run_steps, st.step_s, run.clock, _usual_steps(run.cfg), st.data_s,
                                 run.cfg.schedule.overhead_share if run.overhead is not None else 0.0)
    for text in (line, warning):
        if text:
            run.write(text)
    if run.overhead is not None:  # a forward pass costs about a third of a training step per pixel
        spec = run.spec
        pad = (spec.tile / max(1, spec.tile - spec.overlap)) ** 2  # overlapping tiles predict some pixels twice
        val_pixels = sum(im.shape[0] * im.shape[1] for im in run.data.val_images) * spec.scale**2 * pad
        run.overhead.expect("validate", val_pixels / (run.batch * run.patch**2) * st.step_s / st.run_steps / 3)


# -------------------------------------------------------------------- after an epoch
def _after_epoch(run: Run, st: RunState, losses: list[float]) -> None:
    """Validate when due (or at the end), keep best.pt, log, save last.pt; all ranks agree to stop."""
    d = run.d
    v = None
    if _validation_due(run, st) or st.stopped:
        if d.ddp:  # validate every rank's share with the same weights and BN statistics
            for b in run.eval_model.buffers():
                dist.broadcast(b, 0)
        v = validate(run.eval_model, run.data.val_images, run.data.val_masks, run.spec, run.cfg.validation, d)
        st.last_val_t, st.last_val_step = run.clock.elapsed(), st.step
    decision: dict[str, Any] = {"stop": st.stopped}
    if run.log is not None:  # rank 0
        if losses:  # an epoch the budget ended before its first step has no loss to log
            run.log.scalar("train/loss", float(np.mean(losses)), st.step)
        run.log.scalar("train/lr", st.lr, st.step)
        run.log.scalar("train/hard_negatives", len(st.pool), st.step)
        run.log.scalar("train/hard_positives", len(run.patches.hard_positives), st.step)
    if v is not None:  # rank 0 after a validation
        _record_validation(run, st, v, decision)
    if d.main:  # last.pt after every epoch, so --resume loses at most one epoch
        st.elapsed_s = run.clock.elapsed()
        ema = run.ema
        save_checkpoint(run.out / "last.pt", run.eval_model, run.meta(st.epoch, st.step, st.params, st.metrics),
                        training_state={
                            **st.saved(), "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
                            **({"raw_state_dict": run.raw_model.state_dict()} if ema is not None else {}),
                            "schedule": {"fraction": run.clock.fraction(st.step), "reserve_s": run.clock.reserve_s}})
    st.stopped = broadcast(decision, d)["stop"] if d.ddp else decision["stop"]


def _validation_due(run: Run, st: RunState) -> bool:
    """Every val_every epochs (or val_every_s seconds), within the overhead share; the same on every rank."""
    sched = run.cfg.schedule
    due = st.epoch % sched.val_every == 0
    if sched.val_every_s is not None:
        due = run.clock.elapsed() - st.last_val_t >= fixed(sched.val_every_s, "schedule.val_every_s")
    if due and run.overhead is not None:
        due = run.overhead.affordable("validate", run.clock.elapsed())
    if run.d.ddp:
        due = broadcast(due, run.d)  # every rank takes part in a validation, or none
    return due


def _record_validation(run: Run, st: RunState, v: Validation, decision: dict[str, Any]) -> None:
    """Rank 0 after a validation: best.pt if better, patience, the CSV row and the console line."""
    run.clock.note_validation(v.seconds)
    if run.overhead is not None:
        run.overhead.add("validate", v.seconds)
    params, metrics = v.params, v.metrics
    st.params, st.metrics = params, metrics
    st.bad_validations += 1
    if v.score > st.best_score:
        st.best_score, st.best_epoch, st.bad_validations, st.best_metrics = v.score, st.epoch, 0, metrics
        st.best_probs = v.probs
        save_checkpoint(run.out / "best.pt", run.eval_model, run.meta(st.epoch, st.step, params, metrics))
    patience = run.cfg.schedule.patience
    if not decision["stop"] and patience and st.bad_validations >= patience:
        decision["stop"] = f"no better score in {patience} validations"
    assert run.log is not None
    train_loss = st.row_sum / st.row_n if st.row_n else float("nan")
    st.row_sum, st.row_n = 0.0, 0
    elapsed = run.clock.elapsed()
    run.log.row({"epoch": st.epoch, "step": st.step, "time_s": round(elapsed, 1), "lr": st.lr,
                 "train_loss": train_loss, "score": v.score, "val_s": round(v.seconds, 1), **metrics})
    msg = (f"epoch {st.epoch} step {st.step} {elapsed:.0f}s lr {st.lr:.2e} loss {train_loss:.4f} | "
           f"val score {v.score:.4f} iou {metrics['pixel_iou']:.4f} f1 {metrics['image_f1']:.4f} "
           f"acc {metrics['image_accuracy']:.4f} @ thr {params.pixel_threshold} area {params.min_area} "
           + (f"part_thr {params.part_threshold:.4g} " if params.part_threshold is not None else "")
           + f"({v.seconds:.0f}s)")
    if run.show:
        tqdm.write(msg)
    else:
        print(msg, flush=True)


# -------------------------------------------------------------------- finish (rank 0)
def _finish(run: Run, st: RunState) -> TrainResult:
    """The result; on rank 0 also summary.json, the pictures and the held-out test figures."""
    clock, overhead = run.clock, run.overhead
    result = TrainResult(run.out, epochs=st.epoch, steps=st.step, elapsed_s=clock.elapsed(),
                         stopped=st.stopped or "epochs",
                         overhead_pct=overhead.percent(clock.elapsed()) if overhead is not None else None)
    if run.log is not None:
        run.log.close()
        _write_summary(run, st, result, run.log.csv_path)
        if run.data.test_s:
            _report_test(run.out, run.spec, run.data.test_s, run.data.color, result, run.cfg.validation.min_recall)
    if run.d.ddp:
        dist.barrier()
    return result


def _write_summary(run: Run, st: RunState, result: TrainResult, csv_path: Path) -> None:
    """Pictures of the best model and summary.json (rank 0 only)."""
    from training.core.pictures import save_training_curves, save_validation_grid

    out, cfg, data = run.out, run.cfg, run.data
    best_path = out / "best.pt"
    result.best_path = best_path if best_path.is_file() else None
    result.last_path = out / "last.pt"
    result.best_score, result.best_epoch = st.best_score, st.best_epoch
    result.best_metrics = st.best_metrics
    save_training_curves(csv_path, out / "curves.png")
    if result.best_path is not None and cfg.validation.grid_images > 0:
        best, best_meta = load_model(result.best_path)
        result.postprocess = best_meta.postprocess.to_dict()
        best_probs = st.best_probs
        if best_probs is None:  # resumed run without a new best: predict again with best.pt
            v = validate(best, data.val_images, data.val_masks, data.spec, cfg.validation, Dist())
            assert v is not None
            best_probs = v.probs
        save_validation_grid(data.val_images, data.val_masks, best_probs, best_meta.postprocess, out / "val_grid.png",
                             max_rows=cfg.validation.grid_images, names=[s.name for s in data.val_s])
    summary = {"run_dir": str(out), "best": str(result.best_path), "best_epoch": result.best_epoch,
               "best_score": result.best_score, "metrics": result.best_metrics, "postprocess": result.postprocess,
               "epochs": result.epochs, "steps": result.steps, "elapsed_s": round(result.elapsed_s, 1),
               "stopped": result.stopped, "overhead_pct": result.overhead_pct, "config": cfg.to_yaml_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"done: {result.stopped} after {result.steps:,} steps; best epoch {result.best_epoch} score "
          f"{result.best_score:.4f} (pixel_iou {result.best_metrics.get('pixel_iou', float('nan')):.4f}, "
          f"image_accuracy {result.best_metrics.get('image_accuracy', float('nan')):.4f}) -> {best_path}")
    warning = short_run_warning(result.steps, result.elapsed_s, _usual_steps(cfg), result.stopped == "time budget")
    if warning:
        print(warning)


def _report_test(out: Path, spec: InputSpec, test_s: Sequence[Any], color: str, result: TrainResult,
                 min_recall: float) -> None:
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
    metrics, rows = evaluate_detailed(probs, masks, meta.postprocess, parts, min_recall)
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
