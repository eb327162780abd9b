"""The parts of the training loop that are not the loop: processes, schedule, data, validation, logs.

Kept apart so training/core/train.py reads top to bottom like nanoGPT's train.py.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.distributed as dist

from edge.contract import InputSpec, PostprocessParams
from training.core.calibrate import DEFAULT_MIN_AREAS, calibrate, calibrate_part_threshold
from training.core.data import Sample, load_sample
from training.core.evaluate import evaluate_predictions
from training.core.predict import predict_image_part
from training.core.recipe_auto import USUAL_SHARE
from training.core.train_config import ValidationSection, fixed
from training.core.unet import UNetOutput

CSV_COLUMNS = ("epoch", "step", "time_s", "lr", "train_loss", "val_loss", "image_f1", "image_accuracy",
               "pixel_iou", "pixel_f1", "image_recall", "image_precision", "image_ap", "pixel_precision",
               "pixel_recall", "score", "pixel_threshold", "min_area", "val_s", "part_threshold")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def setup_distributed() -> Dist:
    """Join the torchrun process group (gloo: CPU only) if launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's value of a small picklable object on every rank (identity without DDP)."""
    if not d.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch random state as tuples, ints and tensors: a checkpoint that holds them loads
    with torch.load(weights_only=True) (numpy's key array as a list of ints)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    if state:
        random.setstate(state["python"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- schedule


def cpu_has_native_bf16() -> bool:
    """True where bf16 matrix math runs in hardware (AVX512-BF16 or AMX), so autocast pays off.

    Elsewhere oneDNN emulates bf16 and a bf16 step is slower than an fp32 one.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(mode: str) -> torch.dtype | None:
    """The dtype training runs its forward pass in: bf16 for 'bf16', and for 'auto' where native."""
    if mode == "bf16" or (mode == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def to_float(out: Any) -> Any:
    """Model outputs (logits, `(logits, [aux])` or a UNetOutput) back in fp32, so losses are computed in fp32."""
    if isinstance(out, UNetOutput):
        return UNetOutput(out.logits.float(), [a.float() for a in out.aux],
                          None if out.part is None else out.part.float())
    if isinstance(out, tuple):
        return out[0].float(), [a.float() for a in out[1]]
    return out.float()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any, x: torch.Tensor,
               y: torch.Tensor, amp: torch.dtype | None, grad_clip: float | None) -> torch.Tensor:
    """One optimisation step: forward (in `amp` if set), fp32 loss, backward, clip, update.

    Shared by `train` and scripts/bench_train_step.py, so the benchmark times the real step.
    """
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        pred = model(x)
    loss = loss_fn(to_float(pred), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        for group in clip_groups(model):
            torch.nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    return loss


def clip_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Parameters clipped together: the segmentation network, and apart from it the decision head.

    One joint norm let the head's gradients (large while it starts learning) shrink the whole
    network's step: on the synthetic demo (8 epochs) the best pixel IoU of the last three epochs
    fell from 0.27 to 0.03 with a detached head and joint clipping. Clipped apart, a detached head
    leaves the segmentation's training exactly as without a head (same IoU, epoch for epoch)."""
    seg: list[torch.nn.Parameter] = []
    head: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (head if name.split(".")[0] == "decision" or ".decision." in name else seg).append(p)
    return [g for g in (seg, head) if g]


def lr_at(progress: float, lr: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up then cosine to lr x min_ratio, as a function of progress in [0, 1].

    Progress is a fraction of steps or of the time budget, so a 2-minute run anneals as
    fully as a 2-hour one and ends on a low learning rate.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return lr * (0.1 + 0.9 * p / warmup)
    q = (p - warmup) / max(1e-9, 1.0 - warmup)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q)))


class Clock:
    """Training progress: the larger of the step fraction and the time-budget fraction.

    `reserve_s` is kept free at the end of the budget for the final validation; it is
    re-estimated from the measured validation time, so the lr reaches its minimum when the
    last training step ends, not when the budget does.
    """

    def __init__(self, total_steps: int, budget_s: float | None, elapsed_s: float = 0.0) -> None:
        self.total_steps = max(1, total_steps)
        self.budget_s = budget_s
        self.start = time.monotonic() - elapsed_s
        self.reserve_s = 0.1 * budget_s if budget_s else 0.0
        self.seen_s = 0.0  # slowest validation so far

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, step: int) -> float:
        f = step / self.total_steps
        if self.budget_s:
            f = max(f, self.elapsed() / max(1.0, self.budget_s - self.reserve_s))
        return f

    def note_validation(self, seconds: float) -> None:
        """Keep room for the slowest validation seen so far (a shared CPU makes them vary)."""
        if self.budget_s:
            self.seen_s = max(self.seen_s, seconds)
            self.reserve_s = min(0.5 * self.budget_s, 1.25 * self.seen_s + 2.0)


