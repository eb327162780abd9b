"""`python -m edge shadow-report --state-dir DIR`: the agreement matrix of the live and the shadow
model over a period, and the parts where they differ, from `<state_dir>/shadow/shadow.jsonl`
(edge.lifecycle.shadow). Reads files only: no model, no OpenVINO, works on a copy of a station's state dir.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.lifecycle.audit import read_jsonl

VERDICTS = ("pass", "fail")
HEADER = "live \\ shadow"


def _name(ident: dict[str, Any] | None) -> str:
    ident = ident or {}
    return f"{ident.get('name')} {ident.get('version')} ({str(ident.get('package_sha256') or '')[:12]})"


def report(state_dir: Path, since: float = 0.0) -> dict[str, Any]:
    """{"groups": [{live, shadow, pairs, thinned, run, agreement}], "disagreements": [...]} since `since`."""
    records = [r for r in read_jsonl(Path(state_dir) / "shadow" / "shadow.jsonl") if r.get("ts", 0) >= since]
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "summary":
            continue
        key = (_name(r.get("live")), _name(r.get("shadow")))
        g = groups.setdefault(key, {"live": key[0], "shadow": key[1], "pairs": {}, "thinned": 0,
                                    "first_ts": r["ts"], "last_ts": r["ts"]})
        for pair, n in r.get("pairs", {}).items():
            g["pairs"][pair] = g["pairs"].get(pair, 0) + int(n)
        g["thinned"] += int(r.get("thinned", 0))
        g["last_ts"] = r["ts"]
    for g in groups.values():
        g["run"] = sum(g["pairs"].values())
        agree = sum(n for pair, n in g["pairs"].items() if pair.split("/")[0] == pair.split("/")[-1])
        g["agreement"] = round(agree / g["run"], 4) if g["run"] else None
    disagreements = [r for r in records if r.get("kind") == "disagreement"]
    return {"since": since, "groups": list(groups.values()), "disagreements": disagreements}


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def print_report(rep: dict[str, Any], limit: int) -> None:
    if not rep["groups"]:
        print("no shadow runs recorded in this period")
    for g in rep["groups"]:
        print(f"live {g['live']} vs shadow {g['shadow']}, {_time(g['first_ts'])} .. {_time(g['last_ts'])} UTC")
        print(f"  {g['run']} part(s) judged by both, {g['thinned']} skipped (shadow over its CPU budget)")
        print(f"  {HEADER:14}" + "".join(f"{v:>8}" for v in VERDICTS))
        for live in VERDICTS:
            print(f"  {live:14}" + "".join(f"{g['pairs'].get(f'{live}/{s}', 0):>8}" for s in VERDICTS))
        if g["agreement"] is not None:
            print(f"  agreement {g['agreement']:.1%}")
    dis = rep["disagreements"]
    print(f"{len(dis)} part(s) where the models differ" + (f" (newest {limit} shown)" if len(dis) > limit else ""))
    for r in dis[-limit:]:
        live, shadow = r["live"], r["shadow"]
        print(f"  {_time(r['capture_ts'])} {r['part_id']:24} live {live['verdict']} ({live['score']}) "
              f"shadow {shadow['verdict']} ({shadow['score']})  {r.get('evidence') or ''}")


def cmd_shadow_report(args: argparse.Namespace) -> int:
    since = time.time() - args.hours * 3600 if args.hours else 0.0
    rep = report(Path(args.state_dir), since)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep, args.limit)
    return 0


def add_command(sub: Any) -> None:
    p = sub.add_parser("shadow-report", help="agreement matrix of the live and the shadow model, and the parts "
                       "where they differ")
    p.add_argument("--state-dir", required=True, help="the station's state_dir")
    p.add_argument("--hours", type=float, default=0.0, help="only the last H hours (default: everything kept)")
    p.add_argument("--limit", type=int, default=50, help="disagreements listed (the newest)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(fn=cmd_shadow_report)
