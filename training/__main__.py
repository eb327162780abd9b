"""`python -m training {synth,train,evaluate,export,bench,tune,demo,review-export} ...`

Each command lives in its own module with a `main(argv) -> exit code`; this file only picks
one. Imports are lazy so that `python -m training synth` (numpy + OpenCV) never pays for, or
needs, torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "synth": ("", "synth_main", "generate a synthetic dataset (generic layout)"),
    "train": ("training.core.train", "main", "train the U-Net (also under torchrun)"),
    "evaluate": ("training.core.evaluate", "main", "metrics of a checkpoint or package on a dataset"),
    "export": ("training.release.export", "main", "checkpoint -> OpenVINO model package"),
    "bench": ("training.release.bench", "main", "latency / throughput of a model package"),
    "tune": ("training.core.tune", "main", "Optuna search over the training recipe"),
    "demo": ("training.demo.run", "main", "the whole product end to end on synthetic parts (scripts/demo.sh)"),
    "review-export": ("training.release.review_export", "main", "reviewed parts from the station page -> training data"),
}


def synth_main(argv: Sequence[str] | None = None) -> int:
    """`python -m training synth --out DIR --count N --seed S [--profile part|strip] [--size H W] [--color gray|bgr]`."""
    ap = argparse.ArgumentParser(prog="python -m training synth",
                                 description="Write synthetic textured parts with exact defect masks.")
    ap.add_argument("--out", required=True, help="dataset folder to write (images/ and masks/)")
    ap.add_argument("--count", type=int, required=True, help="number of parts")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same files")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="part size (default: the profile's, 256 x 256 parts, 500 x 1250 strips)")
    ap.add_argument("--profile", choices=("part", "strip"), default="part",
                    help="part: compact parts, five defect types; strip: long commutator-like strips with "
                         "hairline cracks (training/core/synth.py)")
    ap.add_argument("--color", choices=("gray", "bgr"), default="gray")
    ap.add_argument("--defect-fraction", type=float, default=0.5, help="share of defective parts")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from training.core.synth import generate_dataset

    try:
        counts = generate_dataset(args.out, args.count, args.seed, size=tuple(args.size) if args.size else None,
                                  color=args.color, defect_fraction=args.defect_fraction,
                                  progress=not args.no_progress, profile=args.profile)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} parts to {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<13} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: python -m training COMMAND [options]   (COMMAND --help for its options)\n\ncommands:\n"
              + "\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func, _ = COMMANDS[argv[0]]
    if not module:  # defined in this file
        return synth_main(argv[1:])
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
