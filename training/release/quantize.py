"""INT8 post-training quantization of the exported IR, and the accuracy gate that guards it.

Why a gate: INT8 can shift the probability map slightly, and a pixel threshold calibrated on
FP32 may then cut a small defect in two or lose it. So every quantized model is judged on the
validation split exactly as the daemon will run it (edge tiling, blending, postprocessing)
against the FP32 reference, and it is shipped only if it loses at most `max_drop` pixel IoU
and misses no defective part that FP32 finds. For a model with a decision head the verdicts are
part-level (part score >= part_threshold), so the gate compares part decisions, and records how
far the part scores moved. export.py decides what to do when it fails.

Calibration data are tiles cut by `edge.preprocess.preprocess`, the daemon's own function, so
NNCF sees the same raw-pixel input distribution the model sees in production; tiles that
contain defect pixels are over-sampled because defects are rare and their activations (the
high end of the ranges) are what the quantizer must not clip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from tqdm import tqdm

from edge.contract import InputSpec, PostprocessParams
from edge.inference import compile_config, core, infer_tiles_parts, output_roles
from edge.preprocess import preprocess
from edge.tiled import predict_frame
from training.core.data import Sample, load_sample

MIN_CALIB_TILES = 50
MIN_CALIB_IMAGES = 20
# Reference FP32 must really be FP32: on CPUs with avx512_bf16/AMX OpenVINO's default
# INFERENCE_PRECISION_HINT is bf16, which is not the reference the gate compares against.
F32_CONFIG = compile_config("LATENCY", "f32")

def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- prediction


class OVPredictor:
    """`predict(image)` of an in-memory or compiled IR, step for step like `Inferencer.predict`.

    Needed where there is no package folder to hand to the Inferencer: the FP32 reference
    (compiled with an explicit f32 hint) and the models NNCF compiles during accuracy control.
    """

    def __init__(self, model: ov.Model | ov.CompiledModel | str | Path, spec: InputSpec,
                 config: dict[str, Any] | None = None) -> None:
        if isinstance(model, (str, Path)):
            model = core().read_model(str(model))
        self.compiled = model if isinstance(model, ov.CompiledModel) else core().compile_model(
            model, "CPU", dict(config or F32_CONFIG))
        self.spec = spec
        self._request = self.compiled.create_infer_request()
        self.map_index, self.part_index = output_roles(self.compiled)
        self.has_part = self.part_index is not None

    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return infer_tiles_parts(self._request, tiles, self.map_index, self.part_index)

    def infer_tiles(self, tiles: np.ndarray) -> np.ndarray:
        return self.infer_tiles_parts(tiles)[0]

    def predict_part(self, image: np.ndarray) -> tuple[np.ndarray, float | None]:
        """(map, part score or None), as `Inferencer.predict_part`."""
        return predict_frame(self, image, self.spec)

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_part(image)[0]


def inference_precision(compiled: ov.CompiledModel) -> str:
    """What the CPU plugin really computes in (f32, bf16, ...), for the record."""
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[-2]
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- calibration


@dataclass
class CalibrationTiles:
    """Tiles as uint8 (4x less memory than float32; lossless for 8-bit frames)."""

    tiles: np.ndarray  # N x C x T x T uint8
    n_images: int
    n_defect_tiles: int
    n_clean_tiles: int

    def info(self) -> dict[str, int]:
        return {"tiles": len(self.tiles), "images": self.n_images,
                "defect_tiles": self.n_defect_tiles, "clean_tiles": self.n_clean_tiles}


def _mask_spec(spec: InputSpec) -> InputSpec:
    """A gray spec with the same tiling, to cut masks exactly like their images."""
    return dataclasses.replace(spec, color="gray", mean=(0.0,), std=(1.0,))


def sample_calibration_tiles(samples: Sequence[Sample], spec: InputSpec, size: int = 300,
                             seed: int = 0, max_images: int | None = None) -> CalibrationTiles:
    """Up to `size` tiles, about half with defect pixels when the data has that many.

    Reservoir sampling per class over images in random order keeps memory bounded
    (2 x size tiles) and does not favour the first images read.
    """
    if not samples:
        raise ValueError("no calibration images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))[: max_images or max(4 * size, 50)]
    mspec = _mask_spec(spec)
    pools: dict[bool, list[np.ndarray]] = {True: [], False: []}
    seen = {True: 0, False: 0}
    for idx in tqdm(order, desc="calibration tiles", unit="img", file=sys.stderr):
        image, mask = load_sample(samples[int(idx)], spec.color)
        tiles, _ = preprocess(image, spec)
        mtiles, _ = preprocess(mask * np.uint8(255), mspec)
        for tile, mt in zip(tiles, mtiles, strict=True):
            key = bool(mt.any())
            seen[key] += 1
            if len(pools[key]) < size:
                pools[key].append(tile.astype(np.uint8))
            else:
                j = int(rng.integers(0, seen[key]))
                if j < size:
                    pools[key][j] = tile.astype(np.uint8)
    n_def = min(len(pools[True]), math.ceil(size / 2))
    n_clean = min(len(pools[False]), size - n_def)
    n_def = min(len(pools[True]), size - n_clean)  # top up with defect tiles if clean ones ran out
    chosen = pools[True][:n_def] + pools[False][:n_clean]
    tiles_arr = np.stack(chosen)[rng.permutation(len(chosen))]
    result = CalibrationTiles(tiles_arr, len(order), n_def, n_clean)
    if len(chosen) < MIN_CALIB_TILES or len(order) < MIN_CALIB_IMAGES:
        warn(f"only {len(chosen)} calibration tiles from {len(order)} images (want >= {MIN_CALIB_TILES} "
             f"tiles from >= {MIN_CALIB_IMAGES} images): INT8 ranges may not cover production data")
    if n_def == 0:
        warn("no calibration tile contains a defect: activation ranges of defects are not observed")
    return result


def _calibration_dataset(calib: CalibrationTiles) -> Any:
    import nncf  # heavy; only quantization needs it

    return nncf.Dataset(list(calib.tiles), lambda t: t[None].astype(np.float32))


def _preset(name: str) -> Any:
    import nncf

    return {"performance": nncf.QuantizationPreset.PERFORMANCE,
            "mixed": nncf.QuantizationPreset.MIXED}[name]


def ranges() -> Any:
    """Activation ranges from the extremes of every calibration tile (min of minima, max of maxima).

    NNCF's default takes the *mean* of the per-tile maxima. A defect's response is exactly the rare
    tail that mean cuts off: on the demo model every INT8 map peaked at 0.916 (the clipped logit), so
    a part threshold of 0.918 could never be reached and the gate saw parts missed; accuracy control
    then reverted 26 of 27 operations before the one that mattered (issue 15). With these ranges
    plain INT8 kept pixel IoU (0.4036 against FP32's 0.4019) and every part. Quantile ranges clip
    the same tail and were worse still (IoU 0.045)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)


