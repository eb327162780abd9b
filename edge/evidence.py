"""Evidence images (frame, overlay, mask) named by event id, kept within a disk quota.

An operator who sees a `fail` on the dashboard wants to see the part; a line PC's disk must
never fill up because of it. Files are grouped in one folder per UTC day and the oldest are
deleted first once the quota is exceeded. The event carries the relative prefix
(`2025-01-31/<event_id>`) so the files can be found from the event alone.

Encoding a 5 MP PNG costs tens of milliseconds, far more than a verdict. So the verdict path
only hands the arrays to an `EvidenceWriter` (a bounded background writer, bound in bytes) and
the event says `evidence_status: pending`. When the writer falls behind, or uses more than its
CPU budget while the machine's CPUs are saturated, evidence is thinned by rule instead of slowing
the line (see `EvidenceWriter`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from edge.alarms import EVIDENCE_THINNED
from edge.config import EvidenceConfig, default_of
from edge.contract import Region
from edge.cpubusy import CpuBusy

log = logging.getLogger(__name__)

_COLORS = {"pass": (0, 200, 0), "fail": (0, 0, 255), "error": (0, 165, 255)}


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any frame the pipeline accepts -> uint8 BGR, for drawing."""
    img = image
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img.copy()


def draw_overlay(image: np.ndarray, mask: np.ndarray | None, regions: Sequence[Region], verdict: str,
                 offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Frame with the defect mask tinted red, region boxes and the verdict written in the corner.

    `mask` covers the inspected ROI, whose top-left corner is `offset` (x, y) in the frame;
    region boxes are already in frame coordinates.
    """
    out = to_bgr8(image)
    if mask is not None:
        _tint(out, mask, offset)
    color = _COLORS.get(verdict, (255, 255, 255))
    for r in regions:
        x, y, w, h = r.bbox
        cv2.rectangle(out, (x - 2, y - 2), (x + w + 1, y + h + 1), color, 1)
    scale = max(0.4, min(out.shape[:2]) / 400)
    cv2.putText(out, verdict.upper(), (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, color,
                max(1, int(2 * scale)), cv2.LINE_AA)
    return out


def _overlay(image: np.ndarray, crop: MaskCrop | None, regions: Sequence[Region], verdict: str,
             offset: tuple[int, int]) -> np.ndarray:
    """`draw_overlay` tinted from the crop's box: the same pixels as the full mask, without making it."""
    if crop is None:
        return draw_overlay(image, None, regions, verdict, offset)
    return draw_overlay(image, crop.box, regions, verdict, (offset[0] + crop.x, offset[1] + crop.y))


def shrunk_overlay(image: np.ndarray, crop: MaskCrop | None, regions: Sequence[Region], verdict: str,
                   offset: tuple[int, int], max_side: int, stride: bool = False) -> np.ndarray:
    """`draw_overlay` at most `max_side` px on its long side (0 or a smaller frame: full size).

    The overlay is what a person looks at; the frame and mask files keep every pixel. Shrinking the
    frame (area) before it turns BGR keeps a 5 MP fail from making a 15 MB colour copy, and its PNG
    costs a fraction. The mask is shrunk by "any": every frame pixel falls in exactly one overlay
    pixel, which is tinted when any of its pixels is defect, so a 1 px blowhole stays visible.
    `stride` (the live preview) takes every k-th pixel before the area resize: faster, coarser."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return _overlay(image, crop, regions, verdict, offset)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    step = max(1, int(1 / scale) // 2) if stride else 1
    small = cv2.resize(np.ascontiguousarray(image[::step, ::step]), size, interpolation=cv2.INTER_AREA)
    rows, cols = _starts(h, size[1]), _starts(w, size[0])
    boxes = [replace(r, bbox=_shrunk_bbox(r.bbox, rows, cols)) for r in regions]
    if crop is None:
        return draw_overlay(small, None, boxes, verdict)
    fy, fx = offset[1] + crop.y, offset[0] + crop.x
    box = crop.box[: max(0, h - fy), : max(0, w - fx)]  # an ROI mask may reach past the frame's edge
    if not box.size:
        return draw_overlay(small, None, boxes, verdict)
    small_box, y, x = _any_shrink(box, fy, fx, rows, cols)
    return draw_overlay(small, small_box, boxes, verdict, (x, y))


def _starts(n_src: int, n_dst: int) -> np.ndarray:
    """First source pixel of each of `n_dst` pixels that `n_src` pixels shrink to (integer arithmetic: the runs
    tile the source exactly, each source pixel in one run)."""
    return np.arange(n_dst, dtype=np.int64) * n_src // n_dst


def _owner(starts: np.ndarray, v: int) -> int:
    """The shrunk pixel whose run of source pixels (`_starts`) holds source pixel `v`."""
    return int(np.searchsorted(starts, v, "right")) - 1


def _shrunk_bbox(bbox: tuple[int, int, int, int], rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    """A frame box (x, y, w, h) -> the box of the shrunk pixels that hold its pixels."""
    x, y, w, h = bbox
    x0, x1 = max(_owner(cols, x), 0), _owner(cols, x + max(w, 1) - 1)
    y0, y1 = max(_owner(rows, y), 0), _owner(rows, y + max(h, 1) - 1)
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def _any_shrink(box: np.ndarray, y: int, x: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A mask's box whose top-left pixel is (x, y) in the frame -> its shrunk pixels (set where any source pixel
    under them is) and their top-left (y, x) in the shrunk frame. Only the box is read: the runs that reach
    into it are clipped to it, which is the whole mask's result because the mask is 0 outside its box."""
    bh, bw = box.shape[:2]
    r0, r1 = _owner(rows, y), _owner(rows, y + bh - 1) + 1
    c0, c1 = _owner(cols, x), _owner(cols, x + bw - 1) + 1
    m = (box != 0).view(np.uint8)
    m = np.maximum.reduceat(m, np.maximum(rows[r0:r1] - y, 0), axis=0)
    return np.maximum.reduceat(m, np.maximum(cols[c0:c1] - x, 0), axis=1), r0, c0


def _mask255(mask: np.ndarray) -> np.ndarray:
    """0/255 image of a mask's nonzero pixels; for uint8 one OpenCV pass without the GIL instead of three numpy ones."""
    if mask.dtype == np.uint8:
        return cv2.threshold(mask, 0, 255, cv2.THRESH_BINARY)[1]
    return (mask > 0).astype(np.uint8) * 255


def _tint(out: np.ndarray, mask: np.ndarray, offset: tuple[int, int]) -> None:
    """Blend the mask's pixels half-way to red, in place: (v + red) // 2, which is what
    (0.5 * v + 0.5 * red).astype(uint8) gives, in integers and only within the mask's bounding box
    (a defect is a few thousand of a 5 MP frame's pixels)."""
    ox, oy = offset
    h, w = mask.shape[:2]
    view = out[oy : oy + h, ox : ox + w]
    m = mask[: view.shape[0], : view.shape[1]]
    if m.dtype != np.uint8 or m.ndim != 2:
        m = (m != 0).view(np.uint8) if m.ndim == 2 else (m != 0).any(axis=2).view(np.uint8)
    x, y, bw, bh = cv2.boundingRect(m)
    if bw == 0 or bh == 0:
        return
    box, sel = view[y : y + bh, x : x + bw], m[y : y + bh, x : x + bw] != 0
    box[sel] = (box[sel].astype(np.uint16) + np.array([0, 0, 255], np.uint16)) >> 1


@dataclass(frozen=True)
class MaskCrop:
    """A mask kept as the bounding box of its set pixels: a queued 5 MP fail holds its defect's few
    kilobytes instead of a 5 MB mostly-zero array; `full()` rebuilds the mask when it is written."""

    shape: tuple[int, ...]
    x: int
    y: int
    box: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> MaskCrop:
        m = mask if mask.ndim == 2 else np.any(mask != 0, axis=2)
        if m.dtype != np.uint8:
            m = np.ascontiguousarray(m != 0).view(np.uint8)
        x, y, w, h = cv2.boundingRect(m)
        return cls(m.shape, x, y, m[y : y + h, x : x + w].copy())

    def full(self, box: np.ndarray | None = None) -> np.ndarray:
        """The whole mask; `box` (same shape as `self.box`) replaces the kept values, e.g. a 0/255 version."""
        out = np.zeros(self.shape[:2], np.uint8)
        h, w = self.box.shape[:2]
        out[self.y : self.y + h, self.x : self.x + w] = self.box if box is None else box
        return out


class EvidenceStore:
    """Writes evidence files and deletes the oldest beyond `quota_bytes`. Thread-safe."""

    def __init__(self, root: str | Path, quota_bytes: int, fmt: str = default_of(EvidenceConfig, "format"),
                 save_fail: bool = default_of(EvidenceConfig, "save_fail"),
                 save_error: bool = default_of(EvidenceConfig, "save_error"),
                 pass_sample_every: int = default_of(EvidenceConfig, "pass_sample_every"),
                 overlay_max_side: int = default_of(EvidenceConfig, "overlay_max_side")) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = int(quota_bytes)
        self.ext = "." + fmt
        self.save_fail, self.save_error, self.pass_sample_every = save_fail, save_error, pass_sample_every
        self.overlay_max_side = overlay_max_side
        self._lock = threading.Lock()
        self._passes = 0
        self._files: deque[tuple[Path, int]] = deque()  # oldest first
        self._total = 0
        self.saved = 0
        self.deleted = 0
        self.failed = 0
        self._scan()

    def _scan(self) -> None:
        """Pick up what earlier runs left so the quota holds across restarts."""
        found: list[tuple[float, Path, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                found.append((st.st_mtime, p, st.st_size))
        found.sort()
        self._files = deque((p, size) for _, p, size in found)
        self._total = sum(size for _, _, size in found)
        self._enforce_quota()

    @property
    def used_bytes(self) -> int:
        return self._total

    def wanted(self, verdict: str) -> bool:
        """Whether this verdict's part should be kept (all fails and errors, every Nth pass)."""
        if verdict == "fail":
            return self.save_fail
        if verdict == "error":
            return self.save_error
        if self.pass_sample_every <= 0:
            return False
        with self._lock:
            self._passes += 1
            return self._passes % self.pass_sample_every == 0

    def save(self, event_id: str, capture_ts: float, image: np.ndarray | None, mask: np.ndarray | MaskCrop | None,
             regions: Sequence[Region], verdict: str, roi_offset: tuple[int, int] = (0, 0)) -> str | None:
        """Write the files; returns the relative prefix for the event, or None if nothing was written.

        Each file's image is made just before it is encoded and dropped after, so a 5 MP fail holds
        one of them at a time (the 15 MB BGR overlay, or the 5 MB mask), not all at once; the overlay
        is tinted from the mask's box (`MaskCrop`, which the background writer already holds).
        """
        if image is None:
            return None
        day = _day(capture_ts)
        prefix = f"{day}/{event_id}"
        crop = mask if mask is None or isinstance(mask, MaskCrop) else MaskCrop.of(mask)
        items: list[tuple[str, Callable[[], np.ndarray]]] = [(f"frame{self.ext}", lambda: image)]
        if verdict != "error":
            items.append((f"overlay{self.ext}", lambda: shrunk_overlay(image, crop, regions, verdict, roi_offset,
                                                                          self.overlay_max_side)))
        if crop is not None and crop.box.any():
            items.append(("mask.png", lambda: crop.full(_mask255(crop.box))))
        try:
            (self.root / day).mkdir(parents=True, exist_ok=True)
            for suffix, make in items:
                self._write(self.root / f"{prefix}.{suffix}", make())
        except (OSError, cv2.error) as e:
            self.failed += 1
            log.error("evidence for %s not saved: %s", event_id, e)
            return None
        with self._lock:
            self.saved += 1
            self._enforce_quota()
        return prefix

    def _write(self, path: Path, img: np.ndarray) -> None:
        """Encode straight into a temporary file, then rename: OpenCV streams the rows to the file
        without the GIL and without an encoded copy in memory (up to 15 MB for a 5 MP overlay), and
        a half-written file is never left under the final name."""
        tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # imwrite picks the format by the suffix
        try:
            if not cv2.imwrite(str(tmp), img):
                raise OSError(f"cannot encode or write {path.name}")
            size = tmp.stat().st_size
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._lock:
            self._files.append((path, size))
            self._total += size

    def _enforce_quota(self) -> None:
        while self._total > self.quota_bytes and self._files:
            path, size = self._files.popleft()
            self._total -= size
            try:
                path.unlink()
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot delete old evidence %s: %s", path, e)
            parent = path.parent
            if parent != self.root:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only succeeds once the day folder is empty


PENDING, THINNED = "pending", "thinned"


@dataclass
class _Item:
    event_id: str
    capture_ts: float
    image: np.ndarray
    mask: MaskCrop | None
    regions: Sequence[Region]
    verdict: str
    offset: tuple[int, int]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = int(self.image.nbytes) + (int(self.mask.box.nbytes) if self.mask is not None else 0)


class EvidenceWriter:
    """Encodes and writes evidence on its own thread; `offer` never waits for the disk.

    The queue is bounded in bytes (`max_bytes`, the arrays it holds). Thinning rule, applied when
    an item is offered:
    - below half the bound everything wanted is kept;
    - above half ("behind"), only every `keep_every`-th wanted part is kept, except the first
      `keep_first_bad` fails (or errors) after a pass, which are kept while they fit: they are the
      frames a person wants when a line turns bad (the CPU budget below still applies to them: its
      burst, refilled while parts pass, is what keeps a saturated line's first fails);
    - an item that does not fit the bound at all is thinned;
    - while the writer has spent more than `cpu_share` of one core (on average, with `cpu_burst_s`
      of CPU in hand) and the line is saturated (the machine's CPUs are `busy_share` busy, or
      `backlog()` says parts wait for the model: the station's frame path), everything is thinned
      until the budget refills, so the writer keeps to `cpu_share` of a core. A slow line's idle
      cores encode every fail, a saturated line's cores go to verdicts.
    The CPU share alone misses a saturated station: the bare 5 MP model kept 2 cores only ~82 %
    busy (its tiles are fed from Python), so the writer's "idle" CPU was taken in the gaps between
    tiles; and keeping every Nth part (and every isolated fail as a "first fail") on top of the
    budget still took 15-30 % of a core. Both cost 10-16 % of the throughput at 100 % fails
    (encoding runs under SCHED_IDLE, but a thread that holds the GIL while descheduled still
    stalls the others).
    Thinned parts are counted (`thinned`), and the `evidence_thinned` alarm is raised when
    thinning goes on for `alarm_after_s` and cleared after as long without any.
    A crash loses what is still queued: events say `pending`, never that a file exists.
    """

    def __init__(self, store: EvidenceStore, max_bytes: int,
                 keep_every: int = default_of(EvidenceConfig, "keep_every_when_behind"),
                 keep_first_bad: int = default_of(EvidenceConfig, "keep_first_bad"),
                 alarm_after_s: float = default_of(EvidenceConfig, "thinning_alarm_s"),
                 on_alarm: Callable[[str, bool, str], None] | None = None,
                 cpu_share: float | None = None, cpu_burst_s: float = 1.0, busy_share: float = 0.9,
                 cpu: CpuBusy | None = None, backlog: Callable[[], bool] | None = None) -> None:
        """`cpu_share` None: no CPU budget (the daemon passes evidence.cpu_share)."""
        if max_bytes <= 0 or keep_every < 1:
            raise ValueError("max_bytes must be > 0 and keep_every >= 1")
        if cpu_share is not None and cpu_share <= 0:
            raise ValueError("cpu_share must be > 0 (None = no CPU budget)")
        self.cpu_share, self.cpu_burst_s, self.busy_share = cpu_share, cpu_burst_s, busy_share
        self.backlog = backlog  # parts waiting for the model (FrameFlow sets it): the line is saturated
        self._cpu = cpu or CpuBusy()
        self._cpu_debt = 0.0  # CPU seconds spent beyond the budget's refill (a leaky bucket)
        self._debt_t = time.monotonic()
        self.cpu_s = 0.0  # CPU seconds the writer spent encoding and writing
        self.store, self.max_bytes, self.keep_every = store, int(max_bytes), int(keep_every)
        self.keep_first_bad, self.alarm_after_s, self._on_alarm = keep_first_bad, alarm_after_s, on_alarm
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.queued_bytes = 0
        self.thinned = self.written = 0
        self._behind_seen = 0
        self._bad_run = 0  # fails/errors since the last pass (offer runs on the result thread only)
        self._thin_since: float | None = None  # start of the current thinning spell
        self._last_thin = 0.0
        self._alarmed = False
        self._thread = threading.Thread(target=self._run, name="evidence", daemon=True)
        self._thread.start()

    def wanted(self, verdict: str) -> bool:
        return self.store.wanted(verdict)

    def offer(self, event_id: str, capture_ts: float, image: np.ndarray | None, mask: np.ndarray | None,
              regions: Sequence[Region], verdict: str, roi_offset: tuple[int, int] = (0, 0)) -> tuple[str | None, str | None]:
        """(prefix, status) for the event: (prefix, "pending"), (None, "thinned"), or (None, None) when
        this part keeps no evidence. The frame is kept as it is (callers must not modify it), the
        mask as the crop of its set pixels (MaskCrop)."""
        self._bad_run = 0 if verdict == "pass" else self._bad_run + 1
        first_bad = 0 < self._bad_run <= self.keep_first_bad
        if image is None or not self.store.wanted(verdict):
            return None, None
        item = _Item(event_id, capture_ts, image, None if mask is None else MaskCrop.of(mask), regions, verdict,
                     roi_offset)
        with self._lock:
            used = self.queued_bytes
            fits = used + item.nbytes <= self.max_bytes
            if fits and self._over_cpu_budget():  # a saturated line: not one more encode beyond the budget
                fits = False
            elif fits and not first_bad and used + item.nbytes > self.max_bytes // 2:  # behind on the disk
                self._behind_seen += 1
                fits = self._behind_seen % self.keep_every == 0
            if fits:
                self.queued_bytes += item.nbytes
        if not fits:
            self._thin()
            return None, THINNED
        self._q.put(item)
        return f"{_day(capture_ts)}/{event_id}", PENDING

    def _over_cpu_budget(self) -> bool:
        """Over its CPU budget while the CPUs are saturated (call with the lock held)."""
        if self.cpu_share is None:
            return False
        now = time.monotonic()
        self._cpu_debt = max(0.0, self._cpu_debt - self.cpu_share * (now - self._debt_t))
        self._debt_t = now
        if self._cpu_debt <= self.cpu_burst_s:
            return False
        return (self.backlog is not None and self.backlog()) or self._cpu.share() >= self.busy_share

    def _thin(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.thinned += 1
            if self._thin_since is None or now - self._last_thin > self.alarm_after_s:
                self._thin_since = now
            self._last_thin = now
            raise_it = not self._alarmed and now - self._thin_since >= self.alarm_after_s
            self._alarmed = self._alarmed or raise_it
        if raise_it:
            self._alarm(True, f"evidence thinned for {now - self._thin_since:.0f} s: the writer cannot keep up "
                              f"({self.thinned} parts without evidence so far)")

    def tick(self) -> None:
        """Clear the alarm once thinning has stopped for `alarm_after_s` (called from the main loop)."""
        with self._lock:
            clear = self._alarmed and time.monotonic() - self._last_thin > self.alarm_after_s
            self._alarmed = self._alarmed and not clear
        if clear:
            self._alarm(False, "evidence is written in full again")

    def _alarm(self, active: bool, message: str) -> None:
        if active:
            log.warning("%s", message)
        if self._on_alarm is not None:
            self._on_alarm(EVIDENCE_THINNED, active, message)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"queued_bytes": self.queued_bytes, "written": self.written, "thinned": self.thinned,
                    "cpu_ms": round(self.cpu_s * 1000),
                    "failed": self.store.failed, "disk_bytes": self.store.used_bytes}

    def _run(self) -> None:
        _lowest_priority()
        while True:
            item = self._q.get()
            if item is None:
                return
            t_cpu = time.thread_time()
            try:
                ref = self.store.save(item.event_id, item.capture_ts, item.image, item.mask, item.regions,
                                      item.verdict, item.offset)
            except Exception:  # never let one bad frame stop the writer
                log.exception("evidence for %s not saved", item.event_id)
                ref = None
            spent = time.thread_time() - t_cpu
            with self._lock:
                self.queued_bytes -= item.nbytes
                self.written += ref is not None
                self.cpu_s += spent
                self._cpu_debt += spent

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then stop the thread."""
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("evidence writer still busy after %.1f s at shutdown; %d bytes of evidence not written",
                      timeout, self.queued_bytes)


def _lowest_priority() -> None:
    """Run the calling thread under SCHED_IDLE, and at nice 19 where that policy is refused (Linux: a
    thread's policy and nice value are its own).

    Encoding a 5 MP fail's frame, overlay and mask costs ~0.5 s of CPU; at normal priority the
    writer takes a core from inference exactly when a line turns bad. Nice 19 still gets ~1.5 % of a
    contended core and keeps it until the scheduler's next tick when an inference thread wakes; a
    SCHED_IDLE thread is preempted at once by any waking normal thread, so it only runs on CPU the
    verdict path leaves idle. When that is not enough the queue fills and evidence is thinned by rule
    instead of slowing verdicts."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)


def _day(capture_ts: float) -> str:
    return dt.datetime.fromtimestamp(capture_ts, dt.timezone.utc).strftime("%Y-%m-%d")
