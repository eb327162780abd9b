"""Hostile hot-folder input against the real daemon (`python -m edge run`) and a real Mosquitto.

The rule under test: no single input may stop the daemon. Every hostile entry ends as exactly
one result event (an `error` verdict where it cannot be inspected) and leaves the folder, and
the good parts queued behind it are all inspected. Each case reports to the fault report
(tests/faults/conftest.py). Issue 14, "Found broken" 1 and 2, and "Resource bounds" (regions).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from edge.contract import PACKAGE_JSON
from edge.events import EVENT_MAX_BYTES, event_id_for, validate_event
from edge.evidence import EvidenceWriter
from edge.package import sha256_file
from edge.sources.folder import TEST_HOOK_KILL_ENV
from tests.broker import Broker
from tests.daemon_proc import ROOT, Daemon, running, station, write_config
from tests.faults.harness import (
    PersistentSubscriber,
    check,
    encode,
    part_png,
    tally,
    vm_hwm_mb,
    wait_until,
    write_atomic,
)
from tests.tiny_package import build_dark_spot_model, make_part, make_tiny_package

GOOD = [f"z{i:03d}" for i in range(20)]  # sorted after every hostile name: they queue behind it


def folder_station(tmp_path: Path, pkg: Path, broker: Broker, **source: Any) -> Path:
    inbox = tmp_path / "in"
    inbox.mkdir(exist_ok=True)
    data = station(tmp_path, pkg, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                           "poll_interval_s": 0.05, **source})
    return write_config(tmp_path / "station.yaml", data)


def put(folder: Path, name: str, data: bytes, mtime: float) -> None:
    """write_atomic for names up to the 255-byte limit (write_atomic's temporary name adds 5 bytes)."""
    tmp = folder / ".put.tmp"
    tmp.write_bytes(data)
    os.utime(tmp, (mtime, mtime))
    tmp.rename(folder / name)


def write_good(inbox: Path, names: list[str] = GOOD) -> None:
    for i, name in enumerate(names):
        write_atomic(inbox, f"{name}.png", part_png(i), mtime=time.time() - 5)


def stop(d: Daemon) -> int:
    if d.proc.poll() is None:
        d.signal(signal.SIGTERM)
    return d.wait(60)


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["part_id"]: e for e in results}


def assert_valid(results: list[dict[str, Any]]) -> None:
    for e in results:
        validate_event({k: v for k, v in e.items() if k != "_t"})


# -- names ------------------------------------------------------------------------------------------
NAMES: dict[bytes, str] = {  # file name (bytes) -> part id expected in the event
    b"part-\xff\xfe.png": "part-\\xff\\xfe",  # not UTF-8 (SMB/NFS shares): crashed the result thread
    b"with space.png": "with space",
    b"line\nbreak.png": "line\\nbreak",  # would forge a log line
    b"esc\x1b[31mred.png": "esc\\x1b[31mred",  # terminal escape
    "unicodé-\u00fc\u2603.png".encode(): "unicodé-\u00fc\u2603",  # printable unicode stays readable
    "rtl-\u202egnp.png".encode(): "rtl-\\u202egnp",  # right-to-left override: not printable
    b"-leading-dash.png": "-leading-dash",
    b"L" * 251 + b".png": "L" * 251,  # 255 bytes, the longest name Linux allows
}
LONG_NON_UTF8 = b"x" + b"\xfe" * 200 + b".png"  # escapes to 801 characters: clipped with a hash


