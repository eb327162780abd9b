"""The evidence writer: the verdict path never waits for the disk, and evidence is thinned by rule."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edge.alarms import EVIDENCE_THINNED
from edge.cpubusy import CpuBusy
from edge.events import validate_event
from edge.evidence import PENDING, THINNED, EvidenceStore, EvidenceWriter, MaskCrop
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, alarms, running, station, wait_results
from tests.tiny_package import make_part


class HeldStore(EvidenceStore):
    """A real store whose writes wait until the test opens the gate: a disk that has fallen behind."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, quota_bytes=10**9)
        self.gate = threading.Event()

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.gate.wait(30)
        return super().save(*args, **kwargs)


def test_offer_returns_pending_and_the_files_exist_after_close(tmp_path: Path) -> None:
    img = make_part((96, 128), defect=True)
    mask = (img < 80).astype(np.uint8)
    writer = EvidenceWriter(EvidenceStore(tmp_path, quota_bytes=10**9), max_bytes=10**8)
    prefix, status = writer.offer("e1", 1_700_000_000.0, img, mask, [], "fail")
    assert status == PENDING and prefix == "2023-11-14/e1"
    assert writer.offer("e2", 1_700_000_000.0, img, None, [], "pass") == (None, None)  # passes not wanted
    assert writer.offer("e3", 1_700_000_000.0, None, None, [], "error") == (None, None)  # no frame
    writer.close()
    for suffix in ("frame.png", "overlay.png", "mask.png"):
        assert (tmp_path / f"{prefix}.{suffix}").is_file()
    assert writer.snapshot()["written"] == 1 and writer.snapshot()["queued_bytes"] == 0


def test_a_queued_fail_holds_its_frame_and_only_the_box_of_its_mask(tmp_path: Path) -> None:
    """At 5 MP a fail's mask is a 5 MB array of mostly zeros: the queue holds the box of its set
    pixels, and the files written from it are the files of the full mask."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (2048, 2448), dtype=np.uint8)
    mask = np.zeros(img.shape, np.uint8)
    mask[1000:1040, 2000:2030] = rng.integers(0, 2, (40, 30), dtype=np.uint8)
    mask[1005, 2005] = 1
    store = HeldStore(tmp_path / "queued")
    writer = EvidenceWriter(store, max_bytes=10**8)
    prefix, status = writer.offer("e1", 1_700_000_000.0, img, mask, [], "fail", (3, 4))
    assert status == PENDING and writer.snapshot()["queued_bytes"] <= img.nbytes + 40 * 30
    store.gate.set()
    writer.close()
    direct = EvidenceStore(tmp_path / "direct", quota_bytes=10**9).save("e1", 1_700_000_000.0, img, mask, [],
                                                                        "fail", (3, 4))
    for suffix in ("frame.png", "overlay.png", "mask.png"):
        assert (tmp_path / "queued" / f"{prefix}.{suffix}").read_bytes() == \
            (tmp_path / "direct" / f"{direct}.{suffix}").read_bytes()


@pytest.mark.parametrize("case", ["empty mask", "colour frame, mask past the frame's edge"])
def test_files_from_a_mask_crop_equal_the_files_of_the_full_mask(tmp_path: Path, case: str) -> None:
    """The writer hands the store the crop; overlay and mask files must not change for it."""
    rng = np.random.default_rng(5)
    if case == "empty mask":
        img, mask, offset = rng.integers(0, 256, (60, 80), dtype=np.uint8), np.zeros((60, 80), np.uint8), (0, 0)
    else:  # an ROI mask that reaches past the frame: only the part inside is tinted
        img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        mask[25:40, 30:40] = 255
        offset = (50, 30)
    via_crop = EvidenceStore(tmp_path / "crop", 10**9).save("e1", 0.0, img, MaskCrop.of(mask), [], "fail", offset)
    via_full = EvidenceStore(tmp_path / "full", 10**9).save("e1", 0.0, img, mask, [], "fail", offset)
    assert via_crop == via_full
    written = sorted(f.name for f in (tmp_path / "full").rglob("*.png"))
    assert written == sorted(f.name for f in (tmp_path / "crop").rglob("*.png"))
    assert ("e1.mask.png" in written) == (case != "empty mask")
    for name in written:
        assert next((tmp_path / "crop").rglob(name)).read_bytes() == next((tmp_path / "full").rglob(name)).read_bytes()


def test_behind_keeps_every_nth_and_the_first_fails_after_a_pass(tmp_path: Path) -> None:
    img = np.full((100, 100), 128, np.uint8)  # 10,000 bytes a part, no mask
    alarms: list[tuple[str, bool]] = []
    store = HeldStore(tmp_path)
    writer = EvidenceWriter(store, max_bytes=100_000, keep_every=4, keep_first_bad=2, alarm_after_s=0.0,
                            on_alarm=lambda name, active, _msg: alarms.append((name, active)))
    got = [writer.offer(f"f{i}", 0.0, img, None, [], "fail")[1] for i in range(50)]
    # 5 fit below half the bound; then every 4th until the bound is reached (5 more); then none fits
    assert got[:5] == [PENDING] * 5
    behind = got[5:]
    assert behind.count(PENDING) == 5 and writer.queued_bytes <= 100_000
    assert behind[:4] == [THINNED, THINNED, THINNED, PENDING]
    assert writer.thinned == 50 - got.count(PENDING) and writer.queued_bytes == 100_000
    assert alarms == [(EVIDENCE_THINNED, True)]  # sustained (alarm_after_s=0): raised once
    # a pass, then the first two fails are kept while they fit; the bound is full here, so thinned
    writer.offer("p", 0.0, img, None, [], "pass")
    assert writer.offer("f-after", 0.0, img, None, [], "fail")[1] == THINNED
    store.gate.set()
    writer.close()
    assert writer.queued_bytes == 0 and writer.written == got.count(PENDING)
    writer.tick()
    assert alarms[-1] == (EVIDENCE_THINNED, False)


def test_first_fails_after_a_pass_are_kept_when_behind(tmp_path: Path) -> None:
    img = np.full((100, 100), 128, np.uint8)
    store = HeldStore(tmp_path)
    writer = EvidenceWriter(store, max_bytes=100_000, keep_every=1000, keep_first_bad=2)
    for i in range(6):  # 60 % of the bound queued: behind
        writer.offer(f"f{i}", 0.0, img, None, [], "error")
    writer.offer("p", 0.0, img, None, [], "pass")
    got = [writer.offer(f"g{i}", 0.0, img, None, [], "fail")[1] for i in range(3)]
    assert got == [PENDING, PENDING, THINNED]
    store.gate.set()
    writer.close()


def test_station_thins_evidence_by_rule_and_says_so(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    """Every part defective, a writer queue that holds ~two frames: verdicts all arrive, each event says
    whether its evidence is pending or thinned, pending files exist after the stop, thinning is alarmed."""
    data = station(tmp_path, tiny_package, broker,
                   {"type": "synthetic", "count": 40, "fps": 0, "defect_rate": 1.0, "width": 256, "height": 192},
                   evidence={"queue_mb": 0.1, "keep_every_when_behind": 5, "keep_first_bad": 1, "thinning_alarm_s": 0},
                   metrics={"enabled": False, "stats_interval_s": 0.2})
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        with running(data):
            got = wait_results(sub, 40)
    finally:
        sub.close()
    for e in got:
        validate_event(e)
    status = [e["evidence_status"] for e in got]
    assert set(status) <= {"pending", "thinned"} and status.count("thinned") > 0 and status.count("pending") > 0
    assert all((e["evidence"] is None) == (e["evidence_status"] == "thinned") for e in got)
    root = tmp_path / "state" / "evidence"
    for e in got:
        if e["evidence_status"] == "pending":
            assert (root / f"{e['evidence']}.frame.png").is_file()
    assert any(a["alarm"] == EVIDENCE_THINNED and a["state"] == "raised" for a in alarms(sub))


class FixedBusy(CpuBusy):
    """The machine's busy share as the test sets it (the real /proc/stat reader is tested below)."""

    def __init__(self, share: float) -> None:
        super().__init__()
        self.value = share

    def share(self) -> float:
        return self.value