def input_convolutions(model: ov.Model) -> list[str]:
    """Friendly names of the convolutions that read the network input (through anything but another
    convolution or matmul): the layer(s) `float_input_layers` keeps in float."""
    found: list[str] = []
    todo = [t.get_node() for p in model.get_parameters() for out in p.outputs() for t in out.get_target_inputs()]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            found.append(name)
            continue
        todo.extend(t.get_node() for out in node.outputs() for t in out.get_target_inputs())
    return sorted(found)


def float_input_layers(model: ov.Model) -> Any:
    """The IgnoredScope every INT8 export uses: the first convolution stays in float.

    Why: on a CPU with AMX (Xeon 4th gen and later) OpenVINO 2026.4 computed the first convolution of
    the saved INT8 IR wrongly when the input stem is the mean/min/max block views: the default
    recipe's Magnetic-Tile model, quantized, gave the same maps as FP32 in memory, but read back from
    its .xml (weights compressed to int8) its maps moved by up to 0.99 and its part scores by 0.84,
    and the gate shipped FP16 instead (issue 15, 2026-12-06). Restricting oneDNN to AVX-512 VNNI, or
    keeping this one layer in float, made the saved model equal to the in-memory one. A package
    validated on one CPU must compute the same on the line's CPU, and the layer is the cheapest
    of the network (3 input channels), so it is never quantized."""
    import nncf

    return nncf.IgnoredScope(names=input_convolutions(model), validate=False)


def quantize_int8(model: ov.Model, calib: CalibrationTiles, preset: str = "performance",
                  fast_bias_correction: bool = True) -> ov.Model:
    """Plain NNCF post-training quantization (extreme min-max ranges, see `ranges`, + bias correction),
    the input layer in float (`float_input_layers`)."""
    import nncf

    return nncf.quantize(model, _calibration_dataset(calib), preset=_preset(preset),
                         subset_size=len(calib.tiles), fast_bias_correction=fast_bias_correction,
                         model_type=None, advanced_parameters=ranges(), ignored_scope=float_input_layers(model))


