"""Hot folder: each complete image file is one part; the file leaves the folder only after its
result is durable in the outbox.

"Complete" means: not a dotfile or *.tmp/*.part, size and mtime unchanged across two polls, and
not modified for `settle_s`. Writers should still write to a temporary name and rename.
The part id is the file stem and the capture time is the file's mtime, so re-inspecting a
file after a crash gives the same event id and the outbox drops the duplicate.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from edge.config import FolderSourceConfig
from edge.sources.base import Frame, SourceError

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
UNREADABLE = "unreadable"
_BYTES_PER_PIXEL_MAX = 8  # 16-bit BGRA, uncompressed: a bigger file cannot be within max_pixels
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP, TIFF or PNM file; None if unknown.

    Reads only the header, so an image's memory cost is known before it is decoded.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 <= len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                if marker in _JPEG_SOF:
                    return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
                i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
            return None
        if data[:2] == b"BM" and len(data) >= 26:
            if int.from_bytes(data[14:18], "little") == 12:  # OS/2 header: 16-bit sizes
                return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
            return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                    abs(int.from_bytes(data[22:26], "little", signed=True)))
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
            ifd = int.from_bytes(data[4:8], order)
            n = int.from_bytes(data[ifd : ifd + 2], order)
            dims: dict[int, int] = {}
            for k in range(n):
                e = ifd + 2 + 12 * k
                tag, kind = int.from_bytes(data[e : e + 2], order), int.from_bytes(data[e + 2 : e + 4], order)
                if tag in (256, 257):
                    size = 2 if kind == 3 else 4
                    dims[tag] = int.from_bytes(data[e + 8 : e + 8 + size], order)
            return (dims[256], dims[257]) if len(dims) == 2 else None
        if data[:1] == b"P" and data[1:2] in b"123456":
            tokens: list[bytes] = []
            for line in data[:1024].split(b"\n"):
                tokens += line.split(b"#", 1)[0].split()
                if len(tokens) >= 3:
                    return int(tokens[1]), int(tokens[2])
    except (IndexError, ValueError):
        return None
    return None


class FolderSource:
    """Polls one folder (top level only); thread-safe between the capture and the result thread."""

    def __init__(self, cfg: FolderSourceConfig) -> None:
        self.cfg = cfg
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

    def _wanted(self, name: str) -> bool:
        low = name.lower()
        return not name.startswith(".") and not low.endswith(IGNORED_SUFFIXES) and low.endswith(self._exts)

    def _poll(self) -> None:
        now = time.time()
        seen: dict[str, tuple[int, int]] = {}
        ready: list[tuple[float, str]] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError as e:
            log.error("cannot list %s: %s", self.root, e)
            return
        for entry in entries:
            if not self._wanted(entry.name):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue  # removed between listing and stat
            key = (st.st_size, st.st_mtime_ns)
            seen[entry.name] = key
            if entry.name in self._inflight or entry.name in self._unmovable:
                continue
            stable = self._last_seen.get(entry.name) == key and now - st.st_mtime_ns / 1e9 >= self.cfg.settle_s
            if stable:
                ready.append((st.st_mtime_ns if self.cfg.order == "mtime" else 0, entry.name))
        ready.sort()
        self._last_seen = seen
        self._ready = [name for _, name in ready]
        self._polled = True

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._ready and time.monotonic() >= self._next_poll:
                    self._next_poll = time.monotonic() + self.cfg.poll_interval_s
                    self._poll()
                name = self._ready.pop(0) if self._ready else None
                if name is not None:
                    self._inflight.add(name)
                wait = min(self._next_poll, deadline) - time.monotonic()
            if name is not None:
                frame = self._load(name)
                if frame is not None:
                    return frame
                continue
            if time.monotonic() >= deadline:
                return None
            time.sleep(max(0.0, min(wait, 0.05)))

    def _load(self, name: str) -> Frame | None:
        """Decode the file; None when it vanished meanwhile (someone took it back: not a part)."""
        path = self.root / name
        part_id = path.stem
        limit = self.cfg.max_pixels
        try:
            st = path.stat()
            if st.st_size > limit * _BYTES_PER_PIXEL_MAX + (1 << 20):
                return self._error_frame(name, part_id, st.st_mtime_ns / 1e9, f"{name} is too large to be an image "
                                         f"of at most source.max_pixels={limit} pixels ({st.st_size} bytes)")
            data = np.fromfile(str(path), dtype=np.uint8)
        except FileNotFoundError:
            with self._lock:
                self._inflight.discard(name)
            return None
        except OSError as e:
            return self._error_frame(name, part_id, time.time(), f"cannot read {name}: {e}")
        capture_ts = st.st_mtime_ns / 1e9
        size = image_size(data[: 1 << 20].tobytes())  # JPEG metadata segments may come before the size
        if size is not None and size[0] * size[1] > limit:
            return self._error_frame(name, part_id, capture_ts, f"{name} is {size[0]}x{size[1]} = "
                                     f"{size[0] * size[1]} pixels > source.max_pixels={limit}; not decoded")
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if image is None:
            return self._error_frame(name, part_id, capture_ts, f"{name} is not a readable image ({data.size} bytes)")
        if image.shape[0] * image.shape[1] > limit:  # a format whose header was not read above
            h, w = image.shape[:2]
            return self._error_frame(name, part_id, capture_ts, f"{name} is {w}x{h} = {w * h} pixels > "
                                     f"source.max_pixels={limit}")
        return Frame(part_id=part_id, capture_ts=capture_ts, image=image, live=False, meta={"file": name})

    @staticmethod
    def _error_frame(name: str, part_id: str, ts: float, message: str) -> Frame:
        return Frame(part_id=part_id, capture_ts=ts, image=None, error=message, error_kind=UNREADABLE,
                     live=False, meta={"file": name})

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
            log.error("cannot move %s to %s: %s; the file stays and is skipped until restart", src, dest_dir, e)
            with self._lock:
                self._unmovable.add(name)
        with self._lock:
            self._inflight.discard(name)

    def close(self) -> None:
        """Files not committed stay in the folder and are inspected again at the next start."""

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return (self.cfg.stop_when_empty and self._polled and not self._ready and not self._inflight
                    and not (set(self._last_seen) - self._unmovable))
