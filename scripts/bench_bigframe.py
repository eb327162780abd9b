#!/usr/bin/env python3
"""Where one big frame's time goes: per-stage times of the frame path, a baseline commit against this tree.

    .venv/bin/python scripts/bench_bigframe.py [--model MODEL_DIR] [--size 2448x2048] [--baseline REV]
                                               [--rounds 7] [--profile]

The baseline's edge/preprocess.py, edge/postprocess.py and edge/evidence.py are loaded from git
(`git show REV:...`) next to this tree's, and every round times both on the same frame, one after
the other (interleaved rounds, so the shared machine's load hits both alike). Stages: preprocess
(colour, scale, tiles), inference of the tiles (one synchronous request; not changed, timed once
per round), stitch (blend + resize to the frame), postprocess (on the stitched map), judge (the tile
outputs to regions as the daemon's result thread does it: edge.postprocess.postprocess_map on the
blended map, which skips the full map - only for a package at input scale 1 with a power-of-two
output_stride, so pass --model of such a package to measure it; the tiny default package's scale 0.25
takes the full-map fallback), the overlay
drawing and the evidence files (frame, overlay and mask encoded and written by EvidenceStore.save,
as the background writer does), for a failing part with one disc-shaped defect
(bench_failrate.defect_detection). The outputs of both are compared: the script fails if the map,
the regions, the mask or the overlay differ. Median ms per stage; --profile prints a cProfile of
this tree's stages.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from bench_failrate import defect_detection  # noqa: E402

from edge import evidence, postprocess, preprocess  # noqa: E402
from edge.inference import Inferencer  # noqa: E402
from edge.sources.synthetic import synth_part  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402


def load_at(rev: str, module: str) -> ModuleType:
    """edge/<module>.py as it was at `rev`, as a separate module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:edge/{module}.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"baseline_{module}", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:edge/{module}.py", "exec"), mod.__dict__)
    return mod


