"""Command line of a model's life on the station (edge.__main__ registers these):

    python -m edge golden add --config S.yaml IMAGE --expect pass|fail [--id ID] [--note TEXT]
    python -m edge golden list --config S.yaml [--json]
    python -m edge golden remove --config S.yaml ID
    python -m edge golden test --config S.yaml        run the set through model.path here, print margins
    python -m edge promote --config S.yaml --package DIR
    python -m edge rollback --config S.yaml
    python -m edge shadow-report --state-dir DIR [--hours H] [--json]

Exit codes: 0 ok, 1 refused (the golden set disagrees, the station refused the model), 78 bad
config, golden set or model store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK


def cmd_golden(args: argparse.Namespace) -> int:
    from edge.config import load_config_or_report
    from edge.lifecycle import audit, golden

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return EX_CONFIG
    state = cfg.state_dir
    try:
        if args.golden_command == "add":
            sample = golden.add_sample(state, Path(args.image), args.expect, args.id, args.note or "")
            audit.append(state, {"action": "golden_add", "sample": sample.to_dict()})
            print(f"added golden sample {sample.id} (expected {sample.expected}); the daemon uses it from its "
                  "next self-test")
        elif args.golden_command == "remove":
            sample = golden.remove_sample(state, args.id)
            audit.append(state, {"action": "golden_remove", "sample": sample.to_dict()})
            print(f"removed golden sample {sample.id}")
        elif args.golden_command == "list":
            samples = golden.load_samples(state)
            if args.json:
                print(json.dumps([s.to_dict() for s in samples], indent=2))
            else:
                print(f"{len(samples)} golden sample(s) in {golden.golden_dir(state)}")
                for s in samples:
                    print(f"  {s.id:24} {s.expected:5} {s.file:28} {s.note}")
        else:
            return _golden_test(cfg)
    except (golden.GoldenError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG
    return EX_OK


def _golden_test(cfg: Any) -> int:
    from edge.lifecycle.selftest import run_golden
    from edge.model_loader import load_model
    from edge.package import PackageError

    try:
        model = load_model(cfg)
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        result = run_golden(model, cfg.state_dir, cfg.roi, "cli", cfg.selftest.min_samples)
    finally:
        model.inferencer.close()
    print(f"model {model.info['name']} {model.info['version']}: {result.status}")
    print(f"{'SAMPLE':24} {'EXPECT':6} {'GOT':6} {'BY':10} {'SCORE':>8} {'THRESH':>8} {'MARGIN':>8}")
    for s in result.samples:
        cells = [("" if s[k] is None else f"{s[k]:.4f}") for k in ("score", "threshold", "margin")]
        print(f"{s['id']:24} {s['expected']:6} {s['verdict']:6} {s['decided_by'] or '-':10} "
              f"{cells[0]:>8} {cells[1]:>8} {cells[2]:>8}  {s['error'] or ''}")
    print(result.summary())
    return EX_OK if result.ok else EX_FAILURE


def cmd_switch(args: argparse.Namespace) -> int:
    from edge.config import load_config_or_report
    from edge.lifecycle.promotion import PromotionError, switch

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return EX_CONFIG
    try:
        record = switch(cfg, args.command, Path(args.package) if getattr(args, "package", None) else None,
                        args.timeout)
    except (PromotionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG
    if not record["ok"]:
        print(f"{args.command} refused: `current` stays {record['from']}: {record['error']}", file=sys.stderr)
        return EX_FAILURE
    pkg = record["package"]
    print(f"{args.command}: current -> {record['to']} ({pkg['name']} {pkg['version']}), previous -> "
          f"{record['from']}; confirmed by {record['confirmed_by']}")
    return EX_OK


def add_commands(sub: Any) -> None:
    """Register golden, promote, rollback and shadow-report on the `python -m edge` subparsers."""
    from edge.lifecycle.shadow_report import add_command

    add_command(sub)
    g = sub.add_parser("golden", help="manage the station's golden set (reference parts with known verdicts)")
    gsub = g.add_subparsers(dest="golden_command", required=True)
    ga = gsub.add_parser("add", help="copy an image into the golden set with its expected verdict")
    ga.add_argument("image")
    ga.add_argument("--expect", required=True, choices=["pass", "fail"], help="the part's true verdict")
    ga.add_argument("--id", help="sample id (default: the file's stem)")
    ga.add_argument("--note", help="free text, e.g. 'borderline scratch, 0.3 mm'")
    gr = gsub.add_parser("remove", help="remove a sample from the golden set")
    gr.add_argument("id")
    gl = gsub.add_parser("list", help="list the golden set")
    gl.add_argument("--json", action="store_true")
    gsub.add_parser("test", help="run the golden set through model.path here and print scores and margins")
    for p in gsub.choices.values():
        p.add_argument("--config", "-c", required=True, help="station YAML (state_dir holds the set)")
    g.set_defaults(fn=cmd_golden)
    for name, text in (("promote", "make --package the station's current model (golden-tested first)"),
                       ("rollback", "make the previous model current again (golden-tested first)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", required=True, help="station YAML (model.path is the store's `current`)")
        if name == "promote":
            p.add_argument("--package", help="model package folder, normally <store>/versions/<id> "
                           "(default: model.shadow)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the running daemon")
        p.set_defaults(fn=cmd_switch)
