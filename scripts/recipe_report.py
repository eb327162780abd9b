"""Measure a training recipe honestly: several seeds, each trained, exported to INT8 and judged on
held-out parts that chose nothing (not the checkpoint, not the thresholds, not the INT8 gate).

    .venv/bin/python scripts/recipe_report.py --config configs/train/default.yaml \
        --data ../shared/data/magnetic-tile --out runs/report-mt --time-budget 8 --seeds 0 1 2

Per seed: `python -m training train` (split fixed by --split-seed, so every seed is judged on the
same held-out parts; or with `--folds K`, run k trains with seed k and holds out fold k of a k-fold
over physical parts, so the K runs judge every part exactly once and the report adds the figures
pooled over all parts), `python -m training export` (INT8, gated on the calibration parts), then
`python -m training evaluate --split test` on the INT8 package, as the line PC would run it.
Writes OUT/report.json and OUT/report.md (mean and range over the seeds, misses and false alarms
per defect category, links to each seed's picture of its wrong parts). Beside each package's figures
stand its own FP32 checkpoint's on the same held-out parts (`train`'s test report, same thresholds),
so what INT8 cost, or whether a miss is the model's and not the quantization's, is read off the table. Each step runs as its own
process, as a user would run it; a failed step is reported and the other seeds still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# image_accuracy_bound: the best accuracy any threshold reaches on the held-out parts at the rule's recall
# (training.core.metrics.accuracy_bound): far below a target, the ranking is the limit, not the calibration
METRICS = ("image_accuracy", "image_recall", "pixel_iou", "image_ap", "image_fp", "image_fn", "image_accuracy_bound")


def run(cmd: list[str], log: Path) -> float:
    """Run one step with its output in `log` (and a one-line progress note); returns seconds."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"exit code {code}: {' '.join(cmd[:4])} ... (log {log}):\n" + "\n".join(tail))
    return time.monotonic() - t0


def one_seed(args: argparse.Namespace, seed: int, fold: int | None = None) -> dict[str, Any]:
    py = sys.executable
    out = Path(args.out) / (f"seed{seed}" if fold is None else f"fold{fold}")
    out.mkdir(parents=True, exist_ok=True)
    run_dir, pkg, ev = out / "run", out / "pkg", out / "test.json"
    row: dict[str, Any] = {"seed": seed, "fold": fold}
    train = [py, "-m", "training", "train", "--config", args.config, "--data", args.data, "--out", str(run_dir),
             "--seed", str(seed), "--set", f"data.split_seed={args.split_seed}", "--set", "log.progress=false"]
    if fold is not None:
        train += ["--set", f"data.folds={args.folds}", "--set", f"data.test_fold={fold}"]
    if args.time_budget:
        train += ["--time-budget", str(args.time_budget)]
    if args.max_steps:
        train += ["--max-steps", str(args.max_steps)]
    for item in args.set:
        train += ["--set", item]
    done = args.resume and (run_dir / "summary.json").is_file()
    row["train_s"] = None if done else run(train, out / "train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    row.update(steps=summary["steps"], overhead_pct=summary.get("overhead_pct"),
               calibration=summary["metrics"], torch_test=summary.get("test", {}).get("metrics"))
    speed = [ln for ln in (out / "train.log").read_text().splitlines() if ln.startswith("speed:")]
    row["speed"] = speed[0] if speed else None
    done = args.resume and (pkg / "export_report.json").is_file()
    row["export_s"] = None if done else run([py, "-m", "training", "export", "--checkpoint", str(run_dir / "best.pt"),
                                             "--out", str(pkg), "--calib-data", args.data], out / "export.log")
    report = json.loads((pkg / "export_report.json").read_text())
    row["precision"] = report.get("precision")
    row["gate"] = {k: report.get("gate", {}).get(k) for k in ("passed", "method", "reason", "quantizers")}
    run([py, "-m", "training", "evaluate", "--model", str(pkg), "--data", args.data, "--json", str(ev),
         "--split", "test", "--errors-picture", str(out / "test_errors.png"), "--no-progress"], out / "evaluate.log")
    result = json.loads(ev.read_text())
    row["test"] = {k: result.get(k) for k in (*METRICS, "image_tp", "image_tn", "n_images", "n_defective",
                                              "pixel_threshold", "min_area")}
    row["by_category"] = result["by_category"]
    row["by_physical_part"] = result.get("by_physical_part")
    return row


