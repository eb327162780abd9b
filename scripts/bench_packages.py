"""Per-frame cost of model packages side by side: the edge's own path (preprocess, infer every tile,
stitch, postprocess) on the same real frames, interleaved in one process so a noisy neighbour
slows every package alike. The first package is the reference of the ratios.

    .venv/bin/python scripts/bench_packages.py --data ../shared/data/magnetic-tile \
        --packages OLD_PKG NEW_PKG [--frames 40] [--rounds 6]

Why: issue 15 allows a new recipe at most 1.3x today's INT8 cost per frame, and two packages
can tile a frame differently (160 px tiles at scale 0.25 against 384 px at full resolution with a
coarse output), so a per-tile figure alone would mislead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge.inference import Inferencer
from edge.postprocess import postprocess
from edge.preprocess import plan_tiles, scaled_size
from training.core.data import load_dataset, load_sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder: its first --frames images are the frames")
    ap.add_argument("--packages", nargs="+", required=True, help="model package folders (the first = 1.00)")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (A B, B A, ...)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    infs = [Inferencer(Path(p), num_requests=1, hint="LATENCY") for p in args.packages]
    samples = load_dataset(args.data).samples[: args.frames]
    frames = [load_sample(s, infs[0].spec.color)[0] for s in samples]
    times: list[list[float]] = [[] for _ in infs]
    for r in range(args.rounds):
        order = list(range(len(infs)))
        if r % 2:
            order.reverse()
        for i in order:
            inf = infs[i]
            for frame in frames:
                t = time.perf_counter()
                prob, part = inf.predict_part(frame)
                postprocess(prob, inf.params, part)
                times[i].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    ref = statistics.median(times[0])
    rows = []
    for path, inf, ts in zip(args.packages, infs, times, strict=True):
        tiles = [len(plan_tiles(*scaled_size(f.shape[0], f.shape[1], inf.spec.scale), inf.spec).origins)
                 for f in frames]
        med = statistics.median(ts)
        rows.append({"package": path, "ms_per_frame_p50": round(1000 * med, 2),
                     "ms_per_frame_p90": round(1000 * float(np.percentile(ts, 90)), 2),
                     "ratio": round(med / ref, 3), "tiles_per_frame": round(float(np.mean(tiles)), 2),
                     "tile": inf.spec.tile, "scale": inf.spec.scale,
                     "output_stride": inf.spec.output_stride})
    print(f"{'package':<40} {'ms/frame p50':>12} {'p90':>8} {'ratio':>6} {'tiles':>6}  tile/scale/out-stride")
    for r in rows:
        print(f"{r['package']:<40} {r['ms_per_frame_p50']:>12.2f} {r['ms_per_frame_p90']:>8.2f} {r['ratio']:>6.2f} "
              f"{r['tiles_per_frame']:>6.2f}  {r['tile']}/{r['scale']}/{r['output_stride']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": len(frames), "rounds": args.rounds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
