"""Evidence images (frame, overlay, mask) named by event id, kept within a disk quota.

An operator who sees a `fail` on the dashboard wants to see the part; a line PC's disk must
never fill up because of it. Files are grouped in one folder per UTC day and the oldest are
deleted first once the quota is exceeded. The event carries the relative prefix
(`2025-01-31/<event_id>`) so the files can be found from the event alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edge.contract import Region

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
    if mask is not None and mask.any():
        ox, oy = offset
        h, w = mask.shape[:2]
        view = out[oy : oy + h, ox : ox + w]
        sel = mask[: view.shape[0], : view.shape[1]].astype(bool)
        view[sel] = (0.5 * view[sel] + 0.5 * np.array([0, 0, 255])).astype(np.uint8)
    color = _COLORS.get(verdict, (255, 255, 255))
    for r in regions:
        x, y, w, h = r.bbox
        cv2.rectangle(out, (x - 2, y - 2), (x + w + 1, y + h + 1), color, 1)
    scale = max(0.4, min(out.shape[:2]) / 400)
    cv2.putText(out, verdict.upper(), (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, color,
                max(1, int(2 * scale)), cv2.LINE_AA)
    return out


class EvidenceStore:
    """Writes evidence files and deletes the oldest beyond `quota_bytes`. Thread-safe."""

    def __init__(self, root: str | Path, quota_bytes: int, fmt: str = "png", save_fail: bool = True,
                 save_error: bool = True, pass_sample_every: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = int(quota_bytes)
        self.ext = "." + fmt
        self.save_fail, self.save_error, self.pass_sample_every = save_fail, save_error, pass_sample_every
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

    def save(self, event_id: str, capture_ts: float, image: np.ndarray | None, mask: np.ndarray | None,
             regions: Sequence[Region], verdict: str, roi_offset: tuple[int, int] = (0, 0)) -> str | None:
        """Write the files; returns the relative prefix for the event, or None if nothing was written."""
        if image is None:
            return None
        day = dt.datetime.fromtimestamp(capture_ts, dt.timezone.utc).strftime("%Y-%m-%d")
        prefix = f"{day}/{event_id}"
        items: list[tuple[str, np.ndarray]] = [(f"frame{self.ext}", image)]
        if verdict != "error":
            items.append((f"overlay{self.ext}", draw_overlay(image, mask, regions, verdict, roi_offset)))
        if mask is not None and mask.any():
            items.append(("mask.png", (mask > 0).astype(np.uint8) * 255))
        try:
            (self.root / day).mkdir(parents=True, exist_ok=True)
            for suffix, img in items:
                self._write(self.root / f"{prefix}.{suffix}", img)
        except (OSError, cv2.error) as e:
            self.failed += 1
            log.error("evidence for %s not saved: %s", event_id, e)
            return None
        with self._lock:
            self.saved += 1
            self._enforce_quota()
        return prefix

    def _write(self, path: Path, img: np.ndarray) -> None:
        ok, buf = cv2.imencode(path.suffix, img)
        if not ok:
            raise OSError(f"cannot encode {path.name}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.tobytes())
        tmp.replace(path)  # a half-written file is never left under the final name
        size = len(buf)
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
