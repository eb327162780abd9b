#!/usr/bin/env python3
"""What a shadow model costs the line: live throughput with and without `model.shadow`.

    .venv/bin/python scripts/bench_shadow.py [--model PKG] [--shadow PKG] [--parts N] [--size WxH]
        [--shares 1.0,0.5,0.25] [--repeat 2]

The in-process pipeline (edge.daemon.Pipeline: synthetic `pool` parts as fast as it takes them, a real
Mosquitto, evidence off) runs N parts without a shadow, then with the shadow on every part at each
`model.shadow_cpu_share`, alternating, `--repeat` times. Per row: parts/s, the ratio to the mean of the
runs without a shadow, and how many parts the shadow judged and thinned. Default packages: the tiny
test model (no torch) for both; with real packages pass --model and --shadow. Prints the load average:
on a shared 2-core machine the ratios move with the other jobs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.config import validate_config  # noqa: E402
from edge.daemon import Pipeline  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.daemon_proc import station  # noqa: E402
from tests.tiny_package import make_tiny_package  # noqa: E402


def run_once(work: Path, broker: Broker, model: Path, shadow: Path | None, share: float, parts: int,
             size: tuple[int, int]) -> dict[str, Any]:
    state = work / f"state-{time.monotonic_ns()}"
    data = station(state, model, broker, {"type": "synthetic", "fps": 0, "count": parts, "pool": 8,
                                          "width": size[0], "height": size[1]},
                   evidence={"enabled": False}, mqtt={"no_subscribers": "deliver"},
                   model={"num_requests": 0, "threads": 0, **({"shadow": str(shadow), "shadow_cpu_share": share}
                                                              if shadow else {})})
    p = Pipeline(validate_config(data), threading.Event())
    p.start()
    t0 = time.monotonic()
    p.run()
    elapsed = time.monotonic() - t0
    snap = p.shadow.snapshot() if p.shadow else {}
    p.shutdown()
    done = sum(p.counts.get(k, 0) for k in ("pass", "fail", "error"))
    return {"shadow": share if shadow else None, "fps": done / elapsed, "parts": done,
            "judged": snap.get("run"), "thinned": snap.get("thinned")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--shadow", type=Path)
    ap.add_argument("--parts", type=int, default=400)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--shares", default="1.0,0.5,0.25")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or make_tiny_package(work / "live", version="1.0.0")
        shadow = args.shadow or make_tiny_package(work / "shadow", version="2.0.0", min_area=5000)
        broker = Broker(work / "broker").start()
        try:
            rows = []
            for _ in range(args.repeat):
                rows.append(run_once(work, broker, model, None, 1.0, args.parts, (w, h)))
                for share in (float(s) for s in args.shares.split(",")):
                    rows.append(run_once(work, broker, model, shadow, share, args.parts, (w, h)))
        finally:
            broker.kill()
    base = statistics.mean(r["fps"] for r in rows if r["shadow"] is None)
    print(f"{args.parts} parts of {w}x{h}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'shadow_cpu_share':>16} {'parts/s':>9} {'ratio':>6} {'judged':>7} {'thinned':>8}")
    for r in rows:
        share = "no shadow" if r["shadow"] is None else f"{r['shadow']:.2f}"
        print(f"{share:>16} {r['fps']:>9.1f} {r['fps'] / base:>6.2f} {r['judged'] or '':>7} {r['thinned'] or '':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