def restorer_budget(max_seconds: float, seconds_per_validation: float, n_quantized: int,
                    n_val: int) -> tuple[int, int]:
    """(max reverted operations, ranking subset size) that fit accuracy control into `max_seconds`.

    Why: unbounded, accuracy control reverted operation after operation for over 10 minutes on a
    model whose INT8 had collapsed (issue 15). Its cost is a ranking pass (every quantized
    operation judged on a subset) plus one full validation per reverted operation; give each
    about half of the budget. 0 operations means: it cannot run in time, fall back now.
    """
    per_image = seconds_per_validation / max(1, n_val)
    subset = int(min(n_val, max(0, 0.45 * max_seconds / max(1e-6, per_image * max(1, n_quantized)))))
    iterations = int(0.45 * max_seconds / max(1e-6, seconds_per_validation))
    if subset < min(8, n_val) or iterations < 1:
        return 0, 0
    return min(iterations, n_quantized), subset


def quantize_int8_controlled(model: ov.Model, calib: CalibrationTiles,
                             val_items: Sequence[tuple[np.ndarray, np.ndarray]], spec: InputSpec,
                             params: PostprocessParams, max_drop: float,
                             preset: str = "performance", max_iterations: int | None = None,
                             ranking_subset: int | None = None,
                             reference_flagged: Sequence[bool] | None = None) -> ov.Model:
    """NNCF accuracy-controlled quantization: reverts the most harmful layers to float until
    the validation metric is within `max_drop` of FP32.

    The metric is the gate's (check_gate): pixel IoU, minus one whole point per defective part that
    FP32 flags (`reference_flagged`, per item of `val_items`) and the candidate does not. One such
    miss outweighs any IoU gain, so accuracy control keeps reverting layers rather than ship a model
    that lets a defective part pass. A part FP32 misses counts for neither: when every defective
    part counted, an INT8 model that happened to catch one FP32 missed scored a whole point *above*
    FP32, accuracy control stopped at once on that "gain", and the gate then refused the model for
    its IoU drop (Magnetic-Tile, 2026-12-06: metric 1.40 against FP32's 0.42, IoU drop 0.014).
    """
    import nncf

    from training.core.evaluate import evaluate_detailed

    found_by_fp32 = ({_item_key(image): bool(flag) for (image, _), flag in
                      zip(val_items, reference_flagged, strict=True)} if reference_flagged is not None else {})

    def validate(compiled: ov.CompiledModel, items: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, None]:
        predictor = OVPredictor(compiled, spec)
        probs, masks, parts, keys = [], [], [], []
        for image, mask in items:  # NNCF passes the items, or a ranking subset of them, in any order
            prob, part = predictor.predict_part(image)
            probs.append(prob)
            parts.append(part)
            masks.append(mask)
            keys.append(_item_key(image))
        scores = None if any(p is None for p in parts) else [float(p) for p in parts if p is not None]
        metrics, rows = evaluate_detailed(probs, masks, params, scores)
        return control_metric(float(metrics["pixel_iou"]), rows, keys, found_by_fp32), None

    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    restorer = AdvancedAccuracyRestorerParameters(
        **({"max_num_iterations": max_iterations} if max_iterations else {}),
        **({"ranking_subset_size": ranking_subset} if ranking_subset else {}))
    return nncf.quantize_with_accuracy_control(
        model, _calibration_dataset(calib), nncf.Dataset(list(val_items)), validate,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, preset=_preset(preset),
        subset_size=len(calib.tiles), model_type=None, advanced_quantization_parameters=ranges(),
        advanced_accuracy_restorer_parameters=restorer, ignored_scope=float_input_layers(model))


# --------------------------------------------------------------------------- evaluation + gate


def control_metric(pixel_iou: float, rows: Sequence[dict[str, Any]], keys: Sequence[bytes],
                   found_by_fp32: dict[bytes, bool]) -> float:
    """Accuracy control's metric: 1 + pixel IoU - the defective parts missed that FP32 finds.

    `rows` are evaluate_detailed's per-image rows, `keys` their `_item_key`s; an image FP32 was not
    judged on counts as found by it (a miss there is never excused). The + 1: NNCF also computes the
    relative drop (1 - quantized / initial) and divides by zero when the reference scores exactly 0
    (IoU 0, no miss: seen with a 15-s demo model); the absolute drop it is told to use does not change.
    """
    missed = sum(1 for r, k in zip(rows, keys, strict=True)
                 if r["defective"] and not r["predicted"] and found_by_fp32.get(k, True))
    return 1.0 + pixel_iou - float(missed)


