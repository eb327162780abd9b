"""Search the training recipe with Optuna (TPE) under a wall-clock budget.

    python -m training tune --config configs/train/magnetic-tile.yaml --data DIR --out runs/tune \
        --time-budget 120 [--trial-minutes 10] [--seed S]

Each trial is a short time-budgeted `train()` of the base config with a few knobs changed
(input scale, learning rate, base width, decoder upsampling, loss, patch size, hard-negative
share) and is scored by the same combined validation score that picks best.pt. A short trial ranks recipes for a short run,
which is what the line gets; use the trial length you will train with, or close to it.

OUT gets one run folder per trial, trials.csv, and best.yaml: the base config with the best
trial's values, usable as `python -m training train --config OUT/best.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml

from training.core.data import DataError
from training.core.train_config import (
    Auto,
    ConfigError,
    TrainConfig,
    config_from_dict,
    deep_merge,
    load_config,
)
from training.core.unet import Upsample

WIDTHS = (8, 12, 16, 24)
PATCH_SIZES = (96, 128, 160, 192)
LOSSES = ("bce_dice", "focal_dice", "bce")
SCALES = (0.25, 0.375, 0.5, 1.0)  # input.scale: context and steps per minute vs. fine detail
IMAGE_WEIGHTS = (0.0, 0.1, 0.3, 1.0)  # loss.image_weight: part ranking vs. pixel masks


def suggest(trial: Any, base: TrainConfig) -> dict[str, Any]:
    """The trial's overrides of the base config (nested like the YAML)."""
    stride = base.model.stride
    sizes: list[int | Auto] = [s for s in PATCH_SIZES if s % stride == 0] or [base.patches.size]
    return {
        "input": {"scale": trial.suggest_categorical("scale", list(SCALES))},
        "optim": {"lr": trial.suggest_float("lr", 2e-4, 5e-3, log=True)},
        "model": {"base_width": trial.suggest_categorical("base_width", list(WIDTHS)),
                  "upsample": trial.suggest_categorical("upsample", list(get_args(Upsample)))},
        "loss": {"name": trial.suggest_categorical("loss", list(LOSSES)),
                 "image_weight": trial.suggest_categorical("image_weight", list(IMAGE_WEIGHTS))},
        "patches": {"size": trial.suggest_categorical("patch_size", sizes),
                    "hard_negative_fraction": trial.suggest_float("hard_negative_fraction", 0.0, 0.5, step=0.05)},
    }


def trial_config(base: TrainConfig, over: dict[str, Any], minutes: float) -> TrainConfig:
    d = deep_merge(base.model_dump(mode="json"), over)
    d = deep_merge(d, {"schedule": {"time_budget_min": minutes}, "log": {"progress": False, "tensorboard": False}})
    return config_from_dict(d, "<tune trial>")


def write_trials_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def tune(base: TrainConfig, out: Path, budget_min: float, trial_min: float, seed: int = 0,
         max_trials: int | None = None) -> dict[str, Any]:
    """Run trials while a whole one still fits in the budget; returns the best trial's summary."""
    import optuna

    from training.core.train import train

    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows: list[dict[str, Any]] = []
    overheads: list[float] = [15.0]  # data loading, final pictures: measured after the first trial
    t0 = time.monotonic()
    while (time.monotonic() - t0 + trial_min * 60 + max(overheads[-3:]) <= budget_min * 60
           and (max_trials is None or len(rows) < max_trials)):
        trial = study.ask()
        over = suggest(trial, base)
        cfg = trial_config(base, over, trial_min)
        run_dir = out / f"trial_{trial.number:03d}"
        started = time.monotonic()
        row: dict[str, Any] = {"trial": trial.number, **trial.params}
        try:
            res = train(cfg, run_dir)
            score = res.best_score
            study.tell(trial, score)
            row.update(state="complete", score=round(score, 5),
                       **{k: res.best_metrics.get(k) for k in ("pixel_iou", "image_f1", "image_accuracy")},
                       epochs=res.epochs, steps=res.steps)
        except (ValueError, RuntimeError) as e:  # a recipe that cannot run is a failed trial, not a failed search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            row.update(state="fail", error=str(e)[:200])
        took = time.monotonic() - started
        overheads.append(max(0.0, took - trial_min * 60))
        row.update(minutes=round(took / 60, 2), run_dir=str(run_dir))
        rows.append(row)
        write_trials_csv(out / "trials.csv", rows)
        print(f"trial {trial.number}: {row.get('score', 'failed')} {trial.params} ({took / 60:.1f} min)", flush=True)
    done = [t for t in study.trials if t.value is not None]
    if not done:
        raise ConfigError(f"no trial finished in {budget_min} min; raise --time-budget or lower --trial-minutes")
    best = study.best_trial
    best_cfg = deep_merge(base.to_yaml_dict(), suggest(optuna.trial.FixedTrial(best.params), base))
    (out / "best.yaml").write_text(
        f"# tuned by python -m training tune: trial {best.number} of {len(study.trials)}, "
        f"score {best.value:.4f} in {trial_min} min trials\n" + yaml.safe_dump(best_cfg, sort_keys=False))
    return {"trial": best.number, "score": best.value, "params": best.params, "config": best_cfg}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training tune`; 0 = best.yaml written, 2 = unusable config or data."""
    ap = argparse.ArgumentParser(prog="python -m training tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="base recipe (YAML)")
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--out", required=True, help="folder for trial runs, trials.csv and best.yaml")
    ap.add_argument("--time-budget", type=float, required=True, metavar="MINUTES", help="whole search")
    ap.add_argument("--trial-minutes", type=float, default=None, metavar="M",
                    help="budget per trial (default: a sixth of the search, at least 1)")
    ap.add_argument("--trials", type=int, default=None, help="stop after this many trials")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed (the data split follows the config)")
    args = ap.parse_args(argv)
    trial_min = args.trial_minutes or max(1.0, args.time_budget / 6)
    try:
        base = load_config(args.config, {"data": {"root": args.data}})
        best = tune(base, Path(args.out), args.time_budget, trial_min, args.seed, args.trials)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"best trial {best['trial']}: score {best['score']:.4f} {best['params']}")
    print(yaml.safe_dump(best["config"], sort_keys=False))
    print(f"-> {Path(args.out) / 'best.yaml'} (use with: python -m training train --config ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
