"""THE metric definition of a model: probability maps + true masks -> image and pixel metrics.

Training validation, calibration checks, the export accuracy gate and the `evaluate` CLI all
call `evaluate_predictions`, and it judges a map through `edge.postprocess.postprocess` and
`edge.rules` (effective_rules, decide) - the daemon's own code - so a reported F1 is the F1 the line will see.

CLI (`python -m training evaluate`): a model is either a checkpoint file (torch inference
through training.core.predict) or a model package folder with package.json (OpenVINO inference
through edge.inference, no torch needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge.contract import PACKAGE_JSON, Detection, PostprocessParams
from edge.postprocess import postprocess
from edge.rules import decide, effective_rules
from training.core.metrics import PixelCounts, accuracy_bound, average_precision, image_metrics

# image -> HxW map, or (map, part score or None) for a model with a decision head
Predictor = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, float | None]"]
HALF_BUDGET_BYTES = 512 << 20  # above this (float32 estimate) probability maps are kept as float16


def _check_inputs(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  parts: Sequence[float] | None = None) -> None:
    if len(probs) != len(masks):
        raise ValueError(f"{len(probs)} probability maps but {len(masks)} masks")
    if parts is not None and len(parts) != len(probs):
        raise ValueError(f"{len(probs)} probability maps but {len(parts)} part scores")
    if not probs:
        raise ValueError("no images to evaluate")
    for i, (p, m) in enumerate(zip(probs, masks, strict=True)):
        if p.shape != m.shape:
            raise ValueError(f"image {i}: probability map {p.shape} and mask {m.shape} differ in shape")


def evaluate_detailed(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], params: PostprocessParams,
    parts: Sequence[float] | None = None, min_recall: float = 0.97,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`evaluate_predictions` plus one small row per image (label, verdict, score, regions).

    `image_accuracy_bound`: the best accuracy any threshold on the deciding score reaches on these
    parts at image recall >= `min_recall` (the line's rule; training.core.metrics.accuracy_bound)."""
    _check_inputs(probs, masks, parts)
    rules = effective_rules(params).rules  # no station overrides: a part fails iff it has any defect region
    labels = np.zeros(len(probs), bool)
    preds = np.zeros(len(probs), bool)
    scores = np.zeros(len(probs), np.float64)
    head = np.zeros(len(probs), np.float64)  # the part output's scores, kept when the regions decide
    pixels = PixelCounts()
    rows: list[dict[str, Any]] = []
    for i, (prob, mask) in enumerate(zip(probs, masks, strict=True)):
        det = postprocess(prob, params, None if parts is None else float(parts[i]))
        verdict, _ = decide(det, rules)
        labels[i] = bool(np.any(mask))
        preds[i] = verdict == "fail"
        scores[i] = det.part_score if _score_decides(det) else det.score
        head[i] = det.score if det.part_score is None else det.part_score
        pixels.add(det.mask, mask)
        rows.append({"defective": bool(labels[i]), "predicted": bool(preds[i]), "score": float(scores[i]),
                     "n_regions": len(det.regions), "defect_area": det.total_area})
        if det.part_score is not None:
            rows[-1]["part_score"] = det.part_score
    metrics = image_metrics(preds, labels, scores)
    metrics["image_accuracy_bound"] = accuracy_bound(scores, labels, min_recall)
    if parts is not None and params.part_threshold is None:  # the head ranks, the regions decide
        metrics["image_ap_part_output"] = average_precision(head, labels)
    metrics.update(pixels.to_dict())
    metrics.update({
        "n_images": len(probs),
        "n_defective": int(labels.sum()),
        "pixel_threshold": float(params.pixel_threshold),
        "min_area": int(params.min_area),
        "open_radius": int(params.open_radius),
        "close_radius": int(params.close_radius),
    })
    if parts is not None:
        metrics["part_threshold"] = params.part_threshold
    return metrics, rows


def _score_decides(det: Detection) -> bool:
    """True when the part score (not the regions) gives the verdict, as edge.rules.decide judges it:
    image AP must rank parts by what decides them, or it credits a score the station never uses."""
    return det.part_score is not None and det.part_threshold is not None


