"""Side-by-side speed of PyTorch eager FP32, OpenVINO FP32 and OpenVINO INT8 on one tile.

    python -m training bench --checkpoint RUN/best.pt --model MODEL_DIR --json OUT.json \
        [--threads 2] [--seconds 20] [--data DIR]

Why this shape: the line PC is a small shared CPU and these numbers decide whether INT8 is
worth shipping, so every engine gets the same input tile, the same thread count and batch 1,
and they run in interleaved rounds (A B C, B C A, ...) inside one process, so a noisy
neighbour slows all of them alike instead of whichever happened to run at the time.

Besides latency (median ms per tile) and async throughput (tiles/s, THROUGHPUT hint), it
reports the model's work per tile (2 x conv MACs) and the share of the CPU's INT8 peak the
INT8 model reaches:

    peak int8 ops/s = cores x f_clock x vnni_units x 64 MACs/cycle x 2 ops/MAC

(one 512-bit VPDPBUSD does 16 lanes x 4 int8 multiply-adds = 64 MACs; `vnni_units` is how
many such instructions a core can issue per cycle, 2 by default - the two FMA pipes of Zen 4/5
and Ice Lake+ server cores; the clock is the one /proc/cpuinfo or lscpu reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from edge.contract import InputSpec
from edge.package import read_package
from edge.preprocess import preprocess
from training.release.quantize import inference_precision
from training.release.timing import async_throughput, compile_ov, interleaved_latency, ov_runner, torch_runner

# --------------------------------------------------------------------------- model work and CPU peak


def conv_gflops(module: torch.nn.Module, spec: InputSpec) -> float:
    """2 x multiply-accumulates of every Conv2d for one tile (convs are >99 % of a U-Net's work)."""
    macs = 0

    def hook(m: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += int(out[0].numel()) * (m.in_channels // m.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module(torch.zeros(1, spec.channels, spec.tile, spec.tile))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs / 1e9


def cpu_info() -> dict[str, Any]:
    """Model name, clock (MHz: lscpu max if known, else /proc/cpuinfo current), cores, VNNI flag."""
    info: dict[str, Any] = {"model": platform.processor() or "unknown", "mhz": 0.0,
                            "logical_cpus": os.cpu_count() or 1, "avx512_vnni": False, "mhz_source": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
        mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        if names:
            info["model"] = names[0]
        if mhz:
            info["mhz"], info["mhz_source"] = max(mhz), "/proc/cpuinfo cpu MHz"
        info["avx512_vnni"] = "avx512_vnni" in text
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz:"):
                info["mhz"], info["mhz_source"] = float(line.split(":")[1]), "lscpu CPU max MHz"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return info


def vnni_peak_gops(cores: int, mhz: float, units: int = 2) -> tuple[float, str]:
    peak = cores * mhz * 1e6 * units * 64 * 2 / 1e9
    return peak, f"{cores} cores x {mhz:.0f} MHz x {units} VNNI units x 64 int8 MACs/cycle x 2 ops = {peak:.0f} GOPS"


# --------------------------------------------------------------------------- the benchmark


def pick_tile(spec: InputSpec, data: str | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """A real tile (the first with a defect if any) when data is given, else uniform noise."""
    if data:
        from training.core.data import load_dataset, load_sample

        ds = load_dataset(data)
        sample = next((s for s in ds.samples if s.defective), ds.samples[0])
        image, _ = load_sample(sample, spec.color)
        tiles, _ = preprocess(image, spec)
        return np.ascontiguousarray(tiles[:1]), f"real tile of {sample.name}"
    rng = np.random.default_rng(seed)
    tile = rng.uniform(0, 255, (1, spec.channels, spec.tile, spec.tile)).astype(np.float32)
    return tile, "uniform random pixels"


def bench(checkpoint: str | Path, model_dir: str | Path, threads: int = 0, seconds: float = 20.0,
          data: str | None = None, vnni_units: int = 2) -> dict[str, Any]:
    from training.core.checkpoint import load_model

    threads = threads or (os.cpu_count() or 1)
    meta = read_package(model_dir)
    module, ck = load_model(checkpoint)
    spec = meta.input
    if (spec.tile, spec.channels) != (ck.input_spec.tile, ck.input_spec.channels):
        raise ValueError(f"checkpoint input {ck.input_spec} does not match package input {spec}")
    torch.set_num_threads(threads)
    tile, tile_source = pick_tile(spec, data)
    load_before = os.getloadavg()
    print(f"bench: {threads} thread(s), tile {spec.tile}, {tile_source}, load avg {load_before[0]:.2f}",
          file=sys.stderr)
    model_dir = Path(model_dir)
    fp32_xml = model_dir / "fp32" / "model.xml"
    deploy_xml = model_dir / "model.xml"
    c_fp32 = compile_ov(fp32_xml, threads, precision="f32")
    c_fp32_default = compile_ov(fp32_xml, threads)
    c_deploy = compile_ov(deploy_xml, threads, precision="auto")  # as the daemon compiles it
    c_deploy_default = compile_ov(deploy_xml, threads)
    runners = {
        "torch_fp32": torch_runner(module, tile),
        "ov_fp32": ov_runner(c_fp32, tile),
        "ov_fp32_default": ov_runner(c_fp32_default, tile),
        "ov_int8": ov_runner(c_deploy, tile),
        "ov_int8_default": ov_runner(c_deploy_default, tile),
    }
    lat = interleaved_latency(runners, seconds * 0.6)
    med = {k: float(np.median(v)) for k, v in lat.items()}
    queues = {}
    for name, xml, prec in (("ov_fp32", fp32_xml, "f32"), ("ov_int8", deploy_xml, "auto")):
        comp = compile_ov(xml, threads, hint="THROUGHPUT", precision=prec)
        n = int(comp.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queues[name] = (ov.AsyncInferQueue(comp, n), n)
    fps = async_throughput(queues, tile, seconds * 0.4)
    gflops = conv_gflops(module, spec)
    cpu = cpu_info()
    cores = min(threads, cpu["logical_cpus"])
    peak, formula = vnni_peak_gops(cores, cpu["mhz"], vnni_units)
    achieved_lat = gflops / (med["ov_int8"] / 1e3)
    achieved_tp = gflops * fps["ov_int8"]
    result = {
        "torch_fp32_ms": med["torch_fp32"],
        "ov_fp32_ms": med["ov_fp32"],
        "ov_int8_ms": med["ov_int8"],
        "ov_fp32_fps": fps["ov_fp32"],
        "ov_int8_fps": fps["ov_int8"],
        "speedup_int8_vs_torch": med["torch_fp32"] / med["ov_int8"],
        "speedup_int8_vs_ov_fp32": med["ov_fp32"] / med["ov_int8"],
        "speedup_int8_vs_ov_fp32_throughput": fps["ov_int8"] / fps["ov_fp32"],
        "gflops_per_tile": gflops,
        "int8_gops_latency": achieved_lat,
        "int8_gops_throughput": achieved_tp,
        "vnni_peak_gops": peak,
        "vnni_peak_share": achieved_tp / peak if peak else float("nan"),
        "peak_formula": formula,
        "precision": meta.precision,
        "gate": meta.metrics.get("gate", {}),
        "extra_ms": {
            "ov_fp32_default_precision": med["ov_fp32_default"],
            "ov_int8_default_precision": med["ov_int8_default"],
            "default_inference_precision": inference_precision(c_fp32_default),
        },
        "samples": {k: len(v) for k, v in lat.items()},
        "threads": threads,
        "tile": spec.tile,
        "channels": spec.channels,
        "input": tile_source,
        "cpu": cpu,
        "load_avg_before": load_before[0],
        "load_avg_after": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "openvino": ov.__version__},
    }
    return result


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("PyTorch eager FP32", r["torch_fp32_ms"], None),
        ("OpenVINO FP32 (f32)", r["ov_fp32_ms"], r["ov_fp32_fps"]),
        (f"OpenVINO FP32 (default {r['extra_ms']['default_inference_precision']})",
         r["extra_ms"]["ov_fp32_default_precision"], None),
        (f"OpenVINO {r['precision'].upper()} (model.xml)", r["ov_int8_ms"], r["ov_int8_fps"]),
    ]
    print(f"\n{'engine':<40} {'ms/tile':>9} {'tiles/s':>9}")
    for name, ms, fps in rows:
        print(f"{name:<40} {ms:>9.2f} {(f'{fps:.1f}' if fps else '-'):>9}")
    t_ok = "OK" if r["speedup_int8_vs_torch"] >= 5 else "below target 5x"
    o_ok = "OK" if r["speedup_int8_vs_ov_fp32"] >= 2.5 else "below target 2.5x"
    print(f"\nspeed-up INT8 vs PyTorch FP32: {r['speedup_int8_vs_torch']:.2f}x ({t_ok}; goal 8x)")
    print(f"speed-up INT8 vs OpenVINO FP32: {r['speedup_int8_vs_ov_fp32']:.2f}x latency, "
          f"{r['speedup_int8_vs_ov_fp32_throughput']:.2f}x throughput ({o_ok})")
    print(f"work {r['gflops_per_tile']:.3f} GFLOP/tile; INT8 reaches {r['int8_gops_throughput']:.1f} GOPS = "
          f"{100 * r['vnni_peak_share']:.1f}% of peak ({r['peak_formula']})")
    gate = r.get("gate") or {}
    print(f"accuracy gate: {'passed' if gate.get('passed') else 'NOT passed'} - {gate.get('reason', 'n/a')}")
    print(f"load avg {r['load_avg_before']:.2f} -> {r['load_avg_after']:.2f} on {r['cpu']['logical_cpus']} CPUs")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m training bench`; 0 = done, 2 = unusable input."""
    p = argparse.ArgumentParser(prog="python -m training bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/best.pt the package was exported from")
    p.add_argument("--model", required=True, help="model package folder (model.xml + fp32/model.xml)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--threads", type=int, default=0, help="threads for every engine (default: all CPUs)")
    p.add_argument("--seconds", type=float, default=20.0, help="time budget (60%% latency, 40%% throughput)")
    p.add_argument("--data", help="take the tile from this dataset instead of random pixels")
    p.add_argument("--vnni-units", type=int, default=2, help="VNNI instructions per cycle per core for the peak")
    args = p.parse_args(argv)
    try:
        r = bench(args.checkpoint, args.model, args.threads, args.seconds, args.data, args.vnni_units)
    except (ValueError, OSError) as e:  # PackageError, CheckpointError, DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(r)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