class Overhead:
    """Keeps validation and hard-example mining under a share of the run, whatever the image size.

    A validation of large images at full resolution can cost a minute; done every epoch it would
    eat the budget of a slow machine (issue 15: 450 steps in 20 minutes). Before each such task the
    loop asks `affordable(kind)`: yes iff the time spent on overhead so far plus this task's
    expected cost stays within `share` of the elapsed run including it. The expected cost is the
    last measured one, or an estimate given before the first (`expect`).
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self.spent_s = 0.0
        self.cost_s: dict[str, float] = {}

    def expect(self, kind: str, seconds: float) -> None:
        self.cost_s.setdefault(kind, max(0.0, seconds))

    def affordable(self, kind: str, elapsed_s: float) -> bool:
        cost = self.cost_s.get(kind, 0.0)
        return self.spent_s + cost <= self.share * (elapsed_s + cost)

    def add(self, kind: str, seconds: float) -> None:
        self.spent_s += seconds
        self.cost_s[kind] = seconds

    def percent(self, elapsed_s: float) -> float:
        return 100.0 * self.spent_s / max(elapsed_s, 1e-9)


def speed_report(steps: int, seconds: float, clock: Clock, usual_steps: int | None,
                 data_s: float = 0.0, overhead_share: float = 0.0) -> tuple[str, str | None]:
    """(the line announcing steps per minute and where the budget will end, a warning or None).

    Why: the same `--time-budget` gives 2.5x fewer steps on a slower training PC, and a run that
    ends far short of the recipe's usual step count ends with a weaker model. Say so at minute
    one, not in the final metrics. `seconds` is the time in the training steps, `data_s` the time
    spent waiting for their batches: the rate and the projection count both, because the clock
    does (a 384 px views batch can cost half as much again as its step), and so does the share of
    the budget that validation and mining may take (`overhead_share`).
    """
    wall = seconds + data_s
    per_min = 60.0 * steps / max(wall, 1e-9)
    line = f"speed: {per_min:,.0f} steps/min ({1000 * wall / max(steps, 1):.0f} ms per step"
    line += f": {1000 * seconds / max(steps, 1):.0f} training, {1000 * data_s / max(steps, 1):.0f} waiting for patches)"
    projected = clock.total_steps
    clock_bound = False  # the time budget, not a step or epoch limit the user chose, ends the run
    if clock.budget_s:
        left_s = max(0.0, clock.budget_s - clock.reserve_s - clock.elapsed())
        by_time = steps + int(left_s * steps / max(wall, 1e-9) * (1.0 - overhead_share))
        clock_bound = by_time < projected
        projected = min(projected, by_time)
        line += f"; the budget allows ~{projected:,} steps"
    warning = None
    if usual_steps and clock_bound and projected < USUAL_SHARE * usual_steps:
        minutes = (usual_steps * wall / max(steps, 1) / (1.0 - overhead_share) + clock.reserve_s) / 60.0
        warning = (f"warning: this machine is too slow for the budget: ~{projected:,} steps where the recipe "
                   f"usually gets ~{usual_steps:,} (schedule.usual_steps); expect a weaker model, or give "
                   f"--time-budget ~{minutes:.0f}")
    return line, warning


def short_run_warning(steps: int, elapsed_s: float, usual_steps: int | None, clock_ended: bool) -> str | None:
    """At the end of a run the time budget ended: its real step count against the recipe's usual, or None.

    Why: the minute-one projection is an estimate; on a shared or throttled CPU the first minute ran
    30 % slower than the rest of the run (issue 15, 2026-12-07), and it warned a run that then made
    its usual steps. The count at the end is what the model got."""
    if not usual_steps or not clock_ended or steps >= USUAL_SHARE * usual_steps:
        return None
    minutes = elapsed_s * usual_steps / max(steps, 1) / 60.0
    return (f"warning: the time budget ended the run after {steps:,} steps where the recipe usually gets "
            f"~{usual_steps:,} (schedule.usual_steps): expect a weaker model, or give --time-budget ~{minutes:.0f}")


# --------------------------------------------------------------------------- data


def detect_color(samples: Sequence[Sample], limit: int = 32) -> Literal["gray", "bgr"]:
    """'bgr' if any of the first images has colour (channels that differ), else 'gray'."""
    for s in samples[:limit]:
        img = cv2.imread(str(s.image_path), cv2.IMREAD_UNCHANGED)
        if img is not None and img.ndim == 3 and img.shape[2] >= 3:
            b, g, r = (img[:, :, k].astype(np.int16) for k in range(3))
            if np.abs(b - g).max() > 2 or np.abs(g - r).max() > 2:
                return "bgr"
    return "gray"


def load_images(samples: Sequence[Sample], color: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All images and {0,1} masks in memory: the datasets are small and patches need random access."""
    pairs = [load_sample(s, color) for s in samples]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """Result of one validation on rank 0 (other ranks get `None` fields)."""

    probs: list[np.ndarray]
    metrics: dict[str, Any]
    params: PostprocessParams
    report: dict[str, Any]
    score: float
    seconds: float
    parts: list[float] | None = None  # part score per image (max over tiles), None without a decision head


