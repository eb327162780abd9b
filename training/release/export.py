"""Checkpoint -> model package: convert to OpenVINO, quantize to INT8 behind an accuracy gate, save.

    python -m training export --checkpoint RUN/best.pt --out MODEL_DIR --calib-data DATA \
        [--precision int8|fp16|fp32] [--val-data DIR] [--name N --version V] \
        [--max-drop 0.01] [--calib-size 300] [--preset performance|mixed]

A short chain (as in anomalib): convert -> quantize (plain, then accuracy-controlled) -> gate
-> save. The graph is raw pixels [1,C,T,T] -> sigmoid probability [1,1,T,T] ("probability"), plus
for a model with a decision head a second output "part_probability" [1,1] (sigmoid in the graph);
normalisation is inside the U-Net, so the package needs no preprocessing but tiling. The package's
postprocess block carries both thresholds: pixel_threshold (regions) and part_threshold (verdict). Validation uses the
checkpoint's own split (train_config val_fraction + seed) unless --val-data is given, and
every model is judged through the daemon's own tiling and postprocessing.

If INT8 fails the gate even with accuracy control, the package falls back to FP16 and says so
on stderr, in package.json (metrics.gate) and in export_report.json: a degraded model is never
shipped silently. The package is built in a temporary folder beside MODEL_DIR and renamed at
the end, so a failed export leaves either the old package or none, never half of one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from edge.contract import PackageMeta
from edge.inference import PART_OUTPUT
from edge.package import read_package, sha256_file, write_package_json
from edge.preprocess import preprocess
from edge.signature import sign_package
from training.core.checkpoint import CheckpointMeta, load_model
from training.core.data import describe_split, load_dataset, load_sample, split_of_run
from training.release import quantize as q
from training.release.timing import median_latency_ms, ov_runner


class ExportError(RuntimeError):
    """Export cannot produce a trustworthy package; the message says why and what to do."""


@dataclass(frozen=True)
class ExportRequest:
    """What an export was asked for: one field per `python -m training export` flag, same defaults."""

    checkpoint: str | Path
    out: str | Path
    calib_data: str | Path | None
    precision: str = "int8"
    val_data: str | Path | None = None
    name: str | None = None
    version: str | None = None
    max_drop: float = 0.01  # largest allowed pixel-IoU loss of the shipped model against FP32
    calib_size: int = 300
    preset: str = "performance"
    seed: int = 0
    sign_key: str | Path | None = None  # Ed25519 PEM: package.json.sig over the final package.json
    max_minutes: float = 5.0  # time for accuracy-controlled INT8 after plain INT8 fails the gate


@dataclass(frozen=True)
class BuildContext:
    """What `_build` works on: the staging folder, the loaded model, the package's identity and the
    validation data (images with masks, and their names for the gate's report)."""

    root: Path
    module: torch.nn.Module
    meta: CheckpointMeta
    name: str
    version: str
    created: str
    items: list[tuple[np.ndarray, np.ndarray]]
    names: list[str]
    calib_samples: list[Any]


class ProbabilityModel(torch.nn.Module):
    """The deployable graph: raw pixels in, defect probability out (sigmoid inside the graph);
    with a decision head also the part probability (sigmoid inside the graph)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            return torch.sigmoid(out[0]), torch.sigmoid(out[1])
        return torch.sigmoid(out)


def convert(module: torch.nn.Module, meta: CheckpointMeta) -> ov.Model:
    """PyTorch frontend conversion with a static [1,C,T,T] input (no ONNX detour)."""
    spec = meta.input_spec
    shape = [1, spec.channels, spec.tile, spec.tile]
    wrapped = ProbabilityModel(module).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # the PyTorch frontend traces with torch.jit.trace, which torch now flags as deprecated
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        model = ov.convert_model(wrapped, example_input=torch.zeros(shape), input=shape)
    model.inputs[0].get_tensor().set_names({"image"})
    model.outputs[0].get_tensor().set_names({"probability"})
    if len(model.outputs) > 1:
        model.outputs[1].get_tensor().set_names({PART_OUTPUT})
    return model


def save_ir(model: ov.Model, xml: Path, fp16: bool = False) -> None:
    """The IR alone; everything about how to feed and judge it is in package.json (write_meta), the
    one metadata source the edge reads, hashes and verifies: no second copy in the IR's rt_info."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=fp16)


def tool_versions() -> dict[str, str]:
    import nncf

    return {"torch": torch.__version__, "openvino": ov.__version__, "nncf": nncf.__version__,
            "python": sys.version.split()[0]}


def write_meta(ctx: BuildContext, precision: str, metrics: dict[str, Any]) -> PackageMeta:
    """package.json over the files now in ctx.root (their SHA-256), with the checkpoint's metadata."""
    root, meta = ctx.root, ctx.meta
    files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != "package.json" and not p.name.endswith(".tmp")}
    pm = PackageMeta(name=ctx.name, version=ctx.version, created=ctx.created, precision=precision, input=meta.input_spec,
                     postprocess=meta.postprocess, files=files, metrics=metrics,
                     data_fingerprint=meta.data_fingerprint, tools=tool_versions(),
                     extra={"train_config": meta.train_config, "model_config": meta.model_config.to_dict(),
                            "input_note": "normalisation (mean/std) is inside the graph: feed raw pixels",
                            "checkpoint_metrics": meta.metrics})
    write_package_json(root, pm)
    return pm


