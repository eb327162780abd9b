#!/usr/bin/env python3
"""Judging a part from its coarse map (edge.postprocess.postprocess_map) against resizing it to the frame
first (postprocess(cmap.full())), on 5 MP coarse maps at output_stride 4:

    .venv/bin/python scripts/bench_coarse_post.py [--size 2448x2048] [--rounds 15]

Maps (random tile outputs blended by edge.preprocess.blend_tiles on the production tiling, tile 160,
overlap 32): `good` (noise below the threshold: most parts), `blob` (one defect), `specks` (isolated
high coarse pixels all over the frame). Both paths run on the same map one after the other, the order
alternating per round (a shared machine's load hits both alike); the script fails if the detections
differ. Prints the median ms per call, the ratio, and the peak traced allocation per call
(tracemalloc, one extra call each; np.zeros pages never touched still count).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from edge.contract import Detection, InputSpec, PostprocessParams
from edge.postprocess import postprocess, postprocess_map
from edge.preprocess import CoarseMap, blend_tiles, plan_tiles


def maps(height: int, width: int) -> dict[str, CoarseMap]:
    spec = InputSpec(tile=160, overlap=32, output_stride=4)
    layout = plan_tiles(height, width, spec)
    rng = np.random.default_rng(0)
    side = spec.tile // spec.output_stride
    good = np.stack([cv2.GaussianBlur(rng.random((side, side), dtype=np.float32), (0, 0), 2) * 0.3
                     for _ in layout.origins])
    blob = good.copy()
    yy, xx = np.mgrid[:side, :side]
    blob[len(blob) // 2] = np.maximum(blob[len(blob) // 2],
                                      0.95 * np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 30.0).astype(np.float32))
    specks = good.copy()
    specks[rng.random(specks.shape) < 0.0005] = 0.9
    return {name: blend_tiles(out, layout, spec.overlap) for name, out in
            (("good", good), ("blob", blob), ("specks", specks))}


def same(a: Detection, b: Detection) -> bool:
    return (a.regions == b.regions and a.score == b.score and a.part_score == b.part_score
            and a.mask.tobytes() == b.mask.tobytes())


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2448x2048", help="frame WxH")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    params = PostprocessParams(pixel_threshold=0.5, min_area=20, open_radius=1, close_radius=2)
    print(f"frame {w}x{h}, k 4, {params}, cpu {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    print("| map | regions | full map + postprocess ms | postprocess_map ms | ratio | peak MB full | peak MB map |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, cmap in maps(h, w).items():
        paths: dict[str, Callable[[], Detection]] = {
            "full": lambda cmap=cmap: postprocess(cmap.full(), params),  # type: ignore[misc]
            "map": lambda cmap=cmap: postprocess_map(cmap, params),  # type: ignore[misc]
        }
        took: dict[str, list[float]] = {"full": [], "map": []}
        dets: dict[str, Detection] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for key in ("full", "map") if r % 2 else ("map", "full"):
                t0 = time.perf_counter()
                dets[key] = paths[key]()
                if r:
                    took[key].append((time.perf_counter() - t0) * 1000)
            if not same(dets["full"], dets["map"]):
                print(f"DETECTIONS DIFFER on {name}")
                return 1
        a, b = float(np.median(took["full"])), float(np.median(took["map"]))
        pa, pb = peak_bytes(paths["full"]) / 1e6, peak_bytes(paths["map"]) / 1e6
        print(f"| {name} | {len(dets['map'].regions)} | {a:.2f} | {b:.2f} | {b / a:.3f} | {pa:.1f} | {pb:.1f} |",
              flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