def test_odd_file_names_are_escaped_and_never_stop_the_line(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                           report: Any) -> None:
    cfg = folder_station(tmp_path, tiny_package, broker)
    inbox = tmp_path / "in"
    old = time.time() - 5
    for i, raw in enumerate([*NAMES, LONG_NON_UTF8]):
        put(inbox, os.fsdecode(raw), part_png(i, defect=False), old)
    bad_name = os.fsdecode(b"bad\nname-\xff.png")  # unreadable content too: its name reaches the log line
    put(inbox, bad_name, b"not an image at all", old)
    write_good(inbox)
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log")
    expected = {*NAMES.values(), "bad\\nname-\\xff", *GOOD}
    try:
        ok = sub.wait_for(lambda: len(sub.results()) >= len(expected) + 1, 90)
        time.sleep(0.5)
        alive = d.proc.poll() is None
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    got = by_id(results)
    long_ids = [p for p in got if p.startswith("x\\xfe")]
    entry = tally("odd file names (not UTF-8, newline, escape, unicode, dash, 255 bytes)",
                  expected | set(long_ids), results, daemon_stayed_up=alive)
    report(entry)
    assert ok and alive, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    assert entry["duplicates"] == 0
    assert_valid(results)
    for part_id in NAMES.values():
        assert got[part_id]["verdict"] == "pass", got[part_id]
    assert len(long_ids) == 1 and len(long_ids[0]) == 256 and long_ids[0][-9] == "~", long_ids
    assert got["bad\\nname-\\xff"]["verdict"] == "error"
    assert "bad\\nname-\\xff.png is not a readable image" in got["bad\\nname-\\xff"]["error"]
    # Stable: the id is what event_id_for gives for the escaped part id and the file's mtime, on any run.
    e = got["part-\\xff\\xfe"]
    assert e["event_id"] == event_id_for("l1/s1", "part-\\xff\\xfe", e["capture_ts"])
    done = {os.fsencode(p.name) for p in (inbox / "done").iterdir()}
    assert set(NAMES) | {LONG_NON_UTF8} <= done
    assert (inbox / "failed" / bad_name).exists()
    log_text = (tmp_path / "daemon.log").read_bytes()
    assert b"bad\\nname-\\xff" in log_text and b"\nname-" not in log_text and b"\x1b" not in log_text


# -- every other class of hostile file ---------------------------------------------------------------
def hidden_header_jpeg(size: tuple[int, int]) -> bytes:
    """A colour JPEG whose size the header reader cannot see: 1.1 MB of comment segments before SOF."""
    img = np.full((*size, 3), 170, np.uint8)
    blob = encode(".jpg", img)
    comments = b"".join(b"\xff\xfe" + (65533 + 2).to_bytes(2, "big") + b"c" * 65533 for _ in range(18))
    return blob[:2] + comments + blob[2:]