def banner(lines: list[str]) -> None:
    bar = "!" * 78
    print("\n".join([bar, *[f"!! {line}" for line in lines], bar]), file=sys.stderr, flush=True)


def _load_items(samples: list[Any], color: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [load_sample(s, color) for s in samples]


def export(req: ExportRequest) -> dict[str, Any]:
    """Build the package at `req.out`; returns the report (also written to out/export_report.json).
    With `req.sign_key` (Ed25519 PEM) package.json.sig is written over the final package.json."""
    precision = req.precision
    if precision not in ("int8", "fp16", "fp32"):
        raise ExportError(f"--precision must be int8, fp16 or fp32, got {precision!r}")
    out = Path(req.out)
    _check_out(out)  # before minutes of calibration, not after
    module, meta = load_model(req.checkpoint)
    spec = meta.input_spec
    name, version = req.name or meta.name, req.version or meta.version
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    calib_samples, val_samples, val_source = _split_data(req, meta)
    if not val_samples:
        raise ExportError(f"no validation images in {val_source}: pass --val-data DIR so the gate can run")
    print(f"export: {name} {version}, {precision}, tile {spec.tile}, validation {len(val_samples)} images "
          f"({val_source})", file=sys.stderr)
    items = _load_items(val_samples, spec.color)
    names = [s.name for s in val_samples]

    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        ctx = BuildContext(staging, module, meta, name, version, created, items, names, calib_samples)
        report = _build(ctx, req)
        report["validation"] = {"source": val_source, "images": len(items)}
        (staging / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_meta(ctx, report["precision"], report["metrics"])
        if req.sign_key is not None:  # inside the staging dir: a signed package appears whole or not at all
            sign_package(staging, req.sign_key)
        _verify(staging)  # before the swap: a package that fails here never replaces a good one
        _replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    read_package(out)
    print_report(report, out)
    print(f"verified: {out} reads (package.json, SHA-256, XML) and compiles with edge.inference.Inferencer")
    return report


def _split_data(req: ExportRequest, meta: CheckpointMeta) -> tuple[list[Any], list[Any], str]:
    """Calibration from the training part, validation = the checkpoint's own split (or --val-data);
    returns the calibration samples, the validation samples and where the latter came from."""
    calib_data, val_data = req.calib_data, req.val_data
    if calib_data is None and (req.precision == "int8" or val_data is None):
        raise ExportError("--calib-data is required (INT8 calibration and/or the validation split)")
    calib_samples: list[Any] = []
    val_samples: list[Any] = []
    val_source = ""
    if calib_data is not None:
        ds = load_dataset(calib_data)
        if val_data is None:
            tc = meta.train_config
            # INT8 ranges from the training parts, the gate on the calibration parts; the held-out
            # test parts (test_fraction) are never seen, so their figures stay honest for the package too
            parts = split_of_run(ds.samples, tc)
            calib_samples, val_samples = parts.train, parts.val
            val_source = f"{calib_data} calibration split ({describe_split(tc)})"
        else:
            calib_samples = ds.samples
    if val_data is not None:
        val_samples = load_dataset(val_data).samples
        val_source = str(val_data)
    return calib_samples, val_samples, val_source


def _verify(root: Path) -> None:
    """Load the package as the daemon will: metadata, hashes, XML, then a compiled Inferencer."""
    from edge.inference import Inferencer

    read_package(root)
    Inferencer(root, num_requests=1)


def _build(ctx: BuildContext, req: ExportRequest) -> dict[str, Any]:
    """Convert, check parity with PyTorch, judge FP32, then the requested precision behind the gate."""
    spec, params = ctx.meta.input_spec, ctx.meta.postprocess
    fp32 = convert(ctx.module, ctx.meta)
    fp32_xml = ctx.root / "fp32" / "model.xml"
    save_ir(fp32, fp32_xml)
    ref_pred = q.OVPredictor(fp32_xml, spec)
    parity = _torch_parity(ctx.module, ref_pred, ctx.items[0][0], spec)
    if parity > 1e-4:
        raise ExportError(f"OpenVINO FP32 differs from PyTorch by {parity:.2e} (max abs probability): "
                          "conversion is wrong, not shipping it")
    if ref_pred.has_part and params.part_threshold is None:
        # validation judged the regions better than the head on the calibration parts (choose_verdict):
        # the part output ships for information (events show its score) but the regions decide
        print("export: the model has a decision head, but calibration chose the regions to decide the verdict "
              "(no part_threshold); the part score is reported, not used", file=sys.stderr)
    ref = q.evaluate_model(ref_pred.predict_part, ctx.items, ctx.names, params, "validate fp32")
    metrics: dict[str, Any] = {"fp32": ref.metrics}
    report: dict[str, Any] = {"precision_requested": req.precision, "torch_vs_ov_fp32_max_abs": parity}

    final = req.precision
    gate: dict[str, Any] = {}
    if req.precision == "int8":
        gate = _int8_gate(ctx, req, fp32, ref, metrics, report)
        if not gate["passed"]:
            final = gate["fallback"] = "fp16"
            banner([f"INT8 FAILED THE ACCURACY GATE: {gate['reason']}",
                    "Shipping FP16 instead. INT8 metrics and the reason are kept in package.json (metrics.gate)."])
    if final in ("fp16", "fp32"):
        # FP16/FP32 are judged too: on CPUs with bf16 the daemon runs them in bf16, not f32
        ev = _stage(ctx, metrics, fp32, final, fp16=final == "fp16")
        metrics[final if final == "fp16" else "deployed_fp32"] = ev.metrics
        check = {**q.check_gate(ref, ev, req.max_drop), "runtime_inference_precision":
                 ev.metrics["runtime_inference_precision"]}
        if req.precision == "int8":
            gate["fallback_check"] = check
        else:
            gate = {**check, "method": f"{final} requested, no quantization"}
        if not check["passed"]:
            banner([f"THE {final.upper()} PACKAGE DIFFERS FROM THE F32 REFERENCE: {check['reason']}",
                    f"(the daemon computes it in {check['runtime_inference_precision']}); review before deploying"])
    metrics["gate"] = gate
    report.update({"precision": final, "metrics": metrics, "speed_ms_per_tile": _speed(ctx, ref_pred, final),
                   "load_avg": os.getloadavg()[0], "cpu_check": _write_cpu_check(ctx, ref_pred).to_dict()})
    return report


def check_tiles(items: list[tuple[np.ndarray, np.ndarray]], spec: Any, n_defect: int = 4, n_clean: int = 4,
                seed: int = 0) -> np.ndarray:
    """Tiles for the package's CPU check (edge.cpu_check): the `n_defect` validation tiles with the most
    defect pixels (where a wrong kernel shows first) and `n_clean` clean ones, cut by the daemon's own
    `preprocess`; uint8 (lossless for 8-bit frames)."""
    mspec = q._mask_spec(spec)
    defect: list[tuple[int, np.ndarray]] = []
    clean: list[np.ndarray] = []
    for image, mask in items:
        tiles, _ = preprocess(image, spec)
        mtiles, _ = preprocess(mask.astype(np.uint8) * np.uint8(255), mspec)
        for tile, mt in zip(tiles, mtiles, strict=True):
            count = int(np.count_nonzero(mt))
            if count:
                defect.append((count, tile.astype(np.uint8)))
                defect = sorted(defect, key=lambda d: -d[0])[:n_defect]
            elif len(clean) < 8 * n_clean:
                clean.append(tile.astype(np.uint8))
    rng = np.random.default_rng(seed)
    picked = [clean[int(i)] for i in rng.permutation(len(clean))[:n_clean]]
    return np.stack([t for _, t in defect] + picked)


def _write_cpu_check(ctx: BuildContext, ref_pred: q.OVPredictor) -> Any:
    """cpu_check.npz in the package: check tiles, the FP32 reference for them, and the tolerances that
    follow from how far the shipped model is from it on this machine (edge.cpu_check)."""
    from edge.cpu_check import CHECK_FILE, write_check
    from edge.inference import Inferencer

    tiles = check_tiles(ctx.items, ctx.meta.input_spec)
    map_ref, part_ref = ref_pred.infer_tiles_parts(tiles.astype(np.float32))
    shipped = Inferencer(ctx.root, num_requests=1, hint="LATENCY")
    check = write_check(ctx.root / CHECK_FILE, tiles, map_ref, part_ref, shipped)
    print(f"cpu check: {len(tiles)} tiles in {CHECK_FILE}; here {check.describe()}", file=sys.stderr)
    return check


def _stage(ctx: BuildContext, metrics: dict[str, Any], model: ov.Model, prec: str, fp16: bool = False) -> Any:
    """Write model.xml as the candidate and judge it through the daemon's Inferencer."""
    from edge.inference import Inferencer

    save_ir(model, ctx.root / "model.xml", fp16=fp16)
    write_meta(ctx, prec, metrics)
    inf = Inferencer(ctx.root, num_requests=1, hint="LATENCY")
    ev = q.evaluate_model(inf.predict_part, ctx.items, ctx.names, ctx.meta.postprocess, f"validate {prec}")
    ev.metrics["runtime_inference_precision"] = q.inference_precision(inf.compiled)
    return ev


# Accuracy control judges the model NNCF holds in memory, compiled in f32; the gate judges the saved IR as the edge
# compiles it. They differed: 2026-12-06 accuracy control "achieved" a drop of 0.0088 and the saved IR's was 0.0105,
# so the gate refused it and FP16 shipped (two of three seeds); the edge then ran the float parts of an INT8 model in
# bf16 on such CPUs. The edge compiles them in f32 since 2026-12-07 (edge.inference.compile_config), and the saved
# IR gave the in-memory model's part scores exactly when compiled alike; the margin stays for whatever else differs.
AC_TARGET_SHARE = 0.5


def _int8_gate(ctx: BuildContext, req: ExportRequest, fp32: ov.Model, ref: Any, metrics: dict[str, Any],
               report: dict[str, Any]) -> dict[str, Any]:
    """Plain INT8, then accuracy-controlled INT8 if plain fails and time allows; the gate's verdict.
    The candidate left in model.xml and metrics["int8"] are the last one tried."""
    spec, params, items, max_drop = ctx.meta.input_spec, ctx.meta.postprocess, ctx.items, req.max_drop
    calib = q.sample_calibration_tiles(ctx.calib_samples, spec, req.calib_size, req.seed)
    report["calibration"] = calib.info()
    print(f"quantize: NNCF PTQ on {len(calib.tiles)} tiles ({calib.n_defect_tiles} with defects), "
          f"preset {req.preset}", file=sys.stderr)
    plain = q.quantize_int8(fp32, calib, req.preset)
    t_val = time.monotonic()
    cand = _stage(ctx, metrics, plain, "int8")
    t_val = time.monotonic() - t_val
    n_plain = q.count_quantized(plain)
    gate = {**q.check_gate(ref, cand, max_drop), "method": "nncf.quantize", "quantizers": n_plain}
    iterations, subset = q.restorer_budget(req.max_minutes * 60, t_val, n_plain, len(items))
    if not gate["passed"] and iterations == 0:
        gate["accuracy_control"] = (f"skipped: one validation takes {t_val:.0f} s, so accuracy control "
                                    f"cannot run within --max-minutes {req.max_minutes:g}")
        print(f"gate: plain INT8 fails ({gate['reason']}); {gate['accuracy_control']}", file=sys.stderr)
    elif not gate["passed"]:
        target = max_drop * AC_TARGET_SHARE
        print(f"gate: plain INT8 fails ({gate['reason']}); trying accuracy-controlled quantization "
              f"(at most {iterations} operation(s) reverted, ranking on {subset} image(s), to stay within "
              f"--max-minutes {req.max_minutes:g}; aiming at a pixel-IoU drop <= {target:g} in NNCF's own "
              f"measurement, so the saved IR stays within the gate's {max_drop:g})", file=sys.stderr)
        first = gate
        controlled = q.quantize_int8_controlled(fp32, calib, items, spec, params, target, req.preset,
                                                max_iterations=iterations, ranking_subset=subset,
                                                reference_flagged=ref.flagged)
        cand = _stage(ctx, metrics, controlled, "int8")
        n_kept = q.count_quantized(controlled)
        gate = {**q.check_gate(ref, cand, max_drop), "method": "nncf.quantize_with_accuracy_control",
                "quantizers": n_kept, "accuracy_control_target_drop": target, "plain_int8": first}
        if gate["passed"] and n_kept < n_plain / 2:
            banner([f"THE INT8 PACKAGE KEEPS ONLY {n_kept} OF {n_plain} QUANTIZERS: accuracy control",
                    "reverted the rest to float, so it runs mostly in float; check its speed with bench"])
    metrics["int8"] = cand.metrics
    return gate


def _speed(ctx: BuildContext, ref_pred: q.OVPredictor, final: str) -> dict[str, float]:
    """Median ms per tile of the FP32 reference and of the deployed model (1 request, LATENCY hint)."""
    from edge.inference import Inferencer

    tiles, _ = preprocess(ctx.items[0][0], ctx.meta.input_spec)
    t = np.ascontiguousarray(tiles[:1])
    speed = {"fp32_ms": median_latency_ms(ov_runner(ref_pred.compiled, t), 1.0)}
    deployed = Inferencer(ctx.root, num_requests=1, hint="LATENCY")
    key = f"{final}_ms" if final != "fp32" else "deployed_fp32_ms"
    speed[key] = median_latency_ms(ov_runner(deployed.compiled, t), 1.0)
    return speed


def _torch_parity(module: torch.nn.Module, ref: q.OVPredictor, image: np.ndarray, spec: Any) -> float:
    """Max |p_torch - p_openvino| over the tiles of one real image and one random tile."""
    tiles, _ = preprocess(image, spec)
    rnd = np.random.default_rng(0).uniform(0, 255, tiles[:1].shape).astype(np.float32)
    x = np.concatenate([tiles[:4], rnd])
    from training.core.predict import predict_tiles_part

    pt, pt_parts = predict_tiles_part(module, x, batch=len(x))
    ov_maps, ov_parts = ref.infer_tiles_parts(x)
    diff = float(np.abs(pt - ov_maps).max())
    if pt_parts is not None and ov_parts is not None:
        diff = max(diff, float(np.abs(pt_parts - ov_parts).max()))
    elif (pt_parts is None) != (ov_parts is None):
        raise ExportError("the OpenVINO graph and the PyTorch model disagree on having a part output")
    return diff


def _check_out(out: Path) -> None:
    """--out may be new, empty or an earlier package (replaced whole); anything else is never overwritten."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "package.json").exists())):
        raise ExportError(f"{out} exists and is not a model package; choose another --out")


def _replace_dir(staging: Path, out: Path) -> None:
    """Swap the finished package into place; an existing non-package folder is never deleted."""
    if out.exists():
        _check_out(out)  # again: it may have changed during the export
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def print_report(report: dict[str, Any], out: Path) -> None:
    m = report["metrics"]
    keys = ("pixel_iou", "pixel_f1", "image_recall", "image_precision", "image_f1")
    cols = [k for k in ("fp32", "int8", "fp16", "deployed_fp32") if k in m]
    print(f"\nexport report ({out}): shipped precision {report['precision'].upper()}")
    print("(fp32 = f32 reference; the other columns as the daemon runs them, see runtime_inference_precision)")
    print(f"{'metric':<18}" + "".join(f"{c:>14}" for c in cols))
    for k in keys:
        print(f"{k:<18}" + "".join(f"{float(m[c].get(k, float('nan'))):>14.4f}" for c in cols))
    print("median ms per tile (1 request, LATENCY hint): "
          + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in report["speed_ms_per_tile"].items())
          + f" (load avg {report['load_avg']:.1f})")
    gate = m.get("gate", {})
    print(f"gate: {'PASSED' if gate.get('passed') else 'FAILED'} - {gate.get('reason')}"
          + (f" -> fallback {gate['fallback'].upper()}" if gate.get("fallback") else ""))
    if "verdict_disagreements" in gate:
        print(f"verdicts differ from FP32 on {gate['verdict_disagreements']}/{gate['n_images']} validation images "
              f"({len(gate['new_false_alarms'])} new false alarm(s), {len(gate['missed_defective_parts'])} miss(es))")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m training export`; 0 = package written and verified, 2 = failed."""
    p = argparse.ArgumentParser(prog="python -m training export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/best.pt written by 'python -m training train'")
    p.add_argument("--out", required=True, help="model package folder to (re)create")
    p.add_argument("--calib-data", help="dataset folder (the training folder: its split gives calibration/validation)")
    p.add_argument("--val-data", help="separate validation dataset for the accuracy gate")
    p.add_argument("--precision", default="int8", choices=("int8", "fp16", "fp32"))
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--max-drop", type=float, default=0.01, help="largest allowed pixel-IoU loss of INT8")
    p.add_argument("--calib-size", type=int, default=300, help="number of calibration tiles")
    p.add_argument("--preset", default="performance", choices=("performance", "mixed"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=5.0,
                   help="time allowed for accuracy-controlled INT8 after plain INT8 fails the gate; beyond it "
                        "the export falls back to FP16 early and says why (default 5)")
    p.add_argument("--sign", metavar="KEY", dest="sign_key", help="Ed25519 private key (PEM, `python -m edge "
                   "keygen`): write package.json.sig for stations with model.public_key")
    a = p.parse_args(argv)
    try:
        export(ExportRequest(**vars(a)))  # one request field per flag
    except (ExportError, ValueError, OSError) as e:  # DataError, CheckpointError, PackageError are ValueErrors
        print(f"error: export failed, no package written: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
