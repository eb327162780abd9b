"""Frame sources, frame checks and trigger handling, against real files and real OpenCV captures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.config import (
    CameraSourceConfig,
    FolderSourceConfig,
    FrameChecksConfig,
    PipelineConfig,
    SyntheticSourceConfig,
    VideoSourceConfig,
)
from edge.metrics import Metrics
from edge.sources import (
    CameraSource,
    FolderSource,
    Frame,
    SyntheticSource,
    check_frame,
    parse_trigger,
)
from edge.sources.base import PART_ID_MAX
from edge.triggering.gate import FrameGate
from tests.tiny_package import make_part


def write_video(path: Path, n: int, size: tuple[int, int] = (96, 128)) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]), isColor=False)
    assert w.isOpened()
    for i in range(n):
        w.write(make_part(size, defect=bool(i % 2), seed=i))
    w.release()
    return path


def read_all(src: object, until: float, want: int) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + until
    while time.monotonic() < deadline and len(frames) < want:
        f = src.read(0.1)  # type: ignore[attr-defined]
        if f is not None:
            frames.append(f)
    return frames


# -- triggers -------------------------------------------------------------------------------------
def test_parse_trigger_accepts_json_and_plain_text() -> None:
    assert parse_trigger(b'{"part_id": "A-17"}') == "A-17"
    assert parse_trigger(b"  SN 0042\n") == "SN 0042"
    assert parse_trigger(json.dumps("Q9").encode()) == "Q9"
    for bad in (b"", b"{}", b'{"part_id": 5}', b"{not json", b"\xff\xfe", b"a/b", b"x" * 200, b'{"part_id": ""}',
                b"line\x00break", b"[1, 2]"):
        with pytest.raises(ValueError):
            parse_trigger(bad)


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda v: json.dumps(v).encode(),
                           st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=20)),
                                        lambda c: st.dictionaries(st.sampled_from(["part_id", "x"]), c, max_size=2)
                                        | st.lists(c, max_size=2), max_leaves=5))))
def test_fuzzed_trigger_payloads_give_an_id_or_a_clean_error(payload: bytes) -> None:
    _FUZZ_GATE.on_trigger(payload)  # the MQTT callback path: counts, logs, never raises
    try:
        part = parse_trigger(payload)
    except ValueError:
        return
    assert 0 < len(part) <= PART_ID_MAX and part.isprintable() and "/" not in part


_FUZZ_GATE = FrameGate(PipelineConfig(mode="triggered", trigger_max_pending=10_000), Metrics())


def test_gate_assigns_triggers_to_the_next_frames_and_expires_the_rest() -> None:
    gate = FrameGate(PipelineConfig(mode="triggered", trigger_timeout_s=0.2, trigger_max_pending=2), Metrics())
    old = Frame("f0", time.time(), make_part())
    assert gate.admit(old) == []  # no trigger yet: skipped
    gate.on_trigger(b'{"part_id": "P1"}')
    assert gate.admit(old) == []  # captured before the trigger: not that part's image
    gate.on_trigger(b"P2")
    gate.on_trigger(b"P3")  # over trigger_max_pending: still becomes an error verdict
    gate.on_trigger(b"\xff garbage")
    taken = gate.admit(Frame("f1", time.time(), make_part()))
    assert [f.part_id for f in taken] == ["P1"] and not taken[0].live
    overflow = gate.expired_triggers()
    assert [(f.part_id, f.error_kind) for f in overflow] == [("P3", "no_frame")]
    time.sleep(0.25)
    expired = gate.expired_triggers()
    assert [f.part_id for f in expired] == ["P2"] and "no frame within" in (expired[0].error or "")
    assert {k: v for k, v in gate.triggers.items() if v} == {"accepted": 2, "malformed": 1, "expired": 1, "overflow": 1}


def test_gate_free_run_every_nth_and_errors_always_pass() -> None:
    gate = FrameGate(PipelineConfig(every_nth=3), Metrics())
    taken = [f for i in range(9) for f in gate.admit(Frame(str(i), 0.0, make_part()))]
    assert [f.part_id for f in taken] == ["2", "5", "8"]
    err = Frame("lost", 0.0, None, error="no frame", error_kind="camera_lost")
    assert gate.admit(err) == [err]


def test_gate_counters_are_one_locked_object_shared_with_the_flow() -> None:
    """skipped (gate), inspected and dropped (flow, main loop): one Counters, reported by snapshot()."""
    gate = FrameGate(PipelineConfig(every_nth=2), Metrics())
    for i in range(4):
        gate.admit(Frame(str(i), 0.0, make_part()))
    gate.counters.add("inspected", 3)
    gate.counters.add("dropped")
    snap = gate.snapshot()
    assert (snap["skipped"], snap["dropped"], snap["inspected_interval"]) == (2, 1, 3)
    gate.counters.add("inspected")
    assert gate.snapshot()["inspected_interval"] == 1  # the increase since the previous stats message


# -- frame checks ---------------------------------------------------------------------------------
def test_check_frame_rejects_black_white_empty_wrong_size_and_stale() -> None:
    checks = FrameChecksConfig(expect_width=128, expect_height=96, max_age_s=0.5)
    assert check_frame(Frame("p", 0, make_part()), checks) is None
    assert "black" in (check_frame(Frame("p", 0, np.zeros((96, 128), np.uint8)), checks) or "")
    # blown out (a flash misfire) once passed as a good part: 8 and 16 bit; a bright but textured part is inspected
    assert "all-white frame, saturated" in (check_frame(Frame("p", 0, np.full((96, 128), 254, np.uint8)), checks) or "")
    assert "all-white" in (check_frame(Frame("p", 0, np.full((96, 128), 65535, np.uint16)), checks) or "")
    bright = (make_part() // 3 + 170).astype(np.uint8)
    assert bright.mean() > 200 and check_frame(Frame("p", 0, bright), checks) is None
    assert check_frame(Frame("p", 0, np.full((96, 128), 254, np.uint8)), FrameChecksConfig(reject_white=False)) is None
    assert "empty" in (check_frame(Frame("p", 0, np.zeros((0, 0), np.uint8)), checks) or "")
    assert "width" in (check_frame(Frame("p", 0, make_part((96, 100))), checks) or "")
    assert "shape" in (check_frame(Frame("p", 0, np.zeros((96, 128, 2), np.uint8)), checks) or "")
    stale = Frame("p", 0, make_part(), mono_ts=time.monotonic() - 1.0)
    assert "stale" in (check_frame(stale, checks) or "")
    stale.live = False  # a part from a file is never "stale"
    assert check_frame(stale, checks) is None


# -- folder ---------------------------------------------------------------------------------------
def test_folder_takes_only_complete_files_in_order(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    src = FolderSource(FolderSourceConfig(type="folder", path=inbox, settle_s=0.3, poll_interval_s=0.05))
    src.open()
    for name in ("b", "a", "c"):
        cv2.imwrite(str(inbox / f"{name}.png"), make_part(seed=ord(name)))
    cv2.imwrite(str(inbox / ".hidden.png"), make_part())
    (inbox / "d.png.tmp").write_bytes(b"partial")
    (inbox / "e.part").write_bytes(b"partial")
    (inbox / "notes.txt").write_text("not an image")
    assert src.read(0.1) is None  # too fresh: not yet settled
    frames = read_all(src, 3.0, 3)
    assert [f.part_id for f in frames] == ["a", "b", "c"]
    assert frames[0].capture_ts == pytest.approx((inbox / "a.png").stat().st_mtime)
    assert src.read(0.3) is None  # handed out, not committed: never twice
    for f in frames:
        src.commit(f, ok=True)
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [".hidden.png", "d.png.tmp", "e.part",
                                                                      "notes.txt"]


def test_folder_corrupt_file_is_an_error_frame_moved_to_failed(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    old = time.time() - 10
    os.utime(inbox / "broken.png", (old, old))
    src = FolderSource(FolderSourceConfig(type="folder", path=inbox, settle_s=0.0, poll_interval_s=0.05,
                                          stop_when_empty=True))
    src.open()
    (frame,) = read_all(src, 2.0, 1)
    assert frame.image is None and frame.error_kind == "unreadable" and frame.part_id == "broken"
    src.commit(frame, ok=False)
    assert (inbox / "failed" / "broken.png").exists()
    src.read(0.2)
    assert src.exhausted


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_has_truth_in_the_part_id_and_a_count() -> None:
    src = SyntheticSource(SyntheticSourceConfig(type="synthetic", count=6, fps=0, defect_rate=0.5, seed=3))
    src.open()
    frames = read_all(src, 2.0, 6)
    assert len(frames) == 6 and src.exhausted and src.read(0.05) is None
    for f in frames:
        dark = int((f.image < 80).sum())  # type: ignore[operator]
        assert (dark > 20) == f.part_id.startswith("ng-"), f.part_id
    # a benchmark pool that would take the line PC's memory is refused at load (32 GiB once filled it at start)
    with pytest.raises(ValidationError, match=r"pool 256 of 8192x8192 frames holds 32\.0 GiB"):
        SyntheticSourceConfig(type="synthetic", width=8192, height=8192, pool=256)
    assert SyntheticSourceConfig(type="synthetic", width=2448, height=2048, pool=8).pool == 8


def test_synthetic_rate_limit() -> None:
    src = SyntheticSource(SyntheticSourceConfig(type="synthetic", fps=20, count=5))
    src.open()
    t0 = time.monotonic()
    assert len(read_all(src, 3.0, 5)) == 5
    assert time.monotonic() - t0 >= 0.18



def test_a_paced_pool_hands_its_first_parts_over_one_period_apart() -> None:
    """The pool of big parts is made in open(), before the clock starts: made in the first read it put
    the schedule behind and the catch-up handed the first parts over back to back (a queue at start)."""
    src = SyntheticSource(SyntheticSourceConfig(type="synthetic", fps=20, count=4, width=2448, height=2048, pool=1))
    src.open()
    stamps = [f.mono_ts for f in read_all(src, 5.0, 4)]
    gaps = np.diff(stamps)
    assert len(stamps) == 4 and gaps.min() >= 0.04, gaps  # period 50 ms


# -- camera / video -------------------------------------------------------------------------------
def test_video_frames_then_end_reports_camera_lost(tmp_path: Path) -> None:
    video = write_video(tmp_path / "parts.avi", 4)
    src = CameraSource(VideoSourceConfig(type="video", path=video, stall_timeout_s=0.4))
    src.open()
    try:
        frames = read_all(src, 5.0, 5)
    finally:
        src.close()
    assert [f.error for f in frames[:4]] == [None] * 4
    assert frames[0].image is not None and frames[0].image.shape[:2] == (96, 128)
    assert frames[4].error_kind == "camera_lost" and "video ended" in (frames[4].error or "")


def test_video_loop_and_stop_at_end(tmp_path: Path) -> None:
    video = write_video(tmp_path / "parts.avi", 3)
    src = CameraSource(VideoSourceConfig(type="video", path=video, loop=True))
    src.open()
    try:
        frames = read_all(src, 5.0, 7)
    finally:
        src.close()
    assert len(frames) == 7 and all(f.error is None for f in frames)
    assert [f.meta["frame_index"] for f in frames] == [1, 2, 3, 1, 2, 3, 1]
    src = CameraSource(VideoSourceConfig(type="video", path=video, stop_at_end=True, stall_timeout_s=0.2))
    src.open()
    try:
        frames = read_all(src, 0.8, 10)
    finally:
        src.close()
    assert len(frames) == 3 and src.exhausted


def test_missing_camera_gives_repeated_camera_lost_frames() -> None:
    src = CameraSource(CameraSourceConfig(type="camera", uri="/dev/video-does-not-exist", stall_timeout_s=0.3,
                                          reconnect_min_s=0.05, reconnect_max_s=0.2))
    src.open()
    try:
        frames = read_all(src, 3.0, 2)
    finally:
        src.close()
    assert len(frames) == 2
    assert all(f.error_kind == "camera_lost" and f.image is None and f.live for f in frames)
    assert frames[0].part_id != frames[1].part_id and src.reconnects >= 1


# -- memory check against the cgroup limit (issue 14) ---------------------------------------------
def _cgroup_v1(root: Path, rel: str, limit: int, usage: int, inactive: int = 0) -> None:
    d = root / "memory" / rel.strip("/")
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")


def test_read_budget_cgroup_v2_v1_and_unlimited(tmp_path: Path) -> None:
    from edge.memory import MiB, read_budget

    v2 = tmp_path / "v2"
    (v2 / "system.slice" / "edge.service").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("1\n")
    unit = v2 / "system.slice" / "edge.service"
    (unit / "memory.max").write_text(f"{1024 * MiB}\n")
    (unit / "memory.current").write_text(f"{700 * MiB}\n")
    (unit / "memory.stat").write_text(f"anon 1\ninactive_file {100 * MiB}\nactive_file 7\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/edge.service\n")
    b = read_budget(v2, proc)
    assert b is not None and b.limit == 1024 * MiB and b.usage == 600 * MiB and b.free == 424 * MiB
    assert b.source == str(unit / "memory.max")

    (v2 / "system.slice" / "memory.max").write_text(f"{800 * MiB}\n")  # a tighter parent slice wins
    (v2 / "system.slice" / "memory.current").write_text(f"{700 * MiB}\n")
    b = read_budget(v2, proc)
    assert b is not None and b.free == 100 * MiB

    v1 = tmp_path / "v1"
    _cgroup_v1(v1, "/", 9223372036854771712, 5)  # "no limit" in v1
    _cgroup_v1(v1, "/process_api/x", 512 * MiB, 300 * MiB, inactive=50 * MiB)
    proc.write_text("4:memory:/process_api/x\n1:cpu:/\n0::/\n")
    b = read_budget(v1, proc)
    assert b is not None and b.limit == 512 * MiB and b.free == 262 * MiB

    proc.write_text("4:memory:/\n")
    assert read_budget(v1, proc) is None  # unlimited: no check
    assert read_budget(tmp_path / "nothing", proc) is None


def test_inspection_bytes_bounds_what_the_pipeline_allocates() -> None:
    import tracemalloc

    from edge.contract import InputSpec, PostprocessParams
    from edge.memory import inspection_bytes, refusal
    from edge.postprocess import postprocess
    from edge.preprocess import preprocess, stitch

    spec = InputSpec(color="gray", tile=64, overlap=8, mean=(0.0,), std=(1.0,))
    h, w = 600, 800
    cost = inspection_bytes(w, h, spec)
    assert inspection_bytes(2 * w, 2 * h, spec) > 3.9 * cost  # ~ proportional to pixels
    assert inspection_bytes(w, h, InputSpec(color="bgr", tile=64, overlap=8, mean=(0, 0, 0), std=(1, 1, 1))) > cost
    frame = np.dstack([make_part((h, w), seed=1)] * 3)
    tracemalloc.start()
    try:
        tiles, layout = preprocess(frame, spec)
        prob = stitch(tiles[:, 0] / 255.0, layout, spec.overlap)
        det = postprocess(prob, PostprocessParams(pixel_threshold=0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert det.mask.shape == (h, w)
    assert peak + frame.nbytes < cost, (peak, cost)  # numpy's own allocations (OpenCV's are not traced)
    assert 30 < cost / (h * w) < 80, cost / (h * w)  # bytes per pixel: not absurdly loose either

    from edge.memory import MemoryBudget, MiB

    budget = MemoryBudget(limit=1024 * MiB, usage=960 * MiB, source="/sys/fs/cgroup/memory.max")
    why = refusal(w, h, 100 * MiB, budget, 16 * MiB)
    assert why is not None and "800x600 frame needs about 100 MiB" in why and "64 MiB of the service's 1024 MiB" in why
    assert refusal(w, h, 40 * MiB, budget, 16 * MiB) is None
    assert refusal(w, h, 10**12, None, 0) is None


# -- crash counter and quarantine (issue 14) ---------------------------------------------------------
def test_crash_ledger_counts_files_in_flight_at_a_crash_and_resets_on_commit(tmp_path: Path) -> None:
    from edge.sources.crashes import CrashLedger

    weird = "part-\udcff\n.png"
    first = CrashLedger(tmp_path)
    first.open()
    for name in ("a.png", weird):
        first.handed_out(name)
    first.committed("a.png")
    # the process dies here: `weird` stays recorded
    second = CrashLedger(tmp_path)
    second.open()
    assert second.count(weird) == 1 and second.count("a.png") == 0
    second.handed_out(weird)
    third = CrashLedger(tmp_path)
    third.open()
    assert third.count(weird) == 2
    third.open()  # opening again without a crash in between counts nothing
    assert third.count(weird) == 2
    third.handed_out(weird)
    third.committed(weird)
    assert CrashLedger(tmp_path).count(weird) == 0
    fourth = CrashLedger(tmp_path)
    fourth.open()
    assert fourth.count(weird) == 0 and not list((tmp_path / "folder-inflight").iterdir())
    (tmp_path / "folder-crashes.json").write_text("{not json")
    CrashLedger(tmp_path).open()  # a corrupt counter file starts again, it does not stop the daemon


def test_a_crash_after_the_move_does_not_leave_a_count_behind(tmp_path: Path) -> None:
    """The daemon dies between moving a finished file to done/ and deleting its in-flight record:
    the file is gone, so its count must go too (it stayed forever and blamed the next file of that name)."""
    from edge.sources.crashes import CrashLedger

    inbox, state = tmp_path / "in", tmp_path / "state"
    (inbox / "done").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(inbox / name), make_part(seed=1))
    ledger = CrashLedger(state)
    ledger.open()
    ledger.handed_out("a.png")
    ledger.handed_out("b.png")
    (inbox / "a.png").rename(inbox / "done" / "a.png")  # a is done and moved; the process dies now
    cfg = FolderSourceConfig(type="folder", path=inbox, settle_s=0.0, poll_interval_s=0.01)
    again = FolderSource(cfg, state_dir=state)
    again.open()
    counts = json.loads((state / "folder-crashes.json").read_text())
    assert counts == {b"b.png".hex(): 1}, counts  # b is still in the folder: still a suspect
    assert again._suspect("a.png") == 0 and again._suspect("b.png") == 1


def test_folder_inspects_suspects_alone_and_quarantines_after_n_crashes(tmp_path: Path) -> None:
    from edge.sources.crashes import CrashLedger

    inbox, state = tmp_path / "in", tmp_path / "state"
    inbox.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(inbox / name), make_part(seed=1))
    os.utime(inbox / "c.png", (time.time() - 5, time.time() - 5))
    ledger = CrashLedger(state)
    ledger.open()
    ledger.handed_out("c.png")  # c was in flight when the daemon died: a suspect
    cfg = FolderSourceConfig(type="folder", path=inbox, settle_s=0.0, poll_interval_s=0.01, quarantine_after_crashes=2)
    src = FolderSource(cfg, state_dir=state)
    src.open()
    first = read_all(src, 5, 1)[0]
    assert first.part_id == "c"  # suspects first ...
    assert src.read(0.3) is None  # ... and alone: nothing else while it is in flight
    src.commit(first, ok=True)
    rest = read_all(src, 5, 2)
    assert [f.part_id for f in rest] == ["a", "b"]
    for f in rest:
        src.commit(f, ok=True)

    cv2.imwrite(str(inbox / "p.png"), make_part(seed=2))
    for _ in range(2):  # p in flight during two crashes in a row
        led = CrashLedger(state)
        led.open()
        led.handed_out("p.png")
    src = FolderSource(cfg, state_dir=state)
    src.open()
    f = read_all(src, 5, 1)[0]
    assert f.image is None and f.error_kind == "quarantined" and "died 2 times in a row" in (f.error or "")
    src.commit(f, ok=False)
    assert (inbox / "failed" / "p.png").exists() and CrashLedger(state).count("p.png") == 0


def test_folder_gives_non_regular_entries_an_error_frame_and_never_follows_links(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    outside = tmp_path / "secret.png"
    cv2.imwrite(str(outside), make_part(seed=1))
    (inbox / "link.png").symlink_to(outside)
    (inbox / "dir.png").mkdir()
    os.mkfifo(inbox / "fifo.png")
    src = FolderSource(FolderSourceConfig(type="folder", path=inbox, settle_s=0.0, poll_interval_s=0.01))
    src.open()
    frames = {f.part_id: f for f in read_all(src, 5, 3)}
    assert "is a symbolic link" in (frames["link"].error or "") and frames["link"].image is None
    assert "is a directory" in (frames["dir"].error or "")
    assert "is a FIFO" in (frames["fifo"].error or "")
    assert {f.error_kind for f in frames.values()} == {"not_a_file"}
    for f in frames.values():
        src.commit(f, ok=False)
    assert (inbox / "failed" / "link.png").is_symlink() and outside.exists()
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["dir.png", "fifo.png", "link.png"]
