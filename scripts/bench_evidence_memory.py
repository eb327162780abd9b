#!/usr/bin/env python3
"""Traced memory peak and time of one 5 MP fail's evidence save: a baseline commit's edge/evidence.py
against this tree's, rounds interleaved.

    .venv/bin/python scripts/bench_evidence_memory.py [--baseline c97bddf] [--size 2448x2048] [--rounds 3]

The baseline is given the full mask (as its background writer rebuilt it); this tree is given the
`MaskCrop` its writer holds. tracemalloc sees numpy's and OpenCV's Python-side arrays (the images
and encoder buffers), not libpng's row buffers. The script fails if the files differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench_bigframe import load_at  # noqa: E402
from bench_failrate import defect_detection  # noqa: E402

from edge import evidence  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="c97bddf", help="commit whose edge/evidence.py to compare (default: the "
                    "last one before the writer held one image at a time)")
    ap.add_argument("--size", default="2448x2048", help="WxH of the mono frame")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    old = load_at(args.baseline, "evidence")
    frame = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)  # noise: the largest PNGs
    fail = defect_detection(h, w, 1)
    crop = evidence.MaskCrop.of(fail.mask)
    runs = {f"baseline {args.baseline}": lambda d: old.EvidenceStore(d, 1 << 40).save(
                "e1", 0.0, frame, crop.full(), fail.regions, "fail"),
            "this tree": lambda d: evidence.EvidenceStore(d, 1 << 40).save("e1", 0.0, frame, crop, fail.regions, "fail")}
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    files: dict[str, dict[str, bytes]] = {}
    for _ in range(args.rounds):
        for name, save in runs.items():
            with tempfile.TemporaryDirectory() as d:
                tracemalloc.start()
                t0 = time.perf_counter()
                save(d)
                ms = (time.perf_counter() - t0) * 1000
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                got[name].append((peak / 1e6, ms))
                files[name] = {p.name: p.read_bytes() for p in Path(d).rglob("*.*")}
    for name, v in got.items():
        print(f"{name}: traced peak {np.median([p for p, _ in v]):.1f} MB, {np.median([m for _, m in v]):.0f} ms "
              f"(median of {args.rounds})")
    a, b = files.values()
    if a != b:
        print("FILES DIFFER:", sorted(a), sorted(b))
        return 1
    print(f"files identical: {', '.join(sorted(a))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