def _spread(vals: list[float]) -> dict[str, float]:
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max of each test metric over the seeds that completed (the packages', and under
    "fp32" their FP32 checkpoints')."""
    done = [r for r in rows if "test" in r]
    out: dict[str, Any] = {"seeds_done": len(done), "seeds_failed": len(rows) - len(done), "fp32": {}}
    for k in METRICS:
        vals = [float(r["test"][k]) for r in done if r["test"].get(k) is not None]
        if vals:
            out[k] = _spread(vals)
        fp32 = [float(r["torch_test"][k]) for r in done if (r.get("torch_test") or {}).get(k) is not None]
        if fp32:
            out["fp32"][k] = _spread(fp32)
    cats: dict[str, dict[str, int]] = {}
    for r in done:
        for cat, c in r["by_category"].items():
            t = cats.setdefault(cat, {"parts": 0, "missed": 0, "false_alarms": 0})
            for k in t:
                t[k] += int(c[k])
    out["by_category_summed"] = cats
    # sums over runs mean something only when each part was held out by one run (k-fold)
    out["pooled"] = pooled(done) if any(r.get("fold") is not None for r in done) else None
    return out


def pooled(done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Image and physical-part counts summed over runs, as accuracy and recall of the whole.

    Meaningful for k-fold runs, where each part was held out by exactly one run: the figures of
    every part judged once, steadier than the mean of K small folds (a fold of Magnetic-Tile holds
    ~14 defective tiles, so one tile moves its recall by several points).
    """
    keys = ("image_tp", "image_fp", "image_fn", "image_tn")
    if not done or any(r["test"].get(k) is None for r in done for k in keys):
        return None
    tp, fp, fn, tn = (sum(int(r["test"][k]) for r in done) for k in keys)
    out: dict[str, Any] = {"images": tp + fp + fn + tn, "defective": tp + fn, "image_accuracy": (tp + tn) / (tp + fp + fn + tn),
                           "image_recall": tp / (tp + fn) if tp + fn else None, "false_alarms": fp, "misses": fn}
    parts = [r["by_physical_part"] for r in done if r.get("by_physical_part")]
    if len(parts) == len(done):
        for k in ("parts", "defective_parts", "defective_parts_with_a_miss", "good_parts",
                  "good_parts_with_a_false_alarm"):
            out[k] = sum(int(b[k]) for b in parts)
    return out


def _fp32_cell(m: dict[str, Any] | None) -> str:
    """The FP32 checkpoint's held-out figures in one cell ("-" when train reported none)."""
    if not m or any(m.get(k) is None for k in ("image_accuracy", "image_recall", "pixel_iou", "image_fp", "image_fn")):
        return "-"
    return (f"{m['image_accuracy']:.4f} / {m['image_recall']:.4f} / {m['pixel_iou']:.4f}, "
            f"{m['image_fp']} / {m['image_fn']}")


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], agg: dict[str, Any]) -> str:
    budget = f"--time-budget {args.time_budget}" if args.time_budget else f"--max-steps {args.max_steps}"
    how = (f"{args.folds} folds over physical parts (run k: seed k, fold k held out)" if args.folds
           else f"seeds {args.seeds}")
    lines = [f"Recipe `{args.config}` on `{args.data}`, {budget}, {how}, split seed {args.split_seed};",
             "figures of the INT8 package on the held-out test parts (they chose nothing).", "",
             "| seed | steps | speed | overhead % | package | test acc | recall | pixel IoU | AP | false alarms | "
             "misses | FP32 checkpoint: acc / recall / IoU, FA / misses |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        label = r["seed"] if r.get("fold") is None else f"{r['seed']} (fold {r['fold']})"
        if "test" not in r:
            lines.append(f"| {label} | failed: {r.get('error', '?')[:120]} |")
            continue
        t = r["test"]
        lines.append(f"| {label} | {r['steps']:,} | {(r['speed'] or '').removeprefix('speed: ')} | "
                     f"{'-' if r['overhead_pct'] is None else format(r['overhead_pct'], '.1f')} | {r['precision']} | {t['image_accuracy']:.4f} | "
                     f"{t['image_recall']:.4f} | {t['pixel_iou']:.4f} | {t['image_ap']:.4f} | {t['image_fp']} | "
                     f"{t['image_fn']} | {_fp32_cell(r.get('torch_test'))} |")
    lines += ["", "| metric | mean | min | max | FP32 checkpoint: mean (min-max) |", "| --- | --- | --- | --- | --- |"]
    for k in METRICS:
        if k in agg:
            a, f = agg[k], agg["fp32"].get(k)
            fp32 = f"{f['mean']:.4f} ({f['min']:.4f}-{f['max']:.4f})" if f else "-"
            lines.append(f"| {k} | {a['mean']:.4f} | {a['min']:.4f} | {a['max']:.4f} | {fp32} |")
    p = agg.get("pooled")
    if args.folds and p:
        lines += ["", f"Pooled over the {len([r for r in rows if 'test' in r])} folds (every image judged once, by the "
                  f"run that held it out): {p['images']} images, {p['defective']} defective: accuracy "
                  f"**{p['image_accuracy']:.4f}**, recall **{p['image_recall']:.4f}**, {p['false_alarms']} false "
                  f"alarms, {p['misses']} misses."]
        if "parts" in p:
            lines.append(f"Physical parts: {p['defective_parts_with_a_miss']} of {p['defective_parts']} defective "
                         f"parts had an image passed, {p['good_parts_with_a_false_alarm']} of {p['good_parts']} good "
                         f"parts had an image flagged.")
    lines += ["", "Per defect category, summed over the seeds:", "",
              "| category | parts | missed | false alarms |", "| --- | --- | --- | --- |"]
    for cat, c in sorted(agg["by_category_summed"].items()):
        lines.append(f"| {cat} | {c['parts']} | {c['missed']} | {c['false_alarms']} |")
    tiles = [(r["seed"], r["by_physical_part"]) for r in rows if r.get("by_physical_part")]
    if tiles:  # the split grouped images by physical part: how many parts, not images, were wrong
        lines += ["", "Per physical part (`data.parts`: all images of a part on one side of the split):", "",
                  "| seed | parts | defective parts with an image passed | good parts with an image flagged |",
                  "| --- | --- | --- | --- |"]
        for seed, b in tiles:
            lines.append(f"| {seed} | {b['parts']} | {b['defective_parts_with_a_miss']} of {b['defective_parts']} | "
                         f"{b['good_parts_with_a_false_alarm']} of {b['good_parts']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/train/default.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds (default 0 1 2; with --folds "
                    "one per fold, default 0 .. K-1)")
    ap.add_argument("--folds", type=int, default=None,
                    help="k-fold over physical parts: run k holds out fold k, so every part is judged once")
    ap.add_argument("--split-seed", type=int, default=0, help="one split for every seed (default 0)")
    ap.add_argument("--time-budget", type=float, default=8.0, help="minutes per training (default 8)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--resume", action="store_true",
                    help="keep a seed's finished training and export (their outputs exist) and redo the rest")
    args = ap.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        ap.error(f"--folds must be >= 2, got {args.folds}")
    if args.seeds is None:
        args.seeds = list(range(args.folds)) if args.folds else [0, 1, 2]
    if args.folds and len(args.seeds) != args.folds:
        ap.error(f"--folds {args.folds} needs one seed per fold, got --seeds {' '.join(map(str, args.seeds))}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, seed in enumerate(args.seeds):
        fold = i if args.folds else None
        print(f"[{i + 1}/{len(args.seeds)}] seed {seed}" + ("" if fold is None else f", fold {fold}"), flush=True)
        try:
            rows.append(one_seed(args, seed, fold))
        except (RuntimeError, OSError, KeyError, json.JSONDecodeError) as e:
            print(f"  seed {seed} failed: {e}", file=sys.stderr, flush=True)
            rows.append({"seed": seed, "fold": fold, "error": str(e)})
        if "test" in rows[-1]:
            t = rows[-1]["test"]
            print(f"  seed {seed}: accuracy {t['image_accuracy']:.4f} recall {t['image_recall']:.4f} "
                  f"IoU {t['pixel_iou']:.4f} ({t['image_fp']} false alarms, {t['image_fn']} misses)", flush=True)
    agg = aggregate(rows)
    (Path(args.out) / "report.json").write_text(json.dumps({"rows": rows, "aggregate": agg}, indent=2, default=str))
    text = markdown(args, rows, agg)
    (Path(args.out) / "report.md").write_text(text)
    print(text)
    return 0 if agg["seeds_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