def _item_key(image: np.ndarray) -> bytes:
    """A validation image's identity that survives NNCF's subsetting and copying: a digest of its pixels."""
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()


def count_quantized(model: ov.Model) -> int:
    """FakeQuantize nodes in an NNCF-quantized model: how much of it actually runs in INT8."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def metrics_of(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], params: PostprocessParams) -> dict[str, Any]:
    """THE metric definition lives in training.core.evaluate; this only adapts the call."""
    from training.core.evaluate import evaluate_predictions

    return evaluate_predictions(list(probs), list(masks), params)


@dataclass
class Evaluation:
    """Metrics of one model on the validation items plus per-image verdicts for the gate."""

    metrics: dict[str, Any]
    flagged: list[bool]  # the part fails: part score >= part_threshold, or (no part output) >= 1 region
    defective: list[bool]  # ground truth
    names: list[str] = field(default_factory=list)
    parts: list[float] | None = None  # part scores (models with a part output)


def evaluate_model(predict: Callable[[np.ndarray], Any], items: Sequence[tuple[np.ndarray, np.ndarray]],
                   names: Sequence[str], params: PostprocessParams, desc: str) -> Evaluation:
    """Predict every validation image and judge it with training.core.evaluate (the daemon's rules).

    `predict` gives a map, or (map, part score or None) for a model with a part output."""
    from training.core.evaluate import evaluate_detailed, json_safe, split_prediction

    outs = [split_prediction(predict(image)) for image, _ in tqdm(items, desc=desc, unit="img", file=sys.stderr)]
    probs = [p for p, _ in outs]
    parts = None if any(s is None for _, s in outs) else [float(s) for _, s in outs if s is not None]
    metrics, rows = evaluate_detailed(probs, [m for _, m in items], params, parts)
    return Evaluation(json_safe(metrics), [r["predicted"] for r in rows], [r["defective"] for r in rows],
                      list(names), parts)


def check_gate(ref: Evaluation, cand: Evaluation, max_drop: float) -> dict[str, Any]:
    """Pass iff pixel IoU drops by <= max_drop and no defective part FP32 flags is missed."""
    drop = float(ref.metrics["pixel_iou"]) - float(cand.metrics["pixel_iou"])
    missed = [n for n, r, c, d in zip(ref.names, ref.flagged, cand.flagged, ref.defective, strict=True)
              if d and r and not c]
    disagree = sum(r != c for r, c in zip(ref.flagged, cand.flagged, strict=True))
    # informational: a new false alarm costs a re-inspection, a miss ships a bad part
    false_alarms = [n for n, r, c, d in zip(ref.names, ref.flagged, cand.flagged, ref.defective, strict=True)
                    if not d and c and not r]
    reasons = []
    part_info: dict[str, Any] = {}
    if ref.parts is not None and cand.parts is not None:
        # the verdicts compared above are part-level decisions (part score vs part_threshold); this is how far
        # the scores themselves moved
        part_info["part_score_max_abs_diff"] = float(np.max(np.abs(np.subtract(ref.parts, cand.parts))))
    elif (ref.parts is None) != (cand.parts is None):
        reasons.append("the candidate and FP32 disagree on having a part output")
    if drop > max_drop + 1e-12:
        reasons.append(f"pixel IoU drops by {drop:.4f} (> {max_drop:.4f})")
    if missed:
        reasons.append(f"misses {len(missed)} defective part(s) that FP32 finds: {', '.join(missed[:5])}"
                       + (" ..." if len(missed) > 5 else ""))
    return {
        "passed": not reasons,
        "max_drop": max_drop,
        "pixel_iou_fp32": float(ref.metrics["pixel_iou"]),
        "pixel_iou_candidate": float(cand.metrics["pixel_iou"]),
        "pixel_iou_drop": drop,
        "missed_defective_parts": missed,
        "verdict_disagreements": int(disagree),
        "new_false_alarms": false_alarms,
        "n_images": len(ref.flagged),
        "verdict_by": "part_score" if ref.parts is not None else "regions",
        **part_info,
        "reason": "; ".join(reasons) or "within limits",
    }