def test_cpu_budget_thins_only_while_the_cpus_are_saturated(tmp_path: Path) -> None:
    """Over its CPU budget on a saturated line the writer keeps nothing more (not every Nth, not each
    isolated fail as a first fail: that took 15-30 % of a core at 5 MP) until the budget refills;
    with idle CPUs it keeps everything, whatever it has spent."""
    img = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)  # costs real encoding time
    cpu = FixedBusy(1.0)
    writer = EvidenceWriter(EvidenceStore(tmp_path, quota_bytes=10**9), max_bytes=10**9, keep_every=3,
                            keep_first_bad=2, cpu_share=1e-6, cpu_burst_s=0.0, cpu=cpu)
    assert [writer.offer(f"a{i}", 0.0, img, None, [], "fail")[1] for i in range(2)] == [PENDING] * 2
    writer.close(timeout=30)  # the two were encoded: the budget is spent
    assert writer.cpu_s > 0 and writer.snapshot()["cpu_ms"] >= 0
    writer = EvidenceWriter(EvidenceStore(tmp_path, quota_bytes=10**9), max_bytes=10**9, keep_every=3,
                            keep_first_bad=2, cpu_share=1e-6, cpu_burst_s=0.0, cpu=cpu)
    writer._cpu_debt = 1.0  # as if it had just encoded a second's worth
    got = [writer.offer(f"b{i}", 0.0, img, None, [], "fail")[1] for i in range(8)]
    assert got == [THINNED] * 8
    cpu.value = 0.3  # the line slowed down: idle cores encode every fail again
    assert [writer.offer(f"c{i}", 0.0, img, None, [], "fail")[1] for i in range(4)] == [PENDING] * 4
    writer.backlog = lambda: True  # parts wait for the model: saturated, whatever /proc/stat says
    assert [writer.offer(f"d{i}", 0.0, img, None, [], "fail")[1] for i in range(3)] == [THINNED] * 3
    writer.backlog = lambda: False
    assert writer.offer("e", 0.0, img, None, [], "fail")[1] == PENDING
    writer.close(timeout=30)
    assert writer.thinned == 11


def test_cpu_busy_reads_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    busy = CpuBusy(period_s=0.0, path=stat)
    stat.write_text("cpu  190 0 190 820 0 0 0 0 0 0\n")  # 180 busy of 200 jiffies
    assert busy.share() == 0.9
    assert CpuBusy(path=tmp_path / "missing").share() == 1.0  # unknown counts as busy: verdicts first