def evaluate_predictions(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], params: PostprocessParams,
    parts: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Metrics of probability maps against true masks, judged exactly as the daemon judges.

    Per image: `postprocess(prob, params, part)`; label = any true defect pixel; prediction = the
    default rules fail the part (any region survives, or - with `parts`, the per-image part
    scores of a model with a decision head - part score >= params.part_threshold); score =
    the part score when it decides (a part_threshold is set), else `Detection.score` (ranks parts
    for image AP; the part output's own AP is then `image_ap_part_output`); pixel counts
    compare `Detection.mask` (after morphology and the area filter) with the true mask, pooled
    over images. Conventions for 0/0 and AP: see training.core.metrics.
    """
    return evaluate_detailed(probs, masks, params, parts)[0]


def split_prediction(out: Any) -> tuple[np.ndarray, float | None]:
    """A predictor's result -> (map, part score or None)."""
    if isinstance(out, tuple):
        return np.asarray(out[0]), None if out[1] is None else float(out[1])
    return np.asarray(out), None


def errors_by_category(rows: Sequence[dict[str, Any]], categories: Sequence[str],
                       names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per defect category: parts, misses (defective parts passed) and false alarms (good parts failed),
    with the names of the wrong ones. Why: one accuracy figure hides that every miss is a blowhole."""
    out: dict[str, dict[str, Any]] = {}
    for row, cat, name in zip(rows, categories, names, strict=True):
        c = out.setdefault(cat, {"parts": 0, "missed": 0, "false_alarms": 0, "wrong": []})
        c["parts"] += 1
        if row["defective"] and not row["predicted"]:
            c["missed"] += 1
            c["wrong"].append(name)
        elif not row["defective"] and row["predicted"]:
            c["false_alarms"] += 1
            c["wrong"].append(name)
    return dict(sorted(out.items()))


def errors_by_physical_part(rows: Sequence[dict[str, Any]], samples: Sequence[Any],
                            rule: str | None) -> dict[str, Any] | None:
    """With the run's `data.parts` rule: physical parts judged, defective ones with an image passed, good
    ones with an image flagged. Why: a tile shot in 5 exposures counts 5 times among the images, so
    "4 misses" may be one tile or four, and a line judges tiles."""
    if not rule:
        return None
    from training.core.part_groups import part_ids

    ids, _ = part_ids(samples, rule)
    per: dict[str, list[dict[str, Any]]] = {}
    for s, row in zip(samples, rows, strict=True):
        per.setdefault(ids[s.name], []).append(row)
    bad = [r for r in per.values() if any(x["defective"] for x in r)]
    good = [r for r in per.values() if not any(x["defective"] for x in r)]
    return {"rule": rule, "parts": len(per), "defective_parts": len(bad), "good_parts": len(good),
            "defective_parts_with_a_miss": sum(any(x["defective"] and not x["predicted"] for x in r) for r in bad),
            "good_parts_with_a_false_alarm": sum(any(x["predicted"] for x in r) for r in good)}


def format_errors(by_cat: dict[str, dict[str, Any]]) -> str:
    """The per-category table as text (category, parts, misses, false alarms)."""
    lines = [f"{'category':<16} {'parts':>5} {'missed':>6} {'false alarms':>12}"]
    for cat, c in by_cat.items():
        lines.append(f"{cat:<16} {c['parts']:>5} {c['missed']:>6} {c['false_alarms']:>12}")
    return "\n".join(lines)


def predict_all(
    predictor: Predictor, samples: Sequence[Any], color: str, keep_images: bool = False,
    progress: bool = True, half: bool | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """(probability maps, true masks, images or None); see `predict_all_parts`."""
    probs, masks, images, _ = predict_all_parts(predictor, samples, color, keep_images, progress, half)
    return probs, masks, images


def predict_all_parts(
    predictor: Predictor, samples: Sequence[Any], color: str, keep_images: bool = False,
    progress: bool = True, half: bool | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None, list[float] | None]:
    """(probability maps, true masks, images or None, part scores or None) of every sample, in order.

    `predictor` maps an image (as `load_sample` returns it) to an HxW map or (map, part score),
    e.g.
    ``lambda im: predict_image(model, im, spec, tta)`` or ``Inferencer(dir).predict``.
    Maps are kept as float16 when `half` is True, or when None and all of them as float32 would
    exceed HALF_BUDGET_BYTES (estimated from the first); postprocess reads either.
    """
    from training.core.data import load_sample  # lazy: keeps this module importable without data deps

    probs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    images: list[np.ndarray] | None = [] if keep_images else None
    parts: list[float | None] = []
    for sample in tqdm(samples, desc="predict", unit="img", disable=not progress, leave=False):
        image, mask = load_sample(sample, color)
        prob, part = split_prediction(predictor(image))
        prob = prob.astype(np.float32, copy=False)
        parts.append(part)
        if prob.shape != mask.shape:
            raise ValueError(f"{sample.image_path}: prediction {prob.shape} does not match the image {mask.shape}")
        if half is None:
            half = len(samples) * prob.size * 4 > HALF_BUDGET_BYTES
        probs.append(prob.astype(np.float16) if half else prob)
        masks.append(mask)
        if images is not None:
            images.append(image)
    scores = None if not parts or any(p is None for p in parts) else [float(p) for p in parts if p is not None]
    return probs, masks, images, scores


# --------------------------------------------------------------------------- model loading


@dataclasses.dataclass
class LoadedModel:
    """What the CLI needs of a checkpoint or a package, whichever it was."""

    kind: str  # "checkpoint" | "package"
    predictor: Predictor
    color: str
    params: PostprocessParams
    name: str
    version: str
    data_fingerprint: str
    train_config: dict[str, Any]


def load_for_eval(model_path: str | Path, tta: bool = False, device: str = "CPU") -> LoadedModel:
    """A folder with package.json is an OpenVINO package, a file a torch checkpoint.

    Raises ValueError subclasses (CheckpointError, PackageError) whose message names the file.
    """
    path = Path(model_path)
    if path.is_dir():
        if not (path / PACKAGE_JSON).is_file():
            raise ValueError(f"{path}: a folder but not a model package (no {PACKAGE_JSON})")
        if tta:
            raise ValueError(f"{path}: --tta needs a checkpoint; a model package runs as deployed")
        from edge.cpu_check import warn_if_off
        from edge.inference import Inferencer

        inf = Inferencer(path, device=device, num_requests=1)
        warn_if_off(path, inf, "model.xml")  # the figures below are this CPU's
        tc = inf.meta.extra.get("train_config", {}) if isinstance(inf.meta.extra, dict) else {}
        return LoadedModel("package", inf.predict_part if inf.has_part else inf.predict, inf.spec.color, inf.params, inf.meta.name,
                           inf.meta.version, inf.meta.data_fingerprint, dict(tc or {}))
    if not path.exists():
        raise ValueError(f"{path}: model not found (expected a checkpoint file or a model package folder)")
    from training.core.checkpoint import load_model
    from training.core.predict import predict_image_part

    model, meta = load_model(path)
    spec = meta.input_spec
    return LoadedModel("checkpoint", lambda im: predict_image_part(model, im, spec, tta=tta), spec.color,
                       meta.postprocess, meta.name, meta.version, meta.data_fingerprint,
                       dict(meta.train_config or {}))


# --------------------------------------------------------------------------- CLI helpers


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """tmp + rename, so a reader (CI, export gate) never sees half a file; no tmp is left when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_json_target(path: Path) -> None:
    """--json must be a file path whose folder exists or can be made; a folder there is refused."""
    if path.is_dir():
        raise ValueError(f"--json {path}: is a folder; give a file name such as {path / 'metrics.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)


def format_table(metrics: dict[str, Any]) -> str:
    """Two aligned columns, metric and value; NaN shows as n/a."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in metrics.items():
        text = ("n/a" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


def select_split(samples: list[Any], split: str, train_config: dict[str, Any], model: str) -> list[Any]:
    """`all`, or the train/val/test part of the training run's split (same fractions and seed).

    `test` is the held-out part that chose nothing (not the checkpoint, not the thresholds, not the
    INT8 gate): the split to report. `val` is the calibration part those were chosen on.
    """
    if split == "all":
        return samples
    from training.core.data import describe_split, split_of_run

    if "val_fraction" not in train_config or "seed" not in train_config:
        raise ValueError(f"{model}: has no train_config with val_fraction and seed, so the training split "
                         f"cannot be reproduced; use --split all")
    parts = split_of_run(samples, train_config)
    chosen = {"train": parts.train, "val": parts.val, "test": parts.test}[split]
    if not chosen:
        why = "the model was trained without a test split (test_fraction 0)" if split == "test" else ""
        raise ValueError(f"{model}: the {split} split is empty ({describe_split(train_config)}) {why}".rstrip())
    return chosen


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training evaluate",
                                 description="Evaluate a checkpoint or a model package on a dataset.")
    ap.add_argument("--model", required=True, help="checkpoint file (.pt) or model package folder")
    ap.add_argument("--data", required=True, help="dataset folder (generic or MVTec layout)")
    ap.add_argument("--json", required=True, help="write the metrics here (atomically)")
    ap.add_argument("--split", choices=("all", "test", "val", "train"), default="all",
                    help="test/val/train reproduce the training run's split; test = held-out parts that chose "
                         "nothing, the one to report (default: all)")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation (checkpoints only)")
    ap.add_argument("--threshold", type=float, default=None, help="override pixel_threshold")
    ap.add_argument("--min-area", type=int, default=None, help="override min_area (pixels)")
    ap.add_argument("--part-threshold", type=float, default=None,
                    help="override part_threshold (models with a part output)")
    ap.add_argument("--grid", default=None, help="also save a validation picture grid (PNG)")
    ap.add_argument("--errors-picture", default=None, metavar="PNG",
                    help="also save a picture of every wrong part (missed defects and false alarms)")
    ap.add_argument("--baseline", metavar="MODEL", help="also evaluate this model (e.g. the one in service) on the "
                    "same parts and report both side by side, with the parts whose verdict the new model fixed or "
                    "broke: the evidence before switching models (issue 17's review loop); the threshold "
                    "overrides apply to --model only")
    ap.add_argument("--device", default="CPU", help="OpenVINO device for packages (default CPU)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's work; raises ValueError/OSError with messages naming the file."""
    from training.core.data import load_dataset

    t0 = time.perf_counter()
    loaded = load_for_eval(args.model, tta=args.tta, device=args.device)
    params = loaded.params
    part_threshold = getattr(args, "part_threshold", None)
    if args.threshold is not None or args.min_area is not None or part_threshold is not None:
        params = dataclasses.replace(
            params,
            pixel_threshold=params.pixel_threshold if args.threshold is None else float(args.threshold),
            min_area=params.min_area if args.min_area is None else int(args.min_area),
            part_threshold=params.part_threshold if part_threshold is None else float(part_threshold),
        )
        params.validate()
    dataset = load_dataset(args.data)
    warnings: list[str] = [f"{p}: skipped: {why}" for p, why in dataset.skipped]
    fingerprint = dataset.fingerprint()
    if args.split != "all" and loaded.data_fingerprint and loaded.data_fingerprint != fingerprint:
        warnings.append(f"data fingerprint differs from the model's training data: the {args.split} "
                        f"split may not be the one the model was trained with")
    samples = select_split(dataset.samples, args.split, loaded.train_config, str(args.model))
    pictures = bool(args.grid or args.errors_picture)
    probs, masks, images, parts = predict_all_parts(loaded.predictor, samples, loaded.color,
                                                    keep_images=pictures, progress=not args.no_progress)
    if parts is not None and params.part_threshold is None:
        warnings.append("the model has a part output but no part_threshold: verdicts come from the regions; "
                        "image AP still ranks parts by the part score")
    min_recall = float((loaded.train_config.get("validation") or {}).get("min_recall", 0.97))
    metrics, rows = evaluate_detailed(probs, masks, params, parts, min_recall)
    names = [s.name for s in samples]
    if pictures:
        from training.core.pictures import save_errors_picture, save_validation_grid

        assert images is not None
        if args.grid:
            save_validation_grid(images, masks, probs, params, args.grid, names=names, parts=parts)
        if args.errors_picture:
            save_errors_picture(images, masks, probs, params, rows, names, args.errors_picture, parts=parts)
    for s, row in zip(samples, rows, strict=True):
        row["name"], row["category"] = s.name, s.category
    by_category = errors_by_category(rows, [s.category for s in samples], names)
    by_part = errors_by_physical_part(rows, samples, loaded.train_config.get("parts"))
    return {
        **metrics,
        "model": str(args.model),
        "model_kind": loaded.kind,
        "model_name": loaded.name,
        "model_version": loaded.version,
        "data": str(args.data),
        "data_fingerprint": fingerprint,
        "split": args.split,
        "tta": bool(args.tta),
        "params": params.to_dict(),
        "warnings": warnings,
        "by_category": by_category,
        **({"by_physical_part": by_part} if by_part else {}),
        "time_s": round(time.perf_counter() - t0, 2),
        "per_image": rows,
    }


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """New against baseline on the same parts: metric deltas and the parts whose verdict changed."""
    keys = [k for k, v in new.items() if isinstance(v, int | float) and not isinstance(v, bool)
            and isinstance(old.get(k), int | float) and k.startswith(("image_", "pixel_"))]
    fixed: list[str] = []
    broken: list[str] = []
    for a, b in zip(new["per_image"], old["per_image"], strict=True):
        if a["predicted"] != b["predicted"]:
            (fixed if a["predicted"] == a["defective"] else broken).append(a["name"])
    return {"baseline_model": old["model"], "baseline_version": old["model_version"],
            "metrics": {k: {"baseline": old[k], "new": new[k], "delta": new[k] - old[k]} for k in keys},
            "fixed": fixed, "broken": broken}


def format_comparison(cmp: dict[str, Any]) -> str:
    width = max((len(k) for k in cmp["metrics"]), default=6)
    lines = [f"against baseline {cmp['baseline_model']} ({cmp['baseline_version']}):",
             f"{'metric':<{width}}  baseline     new   delta", f"{'-' * width}  --------  ------  ------"]
    for k, v in cmp["metrics"].items():
        lines.append(f"{k:<{width}}  {v['baseline']:8.4f}  {v['new']:6.4f}  {v['delta']:+6.4f}")
    lines.append(f"verdicts fixed by the new model: {len(cmp['fixed'])}, broken: {len(cmp['broken'])}"
                 + (f" (broken: {', '.join(cmp['broken'][:10])})" if cmp["broken"] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m training evaluate`; 0 = done, 2 = unusable input (message, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        _check_json_target(Path(args.json))  # before minutes of inference, not after
        result = run(args)
        if args.baseline:
            # the baseline as it runs in service: its own thresholds, no overrides, no pictures
            old = run(argparse.Namespace(**{**vars(args), "model": args.baseline, "grid": None, "errors_picture": None,
                                            "threshold": None, "min_area": None, "part_threshold": None}))
            result["vs_baseline"] = compare(result, old)
        write_json_atomic(args.json, result)
    except (ValueError, OSError) as e:  # DataError, CheckpointError, PackageError, FrameError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    shown = {k: v for k, v in result.items()
             if k not in ("per_image", "warnings", "params", "by_category", "vs_baseline", "by_physical_part")}
    print(format_table(shown))
    print(format_errors(result["by_category"]))
    if "by_physical_part" in result:
        b = result["by_physical_part"]
        print(f"physical parts (data.parts): {b['parts']}; defective {b['defective_parts']}, "
              f"{b['defective_parts_with_a_miss']} with an image passed; good {b['good_parts']}, "
              f"{b['good_parts_with_a_false_alarm']} with an image flagged")
    if "vs_baseline" in result:
        print(format_comparison(result["vs_baseline"]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