def test_hostile_files_each_get_one_event_and_the_line_goes_on(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                              report: Any) -> None:
    cfg = folder_station(tmp_path, tiny_package, broker)
    inbox = tmp_path / "in"
    old = time.time() - 5
    part = make_part((96, 128), seed=3)
    png = part_png(3, defect=False)
    outside = tmp_path / "outside.png"  # a real image outside the hot folder
    outside.write_bytes(png)
    files: dict[str, tuple[bytes | None, str, str]] = {  # name -> (content, verdict, words in the error)
        "empty.png": (b"", "error", "not a readable image (0 bytes)"),
        "trunc-png.png": (png[: len(png) // 2], "error", "not a readable image"),
        "trunc-jpeg.jpg": (encode(".jpg", part)[:600], "error", "not a readable image"),
        "jpeg-named.png": (encode(".jpg", part), "pass", ""),  # decoded by content: a fine image
        "text-named.png": (b"hello, this is a text file\n" * 20, "error", "not a readable image"),
        # 64 MP in 3 kB; WebP headers are not read by the size check: OpenCV's own limit holds it
        "bomb-webp.png": (encode(".webp", np.full((8000, 8000), 170, np.uint8)), "error",
                          "more than the decoder's limit of 40000000 pixels"),
        "bomb-jpeg.jpg": (hidden_header_jpeg((8000, 8000)), "error", "CV_IO_MAX_IMAGE_PIXELS"),
    }
    for name, (blob, _, _) in files.items():
        assert blob is not None
        write_atomic(inbox, name, blob, mtime=old)
    (inbox / "link-out.png").symlink_to(outside)
    (inbox / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (inbox / "dir.png").mkdir()
    (inbox / "dir.png" / "inner.png").write_bytes(png)
    os.mkfifo(inbox / "fifo.png")
    files |= {"link-out.png": (None, "error", "is a symbolic link"),
              "dangling.png": (None, "error", "is a symbolic link"),
              "dir.png": (None, "error", "is a directory"),
              "fifo.png": (None, "error", "is a FIFO")}
    write_good(inbox)
    stems = {Path(n).stem for n in files} | set(GOOD)
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        ok = sub.wait_parts(stems, 90)
        time.sleep(0.5)
        peak_mb = vm_hwm_mb(d.proc.pid)
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    entry = tally("hostile files (empty, truncated, lying extension, bombs, links, dir, FIFO)", stems, results,
                  daemon_peak_rss_mb=round(peak_mb, 1), verdicts={e["part_id"]: e["verdict"] for e in results})
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    assert entry["duplicates"] == 0
    assert_valid(results)
    got = by_id(results)
    for name, (_, verdict, words) in files.items():
        e = got[Path(name).stem]
        assert e["verdict"] == verdict and words in (e["error"] or ""), (name, e["verdict"], e["error"])
        folder = "failed" if verdict == "error" else "done"
        assert os.path.lexists(inbox / folder / name), f"{name} not in {folder}/"
    assert all(got[g]["verdict"] == ("fail" if i % 4 == 0 else "pass") for i, g in enumerate(GOOD))
    assert (inbox / "failed" / "link-out.png").is_symlink() and outside.read_bytes() == png, "the link is moved, not its target"
    assert (inbox / "failed" / "dir.png" / "inner.png").exists()
    assert peak_mb < 350, f"daemon peaked at {peak_mb:.0f} MB RSS: a bomb was decoded"


# -- a frame inside max_pixels that does not fit the memory limit --------------------------------------
def fake_cgroup(root: Path, limit_mb: int, current_mb: int) -> Path:
    """A cgroup v2 tree as the daemon sees it (EDGE_CGROUP_ROOT); /proc/self/cgroup says '0::/' there."""
    root.mkdir(parents=True)
    (root / "memory.max").write_text(f"{limit_mb << 20}\n")
    (root / "memory.current").write_text(f"{current_mb << 20}\n")
    (root / "memory.stat").write_text("anon 1\ninactive_file 0\n")
    return root


def test_frame_too_big_for_the_memory_limit_is_refused_with_numbers(tmp_path: Path, tiny_package: Path,
                                                                   broker: Broker, report: Any) -> None:
    cfg = folder_station(tmp_path, tiny_package, broker, memory_reserve_mb=16)
    inbox = tmp_path / "in"
    big = make_part((1500, 2000), seed=5)  # 3 MP: far inside max_pixels (40 MP), ~130 MiB to inspect
    write_atomic(inbox, "big.png", encode(".png", big), mtime=time.time() - 5)
    write_good(inbox)
    cgroup = fake_cgroup(tmp_path / "cgroup", limit_mb=1024, current_mb=960)  # 64 MiB free, 16 reserved
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log", env={"EDGE_CGROUP_ROOT": str(cgroup)})
    try:
        ok = sub.wait_parts({"big", *GOOD}, 90)
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    entry = tally("frame inside max_pixels but not inside the memory limit", {"big", *GOOD}, results)
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    e = by_id(results)["big"]
    assert e["verdict"] == "error", e
    assert "2000x1500 frame needs about" in e["error"] and "MiB of the service's 1024 MiB memory limit" in e["error"]
    assert str(cgroup / "memory.max") in e["error"], e["error"]
    assert (inbox / "failed" / "big.png").exists()
    assert all(by_id(results)[g]["verdict"] != "error" for g in GOOD)


# -- a poison the code does not foresee: crash counter and quarantine -----------------------------------
def test_poison_that_kills_the_daemon_is_quarantined_after_n_crashes(tmp_path: Path, tiny_package: Path,
                                                                    broker: Broker, report: Any) -> None:
    """The test hook SIGKILLs the daemon when it loads the poison (like a decoder segfault or an OOM
    kill: no `except` runs). Restarted like systemd would, it must quarantine the file after
    quarantine_after_crashes (3) crashes in a row and then inspect everything else."""
    cfg = folder_station(tmp_path, tiny_package, broker)
    inbox = tmp_path / "in"
    before = [f"a{i:03d}" for i in range(12)]
    write_good(inbox, before)
    write_atomic(inbox, "m-poison.png", part_png(99), mtime=time.time() - 5)
    write_good(inbox)
    everything = {*before, "m-poison", *GOOD}
    sub = PersistentSubscriber(broker.host, broker.port)
    codes: list[int] = []
    run_s: list[float] = []
    d: Daemon | None = None
    try:
        for k in range(6):
            t0 = time.monotonic()
            d = Daemon(cfg, tmp_path / f"daemon{k}.log", env={TEST_HOOK_KILL_ENV: "poison"})
            ok = sub.wait_for(lambda d=d: everything <= {e["part_id"] for e in sub.results()}
                              or d.proc.poll() is not None, 90)
            if d.proc.poll() is not None:
                codes.append(d.wait(10))
                run_s.append(round(time.monotonic() - t0, 2))
                continue
            break
        assert d is not None
        ok = sub.wait_parts(everything, 60)
        # A part published before a crash but not yet moved out is inspected again after the quarantine;
        # stopping before that leaves its count (by design: files not committed wait for the next start).
        left = wait_until(lambda: not any(inbox.glob("*.png")), 60)
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        if d is not None:
            d.kill()
        sub.close()
    results = sub.results()
    counts = json.loads((tmp_path / "state" / "folder-crashes.json").read_text())
    entry = tally("poison file killing the daemon (SIGKILL test hook), restarted", everything, results,
                  exit_codes=codes, seconds_from_start_to_crash=run_s, crash_counts_left=counts)
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    assert codes == [-signal.SIGKILL] * 3, codes
    check(entry)
    e = by_id(results)["m-poison"]
    assert e["verdict"] == "error" and "quarantined" in e["error"] and "died 3 times in a row" in e["error"], e
    assert (inbox / "failed" / "m-poison.png").exists()
    assert left, f"files never moved out of the inbox: {sorted(p.name for p in inbox.glob('*.png'))}"
    assert all(by_id(results)[p]["verdict"] != "error" for p in everything - {"m-poison"})
    assert counts == {}, "a clean inspection or the quarantine resets every count"


# -- NaN from the model ---------------------------------------------------------------------------------
def make_nan_package(out: Path) -> Path:
    """The tiny package with its output multiplied by NaN: a broken export that emits NaN everywhere."""
    pkg = make_tiny_package(out, name="tiny-nan")
    base = build_dark_spot_model(64)
    prob = ops.multiply(base.get_results()[0].input_value(0), ops.constant(np.float32(np.nan)))
    prob.output(0).set_names({"prob"})
    ov.save_model(ov.Model([prob], base.get_parameters(), "nan"), str(pkg / "model.xml"), compress_to_fp16=False)
    meta = json.loads((pkg / PACKAGE_JSON).read_text())
    meta["files"] = {f: sha256_file(pkg / f) for f in ("model.xml", "model.bin")}
    (pkg / PACKAGE_JSON).write_text(json.dumps(meta, indent=2))
    return pkg


def test_model_emitting_nan_gives_error_never_pass(tmp_path: Path, broker: Broker, report: Any) -> None:
    pkg = make_nan_package(tmp_path / "nan-pkg")
    cfg = folder_station(tmp_path, pkg, broker)
    names = GOOD[:8]
    write_good(tmp_path / "in", names)
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        ok = sub.wait_parts(set(names), 90)
        raised = sub.wait_alarm("model_error", "raised", 10)
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        sub.close()
    results = sub.results()
    entry = tally("model emitting NaN", names, results, verdicts=sorted({e["verdict"] for e in results}))
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    assert_valid(results)
    for e in results:
        assert e["verdict"] == "error", e
        assert "model output is not finite: 12288 NaN and 0 infinite of 12288 values" in e["error"], e["error"]
    assert raised is not None, "a NaN model is a model error"
    assert {p.stem for p in (tmp_path / "in" / "failed").iterdir()} == set(names)
    # `edge inspect` goes through the same postprocess
    import subprocess
    import sys
    img = tmp_path / "one.png"
    img.write_bytes(part_png(1, defect=False))
    r = subprocess.run([sys.executable, "-m", "edge", "inspect", "--model", str(pkg), "--json", str(img)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    row = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 1 and row["verdict"] == "error" and "NonFiniteError" in row["error"], (r.stdout, r.stderr)


# -- thousands of regions --------------------------------------------------------------------------------
def specks(size: tuple[int, int] = (480, 640), pitch: int = 8) -> np.ndarray:
    """A light part with a dark 2x2 speck every `pitch` pixels: thousands of defect regions."""
    img = make_part(size, seed=4)
    for dy in (0, 1):
        for dx in (0, 1):
            img[4 + dy :: pitch, 4 + dx :: pitch] = 30
    return img


def test_thousands_of_specks_give_a_bounded_event(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                  report: Any) -> None:
    cfg = folder_station(tmp_path, tiny_package, broker)
    write_atomic(tmp_path / "in", "specks.png", encode(".png", specks()), mtime=time.time() - 5)
    write_good(tmp_path / "in", GOOD[:4])
    sub = PersistentSubscriber(broker.host, broker.port)
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        ok = sub.wait_parts({"specks", *GOOD[:4]}, 90)
        assert stop(d) == 0, d.text()[-3000:]
    finally:
        d.kill()
        sub.close()
    sizes = {json.loads(m.payload)["part_id"]: len(m.payload) for m in sub.messages if m.topic.endswith("/result")}
    results = sub.results()
    e = by_id(results).get("specks", {})
    entry = tally("frame with thousands of defect regions", {"specks", *GOOD[:4]}, results,
                  region_count=e.get("region_count"), listed=len(e.get("regions", [])),
                  event_bytes=sizes.get("specks"))
    report(entry)
    assert ok, f"{entry}\n{d.text()[-3000:]}"
    check(entry)
    assert_valid(results)
    assert e["verdict"] == "fail" and e["region_count"] >= 4000 and e["regions_truncated"] is True, entry
    assert len(e["regions"]) == 50 and e["total_defect_area"] >= 4 * 4000
    areas = [r["area"] for r in e["regions"]]
    assert areas == sorted(areas, reverse=True), "the largest regions are listed"
    assert sizes["specks"] < 16 * 1024 < EVENT_MAX_BYTES, sizes


# -- the per-part catch itself (in-process: a fault injected into one part's event) ------------------------
def test_a_part_whose_event_cannot_be_built_gets_an_error_event(tmp_path: Path, tiny_package: Path, broker: Broker,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Something unforeseen raises while one part's event is built (here: handing its evidence over). That
    part gets an `error` event (internal) and goes to failed/; the thread and the other parts go on.
    When not even the error event can be built (`worst`), the file still goes to failed/, logged."""
    import edge.flow

    offer, build = EvidenceWriter.offer, edge.flow.build_result_event

    def failing_build(**kw: Any) -> Any:
        if kw["part_id"] == "worst":
            raise RuntimeError("event builder exploded")
        return build(**kw)

    monkeypatch.setattr(edge.flow, "build_result_event", failing_build)

    def failing_offer(self: EvidenceWriter, event_id: str, capture_ts: float, image: Any, *a: Any, **kw: Any) -> Any:
        if image is not None and image.shape == (97, 128):
            raise RuntimeError("evidence writer exploded")
        return offer(self, event_id, capture_ts, image, *a, **kw)

    monkeypatch.setattr(EvidenceWriter, "offer", failing_offer)
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_atomic(inbox, "odd.png", encode(".png", make_part((97, 128), defect=True, seed=1)), mtime=time.time() - 5)
    write_atomic(inbox, "worst.png", part_png(2), mtime=time.time() - 5)
    write_good(inbox, GOOD[:6])
    data = station(tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                                    "poll_interval_s": 0.05})
    sub = PersistentSubscriber(broker.host, broker.port)
    try:
        with running(data) as pipe:
            assert pipe.flow is not None
            ok = sub.wait_parts({"odd", *GOOD[:6]}, 60)
            ok = ok and sub.wait_for(lambda: (inbox / "failed" / "worst.png").exists(), 30)
            fatal = pipe.flow.fatal
    finally:
        sub.close()
    assert ok and fatal is None, fatal
    e = by_id(sub.results())["odd"]
    assert e["verdict"] == "error" and "internal error" in e["error"] and "evidence writer exploded" in e["error"]
    assert (inbox / "failed" / "odd.png").exists()
    assert all(by_id(sub.results())[g]["verdict"] != "error" for g in GOOD[:6])
    assert "worst" not in by_id(sub.results())


def test_systemd_restarts_long_enough_for_the_quarantine() -> None:
    """StartLimitBurst must leave room for the crashes a poison file causes before it is quarantined
    (several poison files in a row, not only one), within StartLimitIntervalSec."""
    from edge.config import FolderSourceConfig
    from tests.deploy.test_systemd_unit import UNIT, parse_unit, values

    unit = parse_unit(UNIT.read_text())
    burst = int(values(unit, "Unit", "StartLimitBurst")[0])
    interval = int(values(unit, "Unit", "StartLimitIntervalSec")[0])
    restart = float(values(unit, "Service", "RestartSec")[0])
    n = FolderSourceConfig.model_fields["quarantine_after_crashes"].default
    poison_files = (burst - 1) // n
    assert poison_files >= 3, f"StartLimitBurst={burst} covers only {poison_files} poison file(s) of {n} crashes"
    assert burst * (restart + 10.0) < interval, "the burst must fit in the interval with ~10 s per start"