def stages(pre: ModuleType, post: ModuleType, ev: ModuleType, inf: Inferencer, frame: np.ndarray,
           store_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """One frame through the stages with these module versions: (ms per stage, outputs)."""
    t: dict[str, float] = {}
    out: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        r = fn()
        t[name] = (time.perf_counter() - t0) * 1000
        return r

    tiles, layout = timed("preprocess", lambda: pre.preprocess(frame, inf.spec))
    probs = timed("inference", lambda: inf.infer_tiles(tiles))
    prob = out["prob"] = timed("stitch", lambda: pre.stitch(probs, layout, inf.spec.overlap))
    out["det"] = timed("postprocess", lambda: post.postprocess(prob, inf.params))
    out["judged"] = timed("judge (daemon: blend -> regions)", lambda: judge(pre, post, inf, probs, layout))
    fail = defect_detection(frame.shape[0], frame.shape[1], 1)
    out["overlay"] = timed("draw_overlay", lambda: ev.draw_overlay(frame, fail.mask, fail.regions, "fail"))
    store = ev.EvidenceStore(store_dir, 1 << 40)
    timed("evidence files", lambda: store.save("e1", time.time(), frame, fail.mask, fail.regions, "fail"))
    out["files"] = {p.name: p.stat().st_size for p in store_dir.rglob("*.*")}
    t["total"] = sum(v for k, v in t.items() if not k.startswith("judge"))  # judge repeats stitch + postprocess
    return t, out


def judge(pre: ModuleType, post: ModuleType, inf: Inferencer, probs: np.ndarray, layout: Any) -> Any:
    """The tile outputs to a Detection as the daemon's result thread gets there: postprocess_map on the
    blended map where the modules have it (no full map for a part without defect pixels; the full map
    after all for input scale != 1, as the tiny default package has), else stitch + postprocess."""
    if hasattr(post, "postprocess_map") and hasattr(pre, "blend_tiles"):
        return post.postprocess_map(pre.blend_tiles(probs, layout, inf.spec.overlap), inf.params)
    return post.postprocess(pre.stitch(probs, layout, inf.spec.overlap), inf.params)


def same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the outputs that differ between the baseline and this tree."""
    diff = []
    if a["prob"].shape != b["prob"].shape or not np.array_equal(a["prob"], b["prob"]):
        diff.append("probability map")
    da, db = a["det"], b["det"]
    if da.regions != db.regions or da.score != db.score or not np.array_equal(da.mask, db.mask):
        diff.append("detection")
    for judged, det in ((a["judged"], da), (b["judged"], db)):  # the daemon's path gives postprocess's result
        if judged.regions != det.regions or judged.score != det.score or not np.array_equal(judged.mask, det.mask):
            diff.append("judged detection")
    if not np.array_equal(a["overlay"], b["overlay"]):
        diff.append("overlay")
    return diff


def png_settings(frame: np.ndarray, rounds: int) -> None:
    """OpenCV's default PNG parameters against explicit compression levels, rounds interleaved."""
    overlay = evidence.to_bgr8(frame)
    settings = {"default (no parameters)": [], "IMWRITE_PNG_COMPRESSION 0": [cv2.IMWRITE_PNG_COMPRESSION, 0],
                "IMWRITE_PNG_COMPRESSION 1": [cv2.IMWRITE_PNG_COMPRESSION, 1],
                "IMWRITE_PNG_COMPRESSION 3": [cv2.IMWRITE_PNG_COMPRESSION, 3]}
    took: dict[tuple[str, str], list[float]] = {}
    size: dict[tuple[str, str], int] = {}
    for _ in range(rounds):
        for name, params in settings.items():
            for what, img in (("frame", frame), ("overlay", overlay)):
                t0 = time.perf_counter()
                _ok, buf = cv2.imencode(".png", img, params)
                took.setdefault((name, what), []).append((time.perf_counter() - t0) * 1000)
                size[(name, what)] = len(buf)
    print("| PNG setting | frame ms | frame MB | overlay ms | overlay MB |\n| --- | --- | --- | --- | --- |")
    for name in settings:
        f, o = (name, "frame"), (name, "overlay")
        print(f"| {name} | {np.median(took[f]):.1f} | {size[f] / 1e6:.2f} | {np.median(took[o]):.1f} | "
              f"{size[o] / 1e6:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model package (default: a tiny one with the production "
                    "recipe's tiling: tile 160, overlap 32, scale 0.25)")
    ap.add_argument("--size", default="2448x2048", help="frame WxH (mono)")
    ap.add_argument("--baseline", default="cbcfb19", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="cProfile this tree's stages (top 25 by own time)")
    ap.add_argument("--png", action="store_true", help="also time PNG settings on the frame and its overlay")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-bigframe-"))
    pkg = args.model or make_tiny_package(work / "tiny160", tile=160, scale=0.25)
    inf = Inferencer(pkg)
    frame = synth_part(h, w, True, np.random.default_rng(0))
    old = (load_at(args.baseline, "preprocess"), load_at(args.baseline, "postprocess"), load_at(args.baseline, "evidence"))
    new = (preprocess, postprocess, evidence)
    print(f"model {inf.meta.name} ({inf.info.precision}, tile {inf.spec.tile}, scale {inf.spec.scale}), frame {w}x{h}, "
          f"baseline {args.baseline}, cpu {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    times: dict[str, dict[str, list[float]]] = {"baseline": {}, "this tree": {}}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, mods in (("baseline", old), ("this tree", new)) if r % 2 else (("this tree", new), ("baseline", old)):
            t, out = stages(*mods, inf, frame, work / f"ev-{name.replace(' ', '')}-{r}")
            if r:
                for k, v in t.items():
                    times[name].setdefault(k, []).append(v)
            if name == "baseline":
                ref = out
            else:
                mine = out
        diff = same(ref, mine)
        if diff:
            print(f"OUTPUTS DIFFER: {diff}")
            return 1
    print(f"load after {os.getloadavg()[0]:.2f}; outputs identical in all rounds; evidence files (this tree): "
          f"{mine['files']}, baseline: {ref['files']}")
    print(f"| stage | {args.baseline} ms | this tree ms | ratio |\n| --- | --- | --- | --- |")
    for k in times["baseline"]:
        a, b = float(np.median(times["baseline"][k])), float(np.median(times["this tree"][k]))
        print(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    if args.png:
        png_settings(frame, args.rounds)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [stages(*new, inf, frame, work / f"prof-{i}") for i in range(3)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
