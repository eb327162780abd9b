"""Hot folder: each complete image file is one part; the file leaves the folder only after its
result is durable in the outbox.

"Complete" means: not a dotfile or *.tmp/*.part, size and mtime unchanged across two polls, and
not modified for `settle_s`. Writers should still write to a temporary name and rename.
The part id is the file stem and the capture time is the file's mtime, so re-inspecting a
file after a crash gives the same event id and the outbox drops the duplicate.

Hostile entries each end as one `error` part moved to failed/, never as a stopped daemon:
names that are not UTF-8 or hold control characters (escaped in events and logs, see
edge.text), anything that is not a regular file (a symlink is not followed: it could point
out of the folder, at a device or a FIFO that blocks forever; the link itself is moved), files
whose header announces more than max_pixels, frames that would not fit in the service's
memory (edge.memory), and anything the decoder raises. What kills the process outright is
counted and quarantined (edge.sources.crashes).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.config import FolderSourceConfig
from edge.contract import InputSpec
from edge.image_decode import ImageDecodeError, decode_image_bytes, image_size
from edge.memory import MiB, inspection_bytes, read_budget, refusal
from edge.rules import NO_MEMORY, NOT_A_FILE, QUARANTINED, UNREADABLE
from edge.sources.base import Frame, SourceError, error_frame
from edge.sources.crashes import CrashLedger
from edge.text import safe_part_id, safe_text

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
# TEST HOOK ONLY: a file whose name contains this text SIGKILLs the daemon when it is loaded,
# standing in for a decoder segfault or an OOM kill (tests/faults/test_hostile_inputs.py).
TEST_HOOK_KILL_ENV = "EDGE_TEST_HOOK_SIGKILL_ON_FILE"
# TEST HOOK ONLY: ...and one that never returns, standing in for a decoder that hangs or a read
# from a share that stopped answering (tests/faults/test_crash_loops.py: the watchdog must starve).
TEST_HOOK_HANG_ENV = "EDGE_TEST_HOOK_HANG_ON_FILE"
_DECODED_BPP_GUESS = 3.0  # bytes per pixel assumed before decoding (8-bit BGR, the common case)
_BYTES_PER_PIXEL_MAX = 8  # 16-bit BGRA, uncompressed: a bigger file cannot be within max_pixels


class FolderSource:
    """Polls one folder (top level only); thread-safe between the capture and the result thread."""

    def __init__(self, cfg: FolderSourceConfig, state_dir: Path | None = None,
                 model_spec: Callable[[], InputSpec] | None = None, cgroup_root: Path | None = None) -> None:
        """`state_dir` enables the crash counter; `model_spec` (the current model's input) sizes the
        memory estimate; `cgroup_root` overrides where the cgroup memory limit is read (tests)."""
        self.cfg = cfg
        self._ledger = CrashLedger(state_dir) if state_dir is not None else None
        self._model_spec = model_spec or InputSpec
        self._cgroup_root = cgroup_root
        self._kill_on = os.environ.get(TEST_HOOK_KILL_ENV) or None
        self._hang_on = os.environ.get(TEST_HOOK_HANG_ENV) or None
        self.name = f"folder:{cfg.path}"
        self.root = Path(cfg.path)
        self.done_dir = Path(cfg.done_dir) if cfg.done_dir else self.root / "done"
        self.failed_dir = Path(cfg.failed_dir) if cfg.failed_dir else self.root / "failed"
        self._exts = tuple(e.lower() for e in cfg.extensions)
        self._lock = threading.Lock()
        self._last_seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at the previous poll
        self._ready: list[str] = []
        self._inflight: set[str] = set()  # handed out, result not yet committed
        self._unmovable: set[str] = set()  # commit failed: skip until restart instead of looping
        self._next_poll = 0.0
        self._polled = False

    def open(self) -> None:
        if not self.root.is_dir():
            raise SourceError(f"source.path: {self.root} is not a folder")
        for d in (self.done_dir, self.failed_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SourceError(f"cannot create {d}: {e}") from e
        if not os.access(self.root, os.W_OK):
            raise SourceError(f"source.path: {self.root} is not writable (files are moved out after inspection)")
        if self._ledger is not None:
            try:
                self._ledger.open(present=set(os.listdir(self.root)))
            except OSError as e:
                raise SourceError(f"cannot use the crash counter in {self._ledger.records}: {e}") from e

    def _wanted(self, name: str) -> bool:
        low = name.lower()
        return not name.startswith(".") and not low.endswith(IGNORED_SUFFIXES) and low.endswith(self._exts)

    def _poll(self) -> None:
        now = time.time()
        seen: dict[str, tuple[int, int]] = {}
        ready: list[tuple[bool, float, str]] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError as e:
            log.error("cannot list %s: %s", self.root, e)
            return
        for entry in entries:
            if not self._wanted(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)  # not only files: a link or `x.png/` gets an error part
            except OSError:
                continue  # removed between listing and stat
            key = (st.st_size, st.st_mtime_ns)
            seen[entry.name] = key
            if entry.name in self._inflight or entry.name in self._unmovable:
                continue
            stable = self._last_seen.get(entry.name) == key and now - st.st_mtime_ns / 1e9 >= self.cfg.settle_s
            if stable:
                ready.append((not self._suspect(entry.name), st.st_mtime_ns if self.cfg.order == "mtime" else 0,
                              entry.name))
        ready.sort()  # files that were in flight at a crash first, one at a time (see _take)
        self._last_seen = seen
        self._ready = [name for _, _, name in ready]
        self._polled = True

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._ready and time.monotonic() >= self._next_poll:
                    self._next_poll = time.monotonic() + self.cfg.poll_interval_s
                    self._poll()
                name = self._take()
                quarantine = name is not None and self._suspect(name) >= self.cfg.quarantine_after_crashes
                wait = min(self._next_poll, deadline) - time.monotonic()
            if name is not None:
                frame = self._quarantine(name) if quarantine else self._load(name)
                if frame is not None:
                    return frame
                continue
            if time.monotonic() >= deadline:
                return None
            time.sleep(max(0.0, min(wait, 0.05)))

    def _suspect(self, name: str) -> int:
        return self._ledger.count(name) if self._ledger is not None else 0

    def _take(self) -> str | None:
        """Next ready file (under the lock), recorded as in flight before it is read. A file that was
        in flight at a crash goes alone: nothing else is handed out with it, so a second crash blames it only."""
        if not self._ready:
            return None
        if self._ledger is not None and self._inflight and (
                self._suspect(self._ready[0]) or any(self._suspect(n) for n in self._inflight)):
            return None
        name = self._ready.pop(0)
        self._inflight.add(name)
        if self._ledger is not None:
            self._ledger.handed_out(name)
        return name

    def _quarantine(self, name: str) -> Frame:
        try:
            ts = (self.root / name).lstat().st_mtime_ns / 1e9
        except OSError:
            ts = time.time()
        n, shown = self._suspect(name), safe_text(name)
        log.error("quarantining %s: it was being inspected when the daemon died %d times in a row", shown, n)
        return self._error_frame(name, ts, f"{shown} quarantined: it was being inspected when the daemon died "
                                 f"{n} times in a row (source.quarantine_after_crashes="
                                 f"{self.cfg.quarantine_after_crashes}); not inspected again", QUARANTINED)

    def _load(self, name: str) -> Frame | None:
        """Decode the file; None when it vanished meanwhile (someone took it back: not a part).

        Every other outcome is a Frame: an image, or an error Frame for this file alone."""
        path, shown = self.root / name, safe_text(name)
        try:
            st = path.lstat()
        except FileNotFoundError:
            self._vanished(name)
            return None
        except OSError as e:
            return self._error_frame(name, time.time(), f"cannot read {shown}: {safe_text(e)}")
        ts = st.st_mtime_ns / 1e9
        if not stat.S_ISREG(st.st_mode):
            return self._error_frame(name, ts, f"{shown} is {_file_kind(st.st_mode)}, not an image file; not read "
                                     "(links are not followed: they could lead out of the folder)", NOT_A_FILE)
        if self._kill_on is not None and self._kill_on in name:
            log.critical("TEST HOOK %s: killing the daemon while loading %s", TEST_HOOK_KILL_ENV, shown)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hang_on is not None and self._hang_on in name:
            log.critical("TEST HOOK %s: hanging while loading %s", TEST_HOOK_HANG_ENV, shown)
            threading.Event().wait()
        try:
            return self._decode(name, shown, ts)
        except FileNotFoundError:
            self._vanished(name)
            return None
        except Exception as e:  # a decoder that raises (cv2.error, MemoryError, ...) still gives one error part
            return self._error_frame(name, ts, f"cannot decode {shown}: {type(e).__name__}: {safe_text(e)}")

    def _decode(self, name: str, shown: str, ts: float) -> Frame:
        limit = self.cfg.max_pixels
        # O_NOFOLLOW/O_NONBLOCK: a file swapped for a link or a FIFO since lstat is neither followed nor waited on.
        fd = os.open(self.root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return self._error_frame(name, ts, f"{shown} is {_file_kind(st.st_mode)}, not an image file",
                                         NOT_A_FILE)
            if st.st_size > limit * _BYTES_PER_PIXEL_MAX + (1 << 20):
                return self._error_frame(name, ts, f"{shown} is too large to be an image of at most "
                                         f"source.max_pixels={limit} pixels ({st.st_size} bytes)")
            data = np.frombuffer(f.read(), dtype=np.uint8)
        size = image_size(data)
        if size is not None and size[0] * size[1] > limit:
            return self._error_frame(name, ts, f"{shown} is {size[0]}x{size[1]} = "
                                     f"{size[0] * size[1]} pixels > source.max_pixels={limit}; not decoded")
        if size is not None and (why := self._memory_refusal(*size, _DECODED_BPP_GUESS)) is not None:
            return self._error_frame(name, ts, f"{shown}: {why}; not decoded", NO_MEMORY)
        # Formats whose header is not read above: OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, edge/__init__.py).
        try:
            image = decode_image_bytes(data, header=False)  # its size was checked above, against max_pixels
        except ImageDecodeError as e:
            return self._error_frame(name, ts, f"{shown} is {e}")
        h, w = image.shape[:2]
        if h * w > limit:
            return self._error_frame(name, ts, f"{shown} is {w}x{h} = {w * h} pixels > source.max_pixels={limit}")
        if size is None and (why := self._memory_refusal(w, h, 0.0)) is not None:  # decoded already: the rest
            return self._error_frame(name, ts, f"{shown}: {why}; not inspected", NO_MEMORY)
        return Frame(part_id=safe_part_id(Path(name).stem), capture_ts=ts, image=image, live=False,
                     meta={"file": name})

    def _memory_refusal(self, width: int, height: int, decoded_bpp: float) -> str | None:
        cost = inspection_bytes(width, height, self._model_spec(), decoded_bpp)
        return refusal(width, height, cost, read_budget(self._cgroup_root), int(self.cfg.memory_reserve_mb * MiB))

    def _vanished(self, name: str) -> None:
        with self._lock:
            self._inflight.discard(name)
            if self._ledger is not None:
                self._ledger.committed(name)

    @staticmethod
    def _error_frame(name: str, ts: float, message: str, kind: str = UNREADABLE) -> Frame:
        """A file that cannot be inspected: its part id from the name, committed to failed/ later."""
        return error_frame(safe_part_id(Path(name).stem), ts, kind, message, live=False, meta={"file": name})

    def commit(self, frame: Frame, ok: bool) -> None:
        """Move the file out: done/ for pass/fail, failed/ for an `error` verdict (a person looks at it)."""
        name = frame.meta.get("file")
        if not name:
            return
        src = self.root / name
        dest_dir = self.done_dir if ok else self.failed_dir
        dest = dest_dir / name
        n = 1
        while dest.exists():  # the same file name again later: keep both
            dest = dest_dir / f"{Path(name).stem}.{n}{Path(name).suffix}"
            n += 1
        try:
            shutil.move(str(src), str(dest))
        except OSError as e:
            log.error("cannot move %s to %s: %s; the file stays and is skipped until restart", safe_text(name),
                      dest_dir, safe_text(e))
            with self._lock:
                self._unmovable.add(name)
        with self._lock:
            self._inflight.discard(name)
            if self._ledger is not None:
                self._ledger.committed(name)

    def close(self) -> None:
        """Files not committed stay in the folder and are inspected again at the next start."""

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return (self.cfg.stop_when_empty and self._polled and not self._ready and not self._inflight
                    and not (set(self._last_seen) - self._unmovable))


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"
