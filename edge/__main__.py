"""Command line of the edge runtime.

    python -m edge run --config station.yaml          the daemon (systemd Type=notify)
    python -m edge check-config station.yaml          exit 0 if valid, 78 (EX_CONFIG) with the field and line
    python -m edge inspect --model PKG img.png ...    inspect files once, print verdicts, write overlays
    python -m edge keygen --out DIR                   Ed25519 key pair for signing model packages
    python -m edge sign --key KEY PKG                 (re)sign a package (what `training export --sign` does)
    python -m edge golden add|list|remove|test ...    the station's golden set (edge.lifecycle.cli_lifecycle)
    python -m edge promote|rollback --config S.yaml   switch the model store's links after a golden test
    python -m edge opcua-certs --out DIR              OPC UA certificates for the station and its PLC(s)
    python -m edge ui --config station.yaml           the station page (needs the `ui` extra)
    python -m edge ui-user --users FILE NAME          add or change a reviewer of the page

Exit codes: 0 ok, 1 runtime failure (or an image that could not be inspected), 2 usage,
78 bad config or bad model package. Heavy modules (OpenVINO) load only for the commands
that need them, so check-config is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from edge.redact import RedactingFilter

if TYPE_CHECKING:
    from edge.config import RulesConfig


log = logging.getLogger("edge")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald/Loki; extra context travels in the message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                               "thread": record.threadName, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def escape_message(record: logging.LogRecord) -> bool:
    """Log filter: one record = one line of valid text. A file name with a newline, a terminal
    escape or bytes that are not UTF-8 must not forge log lines or break the encoder (edge.text)."""
    from edge.text import escape

    record.msg, record.args = escape(record.getMessage()), None
    return True


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(escape_message)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())  # safety net: no camera password in any log line
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# -- check-config -----------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    from edge.config import ConfigError, load_config

    code = EX_OK
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as e:
            print(f"{path}: INVALID", file=sys.stderr)
            for line in e.errors:
                print(f"  {line}", file=sys.stderr)
            code = EX_CONFIG
            continue
        print(f"{path}: OK (station {cfg.station.line}/{cfg.station.name}, source {cfg.source.type}, "
              f"topics {cfg.base_topic}/#)")
        for warning in environment_warnings(cfg):
            print(f"  warning: {warning}", file=sys.stderr)
    return code


def environment_warnings(cfg: Any) -> list[str]:
    """What would stop `run` on this machine; warnings only, since configs are often checked elsewhere."""
    from edge.config import ConfigError, resolve_password
    from edge.package import PackageError, read_package
    from edge.signature import verify_package_signature

    out = []
    try:
        read_package(cfg.model.path, verify_hashes=False)
        if cfg.model.public_key is not None:
            verify_package_signature(cfg.model.path, cfg.model.public_key)
    except PackageError as e:
        out.append(f"model.path: {e}")
    path = getattr(cfg.source, "path", None)
    if path is not None and not Path(path).exists():
        out.append(f"source.path: {path} does not exist")
    elif path is not None and not Path(path).is_dir():
        out.append(f"source.path: {path} is not a folder (run refuses to start)")
    try:
        resolve_password(cfg.mqtt)
    except ConfigError as e:
        out += e.errors
    return out


# -- run ---------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from edge.config import load_config_or_report

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return EX_CONFIG
    setup_logging(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    from edge.malloc_tune import tune_malloc

    log.debug("malloc: %s", tune_malloc() or "left as the environment set it")  # before any thread starts
    from edge.daemon import run_pipeline  # OpenVINO loads here, after the config is known to be good

    stop, reload = threading.Event(), threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("already stopping (signal %d)", signum)
        else:
            log.info("signal %d: draining and stopping", signum)
        stop.set()

    def on_hup(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP: reloading %s", args.config)
        reload.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    return run_pipeline(cfg, stop, config_path=args.config, reload_event=reload)


# -- inspect -----------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from edge.config import FrameChecksConfig
    from edge.events import region_dict
    from edge.evidence import draw_overlay
    from edge.image_decode import ImageDecodeError, read_image_file
    from edge.package import PackageError
    from edge.rules import decide, effective_rules
    from edge.sources.base import Frame, check_frame

    try:
        from edge.cpu_check import warn_if_off
        from edge.inference import Inferencer

        inf = Inferencer(args.model, xml_name=args.file, num_requests=1, hint="LATENCY")
        warn_if_off(inf.model_dir, inf, args.file)
        policy = effective_rules(inf.params, rule_options(args))  # what the daemon does with `rules:`
    except (PackageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG
    params, rules = policy.params, policy.rules
    overlay_dir = Path(args.overlay_dir) if args.overlay_dir else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    if not args.json:
        verdict_by = (f"part output, part_threshold {params.part_threshold}" if inf.has_part
                      and params.part_threshold is not None else f"regions, max_defects {rules.max_defects}")
        limits = {k: v for k, v in rules.to_dict().items() if k != "max_defects" and v is not None}
        verdict_by += "".join(f", {k} {v}" for k, v in limits.items())
        print(f"model {inf.info.name} {inf.info.version} ({inf.info.precision}), threshold {params.pixel_threshold}, "
              f"min_area {params.min_area}, verdict by {verdict_by}")
        print(f"{'FILE':40} {'VERDICT':7} {'REGIONS':>7} {'AREA':>7} {'SCORE':>6} {'PART':>6} {'MS':>7}  REASON")
    errors = 0
    for name in args.images:
        path = Path(name)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"file": str(path), "verdict": "error", "reasons": [], "regions": [],
                               "total_defect_area": 0, "score": None, "part_score": None,
                               "pixel_threshold": params.pixel_threshold, "part_threshold": params.part_threshold,
                               "error": None, "overlay": None}
        image: np.ndarray | None = None
        try:
            image = read_image_file(path)
        except (OSError, ImageDecodeError) as e:  # unreadable file, or bytes that are not an image we decode
            row["error"] = str(e) if isinstance(e, ImageDecodeError) else f"cannot read: {e}"
        if image is not None:  # the same frame checks as the daemon: a black image is an error, not a pass
            row["error"] = check_frame(Frame(path.stem, 0.0, image, live=False), FrameChecksConfig())
        if row["error"] is None and image is not None:
            try:
                det = inf.inspect(image, params)
                verdict, reasons = decide(det, rules)
                row.update(verdict=verdict, reasons=reasons, regions=[region_dict(r, rules.mm_per_pixel) for r in det.regions],
                           total_defect_area=det.total_area, score=round(det.score, 4),
                           part_score=None if det.part_score is None else round(det.part_score, 4))
                if overlay_dir:
                    out = overlay_dir / f"{path.stem}.overlay.png"
                    cv2.imwrite(str(out), draw_overlay(image, det.mask, det.regions, verdict))
                    row["overlay"] = str(out)
            except Exception as e:  # one bad image must not stop the batch
                row["error"] = f"{type(e).__name__}: {e}"
        errors += row["verdict"] == "error"
        row["ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            reason = row["error"] or "; ".join(row["reasons"])
            score = "" if row["score"] is None else f"{row['score']:.3f}"
            part = "" if row["part_score"] is None else f"{row['part_score']:.3f}"
            print(f"{str(path)[-40:]:40} {row['verdict']:7} {len(row['regions']):>7} {row['total_defect_area']:>7} "
                  f"{score:>6} {part:>6} {row['ms']:>7.1f}  {reason}", flush=True)
    return EX_FAILURE if errors else EX_OK


def rule_options(args: argparse.Namespace) -> RulesConfig:
    """inspect's rule options, validated as the station config's `rules:` section (same bounds)."""
    from pydantic import ValidationError

    from edge.config import RulesConfig

    given = {k: getattr(args, k) for k in RulesConfig.model_fields if getattr(args, k, None) is not None}
    try:
        return RulesConfig(**given)
    except ValidationError as e:
        raise ValueError("; ".join(f"--{'-'.join(map(str, err['loc'])).replace('_', '-') or 'rules'}: {err['msg']}"
                                   for err in e.errors(include_url=False))) from None


# -- model signing -------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from edge.package import PackageError
    from edge.signature import generate_keypair

    try:
        priv, pub = generate_keypair(args.out, args.name)
    except (PackageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_FAILURE
    print(f"private key: {priv} (mode 0600: keep it off the line PCs, e.g. on the build machine)")
    print(f"public key:  {pub} (copy to each station and set model.public_key)")
    return EX_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from edge.package import PackageError, read_package
    from edge.signature import sign_package

    try:
        read_package(args.package)  # sign only what verifies: the signature vouches for these hashes
        print(f"signed: {sign_package(args.package, args.key)}")
    except (PackageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG
    return EX_OK


def cmd_opcua_certs(args: argparse.Namespace) -> int:
    from edge.opcua.certs import make_station_certs

    try:
        paths = make_station_certs(Path(args.out), args.client, args.host or None, args.days)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_FAILURE
    print("station config (docs/opcua.md):\n  opcua:\n    enabled: true")
    for key, path in paths.items():
        print(f"    {key}: {path}")
    for name in args.client:
        print(f"client {name!r}: give {Path(args.out) / 'clients' / name} (cert.der, key.pem, server.der) to the PLC")
    return EX_OK


# -- station page -------------------------------------------------------------------------------------
def cmd_ui(args: argparse.Namespace) -> int:
    from edge.config import load_config_or_report

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return EX_CONFIG
    setup_logging(args.log_format or cfg.logging.format, cfg.logging.level)
    try:
        from edge.ui.auth import AuthError
        from edge.ui.server import serve
    except ImportError as e:
        print(f"error: the station page needs the `ui` extra (pip install 'defect-inspection[ui]'): {e}",
              file=sys.stderr)
        return EX_CONFIG
    try:
        return serve(cfg, host=args.host, port=args.port)
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_CONFIG


def cmd_ui_user(args: argparse.Namespace) -> int:
    import getpass

    from edge.ui.auth import AuthError, add_user

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass(f"password for {args.name}: ")
    try:
        add_user(Path(args.users), args.name, password)
    except (AuthError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EX_FAILURE
    print(f"{args.users}: reviewer {args.name} set (scrypt hash; the page re-reads the file at each login)")
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge", description="Edge defect inspection runtime.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the station daemon")
    r.add_argument("--config", "-c", required=True, help="station YAML (see configs/edge/example.yaml)")
    r.add_argument("--log-format", choices=["text", "json"], help="override logging.format")
    r.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level")
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("check-config", help="validate station YAML file(s); exit 78 if any is invalid")
    c.add_argument("files", nargs="+")
    c.set_defaults(fn=cmd_check_config)
    i = sub.add_parser("inspect", help="inspect image files once and print verdicts")
    i.add_argument("--model", "-m", required=True, help="model package folder")
    i.add_argument("--file", default="model.xml", help="IR inside the package (e.g. fp32/model.xml)")
    i.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    i.add_argument("--overlay-dir", help="write <stem>.overlay.png for each inspected image here")
    i.add_argument("--pixel-threshold", type=float, help="override the package's calibrated threshold")
    i.add_argument("--min-area", type=int, help="override the package's minimum defect area (pixels)")
    i.add_argument("--part-threshold", type=float, help="override the package's part_threshold (models with a "
                   "part output: fail iff part score >= this)")
    i.add_argument("--open-radius", type=int, help="override the package's morphological opening radius")
    i.add_argument("--close-radius", type=int, help="override the package's morphological closing radius")
    i.add_argument("--max-defects", type=int, help="regions allowed before a part fails (default 0)")
    i.add_argument("--max-total-area", type=int, help="fail when the total defect area exceeds this (pixels)")
    i.add_argument("--max-region-area-mm2", type=float, help="fail on any region larger than this (mm2); "
                   "needs --mm-per-pixel")
    i.add_argument("--mm-per-pixel", type=float, help="scale of the images (mm per pixel)")
    i.add_argument("images", nargs="+")
    i.set_defaults(fn=cmd_inspect)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing model packages")
    k.add_argument("--out", required=True, help="folder for <name>.key (private, 0600) and <name>.pub")
    k.add_argument("--name", default="model-signing", help="file name stem (default model-signing)")
    k.set_defaults(fn=cmd_keygen)
    g = sub.add_parser("sign", help="write PKG/package.json.sig with an Ed25519 private key (PEM)")
    g.add_argument("--key", required=True, help="private key made by `python -m edge keygen`")
    g.add_argument("package", help="model package folder (verified before it is signed)")
    g.set_defaults(fn=cmd_sign)
    from edge.lifecycle.cli_lifecycle import add_commands

    add_commands(sub)
    o = sub.add_parser("opcua-certs", help="make OPC UA certificates: the station's, one per client, trusted/")
    o.add_argument("--out", required=True, help="folder for server/, clients/<name>/ and trusted/")
    o.add_argument("--client", action="append", default=None, help="client (PLC) name; repeat for several "
                   "(default: plc)")
    o.add_argument("--host", action="append", help="station host name or IP in its certificate; repeat "
                   "(default: this host name, localhost, 127.0.0.1)")
    o.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    o.set_defaults(fn=cmd_opcua_certs)
    u = sub.add_parser("ui", help="serve the station page (live view, parts, reviews, line health)")
    u.add_argument("--config", "-c", required=True, help="station YAML (the page reads its mqtt, evidence and ui sections)")
    u.add_argument("--host", help="override ui.host")
    u.add_argument("--port", type=int, help="override ui.port")
    u.add_argument("--log-format", choices=["text", "json"], help="override logging.format")
    u.set_defaults(fn=cmd_ui)
    w = sub.add_parser("ui-user", help="add or change a reviewer in the page's users file (scrypt-hashed)")
    w.add_argument("--users", required=True, help="users file (ui.users_file), created with mode 0600")
    w.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    w.add_argument("name")
    w.set_defaults(fn=cmd_ui_user)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "opcua-certs" and not args.client:
        args.client = ["plc"]
    if args.command not in ("run", "ui"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
