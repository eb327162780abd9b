"""`python -m training demo --out demo-out`: the whole product on built-in synthetic parts.

    1 data      synthetic textured parts with exact defect masks (training.core.synth)
    2 train     `python -m training train` on configs/train/synthetic-demo.yaml, time-budgeted
    3 export    `python -m training export`: OpenVINO IR, INT8 behind the accuracy gate
    4 station   a local Mosquitto on a free port + the real daemon (`python -m edge run`)
    5 conveyor  new parts with known truth dropped into the daemon's hot folder; every verdict
                is printed as it arrives over MQTT (a real paho subscriber in this process)
    6 summary   SIGTERM the daemon (must exit 0), then accuracy against the truth, throughput,
                latency, lost events -> demo-out/summary.json + failed_parts.png

Everything lands in OUT: data/, run/ (checkpoints, curves.png, val_grid.png), model/,
conveyor/ (truth.json, the hot folder), station.yaml, state/ (outbox, evidence), broker/,
logs/ (train, export, daemon, mosquitto). The broker and the daemon are stopped at the end,
also on Ctrl-C or a failed stage. Exit 0 = every part got its verdict over MQTT and the
daemon stopped cleanly; 1 = a stage failed (the message names the log); 130 = interrupted.
`--model PKG` skips stages 1-3 and runs the station on an existing model package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.demo.console import Progress
from training.demo.report import contact_sheet, print_summary, score
from training.demo.review import (
    DEMO_PASSWORD,
    DEMO_USER,
    make_reviewer,
    page_available,
    review_one,
    start_page,
    wait_page,
)
from training.demo.station import (
    LINE,
    STATION,
    TOPIC_PREFIX,
    Broker,
    DemoError,
    Listener,
    Part,
    feed,
    free_port,
    render_conveyor,
    station_yaml,
    stop_process,
)

REPO = Path(__file__).resolve().parents[2]  # training/demo/run.py -> the repository
OWNED = ("data", "run", "model", "conveyor", "state", "broker", "logs", "reviewed")  # recreated on every run
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "train" / "synthetic-demo.yaml"


class Interrupted(BaseException):
    """SIGTERM / SIGINT: unwind through every `finally` so the broker and daemon are stopped."""


# ----------------------------------------------------------------------------------- children
def run_logged(cmd: Sequence[str], log_path: Path, progress: Progress, prefix: str = "   ") -> int:
    """Run a command, streaming its output (stdout + stderr) to the console and to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                # tqdm redraws with carriage returns: show only the last state of such a line
                shown = line.rsplit("\r", 1)[-1].rstrip()
                if shown:
                    progress.say(prefix + shown)
            return proc.wait()
        finally:
            stop_process(proc)


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("   | " + line for line in lines[-n:])


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m training demo", description=__doc__, formatter_class=Fmt)
    p.add_argument("--out", default="demo-out", help="output folder (its demo subfolders are recreated)")
    p.add_argument("--train-parts", type=int, default=200, help="synthetic training parts")
    p.add_argument("--size", type=int, default=128, help="part side in pixels (training and conveyor)")
    p.add_argument("--train-minutes", type=float, default=3.0, help="training time budget")
    p.add_argument("--epochs", type=int, default=100, help="epoch cap (the time budget usually ends the run first)")
    p.add_argument("--train-config", default=str(DEFAULT_TRAIN_CONFIG), help="training recipe")
    p.add_argument("--calib-size", type=int, default=200, help="INT8 calibration tiles")
    p.add_argument("--parts", type=int, default=120, help="parts sent down the conveyor")
    p.add_argument("--defect-fraction", type=float, default=0.4, help="share of defective conveyor parts")
    p.add_argument("--rate", type=float, default=20.0, help="conveyor pace, parts/s (0 = all at once)")
    p.add_argument("--seed", type=int, default=0, help="data, training and conveyor seed")
    p.add_argument("--model", help="existing model package: skip data, training and export")
    p.add_argument("--result-timeout", type=float, default=120.0, help="seconds to wait for the last verdict")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parts < 1 or args.train_parts < 10 or args.size < 32 or args.rate < 0:
        print("error: need --parts >= 1, --train-parts >= 10, --size >= 32, --rate >= 0", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except Interrupted as e:
        print(f"\ndemo interrupted ({e}); everything it started was stopped; partial results and logs "
              f"in {args.out}/", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _train_and_export(args: argparse.Namespace, out: Path, prog: Progress) -> Path:
    """Stages 1-3: synthetic data, training on a time budget, export; the model package folder."""
    py, logs, size = sys.executable, out / "logs", (args.size, args.size)
    # ------------------------------------------------------------------ 1 data
    prog.stage("data", f"synthetic dataset: {args.train_parts} parts {args.size}x{args.size}")
    from training.core.synth import generate_dataset

    counts = generate_dataset(out / "data", args.train_parts, args.seed, size=size, progress=False)
    prog.say("   wrote " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + f" -> {out / 'data'}")

    # ------------------------------------------------------------------ 2 train
    prog.stage("train", f"train the U-Net ({Path(args.train_config).name}, budget {args.train_minutes:g} min)")
    cmd = [py, "-m", "training", "train", "--config", args.train_config, "--data", str(out / "data"),
           "--out", str(out / "run"), "--time-budget", f"{args.train_minutes:g}", "--epochs", str(args.epochs),
           "--seed", str(args.seed)]
    rc = run_logged(cmd, logs / "train.log", prog)
    best = out / "run" / "best.pt"
    if rc != 0 or not best.is_file():
        raise DemoError(f"training failed (exit {rc}); log: {logs / 'train.log'}\n{log_tail(logs / 'train.log')}")

    # ------------------------------------------------------------------ 3 export
    prog.stage("export", "export: OpenVINO IR, INT8 quantization behind the accuracy gate")
    model_dir = out / "model"
    cmd = [py, "-m", "training", "export", "--checkpoint", str(best), "--out", str(model_dir),
           "--calib-data", str(out / "data"), "--calib-size", str(args.calib_size), "--seed", str(args.seed)]
    rc = run_logged(cmd, logs / "export.log", prog)
    if rc != 0 or not (model_dir / "package.json").is_file():
        raise DemoError(f"export failed (exit {rc}); log: {logs / 'export.log'}\n{log_tail(logs / 'export.log')}")
    return model_dir


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("summary.json", "failed_parts.png", "missed_parts.png", "station.yaml"):
        (out / name).unlink(missing_ok=True)
    logs = out / "logs"
    logs.mkdir()
    prog = Progress(3 if args.model else 6)
    load0, cpus = os.getloadavg()[0], os.cpu_count() or 1
    prog.say(f"demo: output in {out}  (python {sys.version.split()[0]}, {cpus} CPU(s), load average {load0:.1f})")
    if load0 > 0.5 * cpus and not args.model:
        prog.say(f"   note: this machine is busy (load {load0:.1f} on {cpus} CPUs). Training runs on a time budget,\n"
                 "   so it gets fewer steps and the model will be less accurate than on an idle machine.")

    if args.model:
        model_dir = Path(args.model).resolve()
        color = "gray"
        with contextlib.suppress(OSError, ValueError, KeyError):
            color = json.loads((model_dir / "package.json").read_text())["input"]["color"]
    else:
        model_dir = _train_and_export(args, out, prog)
        color = "gray"

    line = _station(args, out, model_dir, color, prog)
    listener, daemon_rc, daemon_log = line.listener, line.daemon_rc, logs / "daemon.log"
    conv = score(line.parts, listener.results, listener.by_part, line.sent)
    conv["duplicates"] = listener.duplicates
    conv["conveyor_s"] = round(line.conveyor_s, 1)
    conv["alarms"] = listener.alarms
    events = {pid: listener.results[eid].event for pid, eid in listener.by_part.items()}
    pictures = _pictures(out, line.parts, events, line.hot / "done")
    review = line.review
    if review["done"]:  # the loop's last step: reviewed parts -> a training dataset
        review["export"] = _review_export(out, line.page_url, prog)
    prog.finish()
    summary = {
        "ok": False,
        "model": _model_summary(model_dir),
        "conveyor": conv,
        "daemon_exit_code": daemon_rc,
        "wall_time_s": round(time.monotonic() - prog.t0, 1),
        "stage_seconds": prog.stage_times,
        "load_average_start": round(load0, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "pictures": pictures,
        "review": review,
        "logs": str(logs),
        "settings": {k: v for k, v in vars(args).items()},
    }
    problems = []
    if conv["events_lost"]:
        problems.append(f"{conv['events_lost']} part(s) sent but no verdict received")
    if daemon_rc != 0:
        problems.append(f"the daemon exited with code {daemon_rc} after SIGTERM (expected 0); log {daemon_log}")
    summary["ok"] = not problems
    summary["problems"] = problems
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, prog.say)
    prog.say(f"   summary            {out / 'summary.json'}")
    if problems:
        raise DemoError("; ".join(problems) + (f"\n{log_tail(daemon_log)}" if daemon_rc != 0 else ""))
    prog.say(f"\ndemo OK in {prog.elapsed()}")
    return 0


@dataclass
class _Children:
    """What stages 4-6 start; close() stops all of it, also after a failed stage or Ctrl-C."""

    broker: Broker
    logs: Path
    listener: Listener | None = None
    page: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    feeder: threading.Thread | None = None
    stop_feed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.stop_feed.set()
        if self.feeder is not None:
            self.feeder.join(timeout=5)
        stop_process(self.page, signal.SIGTERM, timeout=15)
        stop_process(self.daemon, signal.SIGTERM, timeout=30)
        if self.listener is not None:
            self.listener.close()
        self.broker.stop()
        with contextlib.suppress(OSError):
            if self.broker.log.exists():
                shutil.copyfile(self.broker.log, self.logs / "mosquitto.log")


@dataclass
class _LineRun:
    """What stages 4-6 leave for the summary."""

    parts: list[Part]
    hot: Path
    listener: Listener
    sent: list[tuple[str, float]]  # (part id, time it was dropped in the hot folder)
    conveyor_s: float
    daemon_rc: int | None
    review: dict[str, Any]
    page_url: str


def _station(args: argparse.Namespace, out: Path, model_dir: Path, color: str, prog: Progress) -> _LineRun:
    """Stages 4-6: broker, station page and daemon; the conveyor; the daemon stopped by SIGTERM."""
    prog.stage("station", "station: local MQTT broker + edge daemon on a hot folder")
    conveyor = out / "conveyor"
    parts = render_conveyor(conveyor, args.parts, args.seed + 1000, (args.size, args.size), color,
                            args.defect_fraction)
    truth = {p.part_id: p.truth for p in parts}
    n_def = sum(p.defective for p in parts)
    prog.say(f"   conveyor: {len(parts)} new parts ({len(parts) - n_def} good, {n_def} defective; "
             f"truth in {conveyor / 'truth.json'})")
    hot = conveyor / "incoming"
    hot.mkdir(parents=True)
    ch = _Children(Broker(out / "broker"), out / "logs")
    review: dict[str, Any] = {"done": False, "why": "the station page did not run"}
    sent: list[tuple[str, float]] = []
    try:
        listener, page_url = _start_station(ch, out, model_dir, hot, truth, prog)
        conveyor_s = _run_conveyor(ch, listener, args, parts, hot, sent, prog)
        if ch.page is not None:
            review = review_one(page_url, listener, truth, prog.say)

        # ------------------------------------------------------------------ 6 stop + summary
        prog.stage("summary", "stop the daemon (SIGTERM), summary and pictures")
        daemon_rc = stop_process(ch.daemon, signal.SIGTERM, timeout=60)
        ch.daemon = None
        prog.say(f"   daemon exited with code {daemon_rc}")
        listener.wait_status("offline", 5, lambda: True)
        time.sleep(0.3)  # a last duplicate in flight, if any
    finally:
        ch.close()
    return _LineRun(parts, hot, listener, sent, conveyor_s, daemon_rc, review, page_url)


def _start_station(ch: _Children, out: Path, model_dir: Path, hot: Path, truth: dict[str, str],
                   prog: Progress) -> tuple[Listener, str]:
    """Broker, subscriber, station page (with the `ui` extra) and daemon, until the daemon is online;
    returns the subscriber and the page's address."""
    py, logs, broker = sys.executable, ch.logs, ch.broker
    daemon_log = logs / "daemon.log"
    broker.start()
    prog.say(f"   mosquitto on {broker.host}:{broker.port} (config {broker.conf})")
    base = f"{TOPIC_PREFIX}/{LINE}/{STATION}"
    listener = ch.listener = Listener(broker.host, broker.port, base, truth, prog)
    prog.say(f"   subscribed to {base}/# (paho, MQTT 5, QoS 1)")
    station = out / "station.yaml"
    ui_port = free_port()
    with_page = page_available()
    if with_page:
        (out / "state").mkdir(parents=True, exist_ok=True)
        make_reviewer(out / "state" / "ui-users")
    station.write_text(station_yaml(out, model_dir, hot, broker.port, {"port": ui_port, "users_file": str(
        out / "state" / "ui-users")} if with_page else None))
    page_url = f"http://127.0.0.1:{ui_port}"
    if with_page:
        ch.page = start_page(py, station, logs / "ui.log")
        wait_page(page_url, ch.page)
        prog.say(f"   station page: {page_url}/  (python -m edge ui, log {logs / 'ui.log'}; "
                 f"reviewer {DEMO_USER} / {DEMO_PASSWORD})")
    else:
        prog.say("   station page skipped: the `ui` extra is not installed (pip install -e '.[ui]')")
    with open(daemon_log, "wb") as dlog:
        daemon = ch.daemon = subprocess.Popen([py, "-m", "edge", "run", "--config", str(station)], cwd=REPO,
                                              stdout=dlog, stderr=subprocess.STDOUT, start_new_session=True)
    prog.say(f"   daemon: python -m edge run --config {station}  (pid {daemon.pid}, log {daemon_log})")
    status = listener.wait_status("online", 120, lambda: daemon.poll() is None)
    if status is None:
        early = daemon.poll()
        raise DemoError((f"daemon exited with code {early} before going online" if early is not None
                         else "daemon did not come online within 120 s")
                        + f"; log: {daemon_log}\n{log_tail(daemon_log)}")
    model_info = status.get("model", {})
    prog.say(f"   daemon online: model {model_info.get('name')} {model_info.get('version')} "
             f"({model_info.get('precision')}), rules {status.get('rules')}")
    return listener, page_url


def _run_conveyor(ch: _Children, listener: Listener, args: argparse.Namespace, parts: list[Part], hot: Path,
                  sent: list[tuple[str, float]], prog: Progress) -> float:
    """Stage 5: feed the parts at the conveyor's pace and wait for their verdicts; the seconds it took."""
    daemon = ch.daemon
    assert daemon is not None
    pace = f"{args.rate:g} parts/s" if args.rate else "all at once"
    prog.stage("conveyor", f"conveyor: {len(parts)} parts into the hot folder ({pace}); verdicts over MQTT")
    prog.say(f"   {'n':>9}  {'part':<10} {'VERDICT':<5} {'regions':>10} {'latency':>10}   truth")
    t_feed = time.monotonic()
    ch.feeder = threading.Thread(target=feed, args=(parts, hot, args.rate, ch.stop_feed, sent), name="feeder",
                                 daemon=True)
    ch.feeder.start()
    feed_time = len(parts) / args.rate if args.rate else 0.0
    complete = listener.wait_results(len(parts), feed_time + args.result_timeout, lambda: daemon.poll() is None)
    ch.feeder.join(timeout=5)
    conveyor_s = time.monotonic() - t_feed
    if not complete:
        early = daemon.poll()
        prog.say(f"   !! only {len(listener.by_part)} of {len(parts)} verdicts arrived"
                 + (f"; the daemon exited with code {early}" if early is not None else " in time"))
    return conveyor_s


def _pictures(out: Path, parts: Sequence[Part], events: dict[str, dict[str, Any]], done: Path) -> dict[str, str | None]:
    """Contact sheets of the failed and the missed parts, and the training run's pictures (None = none)."""
    evidence_root = out / "state" / "evidence"
    failed = [p for p in parts if events.get(p.part_id, {}).get("verdict") == "fail"]
    missed = [p for p in parts if p.defective and events.get(p.part_id, {}).get("verdict") == "pass"]
    pictures: dict[str, str | None] = {"failed parts": None, "missed defects": None}
    if contact_sheet(failed, events, evidence_root, done, out / "failed_parts.png",
                     f"failed parts ({len(failed)}): red = model's defect mask/boxes, green = true defect outline"):
        pictures["failed parts"] = str(out / "failed_parts.png")
    if contact_sheet(missed, events, evidence_root, done, out / "missed_parts.png",
                     f"defective parts that passed ({len(missed)}); green = true defect outline"):
        pictures["missed defects"] = str(out / "missed_parts.png")
    for name, label in (("curves.png", "training curves"), ("val_grid.png", "validation grid")):
        path = out / "run" / name
        pictures[label] = str(path) if path.is_file() else None
    return pictures


def _review_export(out: Path, page_url: str, prog: Progress) -> str:
    """The review loop's last step: reviewed parts -> a training dataset; where it went (or why not)."""
    logs = out / "logs"
    rc = run_logged([sys.executable, "-m", "training", "review-export", "--state-dir", str(out / "state"),
                     "--out", str(out / "reviewed")], logs / "review-export.log", prog)
    result = str(out / "reviewed") if rc == 0 else f"failed (exit {rc}), log {logs / 'review-export.log'}"
    prog.say(f"   review-export -> {result}")
    if (out / "run" / "best.pt").is_file():
        prog.say(f"   fine-tune on it: python -m training train --init-from {out / 'run' / 'best.pt'} "
                 f"--data {out / 'data'} --extra-data {out / 'reviewed'} --out RUN_DIR ...")
    prog.say(f"   open the page again: {sys.executable} -m edge ui --config {out / 'station.yaml'}  -> {page_url}/ "
             "(the index and the review stay in state/ui.sqlite3; the demo's broker is gone, so it says "
             "'broker down')")
    return result


def _model_summary(model_dir: Path) -> dict[str, Any]:
    """The package's name, version, precision, gate and validation figures, for summary.json."""
    package = {}
    with contextlib.suppress(OSError, ValueError):
        package = json.loads((model_dir / "package.json").read_text())
    return {"path": str(model_dir), "name": package.get("name"), "version": package.get("version"),
            "precision": package.get("precision"), "gate": package.get("metrics", {}).get("gate"),
            "validation": {k: package.get("metrics", {}).get(k) for k in ("fp32", "int8", "fp16")
                           if k in package.get("metrics", {})}}


if __name__ == "__main__":
    sys.exit(main())