def combined_score(metrics: dict[str, Any], weights: dict[str, float]) -> float:
    """Weighted sum of metrics; an undefined (NaN) metric counts as 0."""
    total = 0.0
    for k, w in weights.items():
        v = float(metrics.get(k, 0.0))
        total += w * (0.0 if math.isnan(v) else v)
    return total


def pixel_bce(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Mean per-pixel BCE of the full-resolution maps: a validation loss that needs no logits."""
    total, n = 0.0, 0
    for p, m in zip(probs, masks, strict=True):
        q = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        total += float(-(m * np.log(q) + (1 - m) * np.log1p(-q)).sum())
        n += m.size
    return total / max(n, 1)


def choose_verdict(options: dict[str, dict[str, Any]], min_recall: float) -> tuple[str, str]:
    """Which rule decides a part on the line: the one that reaches `min_recall` with the fewest false
    alarms on the calibration parts (else the highest recall). Ties go to the earlier option.

    Options (each with metrics at its own calibrated threshold): "regions" (any region at the pixel
    threshold and min area), "peak" (the map's peak >= part_threshold) and, with a decision head,
    "part_score". Why: a short training can leave the head behind the masks (synthetic demo: part
    verdict 0.64 against 0.86 by regions), and a pixel threshold low enough for recall ruins the
    masks; choosing on the calibration parts uses each where it helps, and the held-out parts still
    judge the choice.
    """
    def key(m: dict[str, Any]) -> tuple[bool, float, float]:
        recall = float(m["image_recall"]) if m["image_recall"] == m["image_recall"] else 0.0
        reached = recall >= min_recall - 1e-12
        return (reached, recall if not reached else 0.0, -float(m.get("image_fp", 0)))

    label = lambda m: f"recall {m['image_recall']:.4f}, {m.get('image_fp', 0)} false alarm(s)"  # noqa: E731
    best = max(options, key=lambda k: (key(options[k]), -list(options).index(k)))
    others = "; ".join(f"{k}: {label(m)}" for k, m in options.items() if k != best)
    return best, f"{best} ({label(options[best])}) against {others}"


def min_area_grid(cfg: ValidationSection) -> list[int]:
    """Calibration's min_area grid up to `validation.max_min_area` (0 always stays: every region counts)."""
    if cfg.max_min_area is None:
        return list(DEFAULT_MIN_AREAS)
    cap = fixed(cfg.max_min_area, "validation.max_min_area")
    return [a for a in DEFAULT_MIN_AREAS if a <= cap]


def calibrate_verdict(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], parts: list[float] | None,
                      cfg: ValidationSection) -> tuple[PostprocessParams, dict[str, Any], dict[str, Any]]:
    """(params, report, metrics) of the calibration on validation maps: threshold + min area for the
    regions, a score threshold (the head's part score, else the map's peak), and whichever of the two
    errs less decides the verdict (`cfg`: the validation section)."""
    params, report = calibrate(probs, masks, min_recall=cfg.min_recall, min_areas=min_area_grid(cfg))
    metrics = report.get("metrics") or evaluate_predictions(probs, masks, params)
    if any(np.any(m) for m in masks):  # a verdict threshold of its own: calibrated, then chosen or not
        mb = report["mask_best"]  # from calibrate's own grid: no second pass over the maps
        drawn = dataclasses.replace(params, pixel_threshold=mb["pixel_threshold"], min_area=mb["min_area"])
        options: dict[str, tuple[PostprocessParams, list[float] | None, dict[str, Any]]] = {
            "regions": (params, None, metrics)}
        # the edge scores a part by its head where the package has one, else by the map's peak
        name, scores = ("part_score", parts) if parts is not None else ("peak", [float(p.max()) for p in probs])
        with_score, report[name] = calibrate_part_threshold(scores, masks, drawn, min_recall=cfg.min_recall)
        options[name] = (with_score, scores, evaluate_predictions(probs, masks, with_score, parts=scores))
        report["verdict_by"], report["verdict_reason"] = choose_verdict(
            {k: v[2] for k, v in options.items()}, cfg.min_recall)
        params, _, metrics = options[report["verdict_by"]]  # `parts` stays: the head's scores, for the record
    return params, report, metrics


def validate(model: torch.nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
             spec: InputSpec, cfg: ValidationSection, d: Dist) -> Validation | None:
    """Full-resolution prediction through the edge's tiling (shared over ranks), then, on rank 0,
    calibration of threshold + min area (and part_threshold for a model with a decision head)
    and the metrics at the calibrated parameters."""
    t0 = time.monotonic()
    model.eval()
    mine = [(i, *predict_image_part(model, images[i], spec, tta=cfg.tta, batch=cfg.batch))
            for i in range(d.rank, len(images), d.world)]
    if d.ddp:
        gathered: list[Any] = [None] * d.world if d.main else []
        dist.gather_object([(i, p.astype(np.float16), s) for i, p, s in mine], gathered if d.main else None, dst=0)
        if not d.main:
            return None
        mine = [(i, p.astype(np.float32), s) for part in gathered for i, p, s in part]
    mine.sort(key=lambda t: t[0])
    probs = [p for _, p, _ in mine]
    parts = None if any(s is None for _, _, s in mine) or not mine else [float(s) for _, _, s in mine if s is not None]
    params, report, metrics = calibrate_verdict(probs, masks, parts, cfg)
    metrics = dict(metrics)
    metrics["val_loss"] = pixel_bce(probs, masks)
    score = combined_score(metrics, cfg.score)
    return Validation(probs, metrics, params, report, score, time.monotonic() - t0, parts)


# --------------------------------------------------------------------------- logging


class RunLog:
    """CSV (one row per validation; appended on resume) plus optional TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool, resume: bool) -> None:
        self.csv_path = out / "log.csv"
        if not (resume and self.csv_path.is_file()):
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard is optional: no events, no failure
                self.tb = None

    def row(self, values: dict[str, Any]) -> None:
        def fmt(v: Any) -> str:
            if v is None:
                return ""
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([fmt(values.get(c)) for c in CSV_COLUMNS])
        if self.tb is not None:
            step = int(values.get("step", 0))
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step") and not math.isnan(float(v)):
                    self.tb.add_scalar(("train/" if k in ("lr", "train_loss") else "val/") + k, v, step)
            self.tb.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
