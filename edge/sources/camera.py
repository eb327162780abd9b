"""Live cameras and video files through OpenCV VideoCapture (index, device, file, RTSP/HTTP, GStreamer).

`cap.read()` can block for a long time (a dead RTSP stream, an unplugged USB camera), so a
grabber thread owns the capture and `read()` only waits on it with a timeout. The grabber
reconnects with exponential backoff; `read()` runs the stall watchdog: when no frame came for
`stall_timeout_s` it returns an error Frame (kind camera_lost), again every stall period while
it lasts, so a dead camera produces `error` verdicts and an alarm instead of silence.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edge.alarms import CAMERA_LOST
from edge.config import CameraSourceConfig, VideoSourceConfig
from edge.redact import redact_uri
from edge.sources.base import Frame, SourceError, error_frame, now_part_id

log = logging.getLogger(__name__)

_BACKENDS = {"any": cv2.CAP_ANY, "ffmpeg": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER, "v4l2": cv2.CAP_V4L2}


class CameraSource:
    """Camera or video file; live camera frames replace each other (latest wins, overwrites counted)."""

    def __init__(self, cfg: CameraSourceConfig | VideoSourceConfig) -> None:
        self.cfg = cfg
        self.is_file = isinstance(cfg, VideoSourceConfig)
        # The name goes into logs, events, status and health: never with the URI's password.
        self.name = f"video:{cfg.path.name}" if isinstance(cfg, VideoSourceConfig) else f"camera:{redact_uri(str(cfg.uri))}"
        self.overwritten = 0  # live frames replaced before the pipeline took them
        self.reconnects = 0
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._stop = threading.Event()
        self._ended = False  # non-looping video reached its end
        self._thread: threading.Thread | None = None
        self._last_good = time.monotonic()  # last frame or last stall report (watchdog reference)
        self._counter = 0
        self._last_error = "not opened yet"
        self._first_attempt = threading.Event()
        self.connected = False

    # -- FrameSource ----------------------------------------------------------------------------
    def open(self) -> None:
        """Start the grabber and wait for its first connection attempt.

        A missing camera is not fatal: it may come back, and a daemon that stays up can report
        it (error verdicts, camera_lost alarm) while one that exits only restarts in a loop.
        A missing video file is a configuration error.
        """
        if isinstance(self.cfg, VideoSourceConfig) and not self.cfg.path.is_file():
            raise SourceError(f"source.path: video file {self.cfg.path} does not exist")
        self._last_good = time.monotonic()
        self._thread = threading.Thread(target=self._grab_loop, name="camera-grabber", daemon=True)
        self._thread.start()
        if not self._first_attempt.wait(self.cfg.open_timeout_s + 1.0) or not self.connected:
            log.warning("%s not available at start (%s); inspecting will report camera_lost until it is",
                        self.name, self._last_error)

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._frame is None:
                now = time.monotonic()
                stalled_for = now - self._last_good
                if stalled_for >= self.cfg.stall_timeout_s and not self.exhausted:
                    self._last_good = now  # next report one stall period later
                    self._counter += 1
                    ts = time.time()
                    reason = "video ended" if self._ended else self._last_error
                    return error_frame(now_part_id("lost", ts, self._counter), ts, CAMERA_LOST,
                                       f"no frame for {stalled_for:.1f} s from {self.name} ({reason})")
                if now >= deadline or self._stop.is_set():
                    return None
                self._cond.wait(min(deadline, self._last_good + self.cfg.stall_timeout_s) - now)
            frame, self._frame = self._frame, None
            self._last_good = time.monotonic()
            self._cond.notify_all()  # a file grabber waits for the slot to be free
            return frame

    def commit(self, frame: Frame, ok: bool) -> None:
        """Nothing to do: a camera frame has no file to move."""

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # a read stuck inside OpenCV is abandoned (daemon thread)

    @property
    def exhausted(self) -> bool:
        return self._ended and isinstance(self.cfg, VideoSourceConfig) and self.cfg.stop_at_end and self._frame is None

    # -- grabber thread ----------------------------------------------------------------------------
    def _open_capture(self) -> cv2.VideoCapture | None:
        cfg = self.cfg
        target: int | str
        if isinstance(cfg, VideoSourceConfig):
            target, api = str(cfg.path), cv2.CAP_ANY
        else:
            uri = cfg.uri
            target = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
            api = _BACKENDS[cfg.backend]
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.read_timeout_s * 1000)]
        try:
            cap = cv2.VideoCapture(target, api, params)
        except cv2.error as e:
            self._last_error = f"open failed: {redact_uri(str(e))}"  # OpenCV echoes the URL
            return None
        if not cap.isOpened():
            cap.release()
            self._last_error = "cannot open"
            return None
        if isinstance(cfg, CameraSourceConfig):
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, cfg.width), (cv2.CAP_PROP_FRAME_HEIGHT, cfg.height),
                                (cv2.CAP_PROP_FPS, cfg.fps)):
                if value is not None:
                    cap.set(prop, float(value))
        return cap

    def _grab_loop(self) -> None:
        delay = self.cfg.reconnect_min_s
        first, last_warning = True, 0.0
        while not self._stop.is_set():
            cap = self._open_capture()
            self.connected = cap is not None
            self._first_attempt.set()
            if cap is None:
                # First failure and then once a minute: a camera unplugged overnight must not flood the journal.
                loud = first or time.monotonic() - last_warning >= 60.0
                log.log(logging.WARNING if loud else logging.DEBUG, "%s: %s; retrying in %.1f s",
                        self.name, self._last_error, delay)
                last_warning = time.monotonic() if loud else last_warning
                first = False
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.cfg.reconnect_max_s)
                self.reconnects += 1
                continue
            log.info("%s opened", self.name)
            try:
                delivered = self._pump(cap)
            finally:
                cap.release()
                self.connected = False
            if self._ended:
                log.warning("%s: end of video", self.name)
                with self._cond:
                    self._cond.notify_all()
                return
            # A stream that opens and then fails at once must not turn into a busy reconnect loop.
            delay, first = (self.cfg.reconnect_min_s, True) if delivered else (delay, False)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.cfg.reconnect_max_s)
            self.reconnects += 1

    def _pump(self, cap: cv2.VideoCapture) -> int:
        """Read until the stream fails; hand frames over (files: wait for the slot, cameras: overwrite).

        Returns the number of frames delivered, so the caller knows whether to back off.
        """
        fps = cap.get(cv2.CAP_PROP_FPS) if self.is_file else 0.0
        pace = 1.0 / fps if isinstance(self.cfg, VideoSourceConfig) and self.cfg.realtime and fps > 0 else 0.0
        next_due = time.monotonic()
        index = delivered = 0
        clock = _StreamClock()
        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok or image is None:
                if isinstance(self.cfg, VideoSourceConfig):
                    if self.cfg.loop and index > 0:
                        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        index = 0
                        continue
                    self._ended = True
                    return delivered
                self._last_error = "read failed"
                log.warning("%s: read failed, reconnecting", self.name)
                return delivered
            if pace:
                next_due += pace
                if self._stop.wait(max(0.0, next_due - time.monotonic())):
                    break
            index += 1
            delivered += 1
            age = 0.0 if self.is_file else clock.age(time.monotonic(), cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
            self._deliver(np.asarray(image), index, age)
        return delivered

    def _deliver(self, image: np.ndarray, index: int, age: float | None = 0.0) -> None:
        """Hand a frame over, stamped with its estimated production time (age: see _StreamClock)."""
        with self._cond:
            if self.is_file:  # every frame of a file counts (benchmarks, replays): wait for the slot
                while self._frame is not None and not self._stop.is_set():
                    self._cond.wait(0.5)
            elif self._frame is not None:
                self.overwritten += 1
            older = age or 0.0  # a frame from a backlog was taken before read() returned it
            ts = time.time() - older
            self._counter += 1
            prefix = Path(self.cfg.path).stem if isinstance(self.cfg, VideoSourceConfig) else "cam"
            # A file frame is not perishable (unless paced like a camera): never dropped, never stale.
            live = not self.is_file or bool(getattr(self.cfg, "realtime", False))
            self._frame = Frame(part_id=now_part_id(prefix, ts, self._counter), capture_ts=ts, image=image,
                                mono_ts=time.monotonic() - older, live=live,
                                meta={"frame_index": index, **({"buffered": True} if age is None else {})})
            self._cond.notify_all()


class _StreamClock:
    """How long ago a live frame was produced, from the stream's own time stamps.

    OpenCV stamps nothing: a frame's time is when read() returned it. Measured on an MPEG-TS
    stream: at open FFmpeg hands over what it buffered while probing (~0.75 s of frames in one
    burst), and a reader that fell behind drains its socket the same way. So (grab time - stream
    time) is tracked; its running minimum is the freshest delivery seen, and a frame's excess over
    it is how much older it is than its grab time. Frames of the burst after an open (they come
    faster than their stream time advances) have no usable estimate: None, the gate never gives
    them to a trigger. The minimum may rise by SLACK s/s, as the camera's clock may be slower than
    ours. Streams without time stamps report no interval and are taken as fresh (age 0).
    """

    SLACK = 0.001
    JUMP_S = 5.0  # a larger step of the stream time is a new stream (camera restart, wrap-around)

    def __init__(self) -> None:
        self._prev: tuple[float, float] | None = None  # (monotonic, stream seconds) of the previous frame
        self._offset: float | None = None
        self._caught_up = False

    def age(self, now: float, stream_s: float) -> float | None:
        prev, self._prev = self._prev, (now, stream_s)
        if prev is None:
            return None
        dt, interval = now - prev[0], stream_s - prev[1]
        if interval <= 0:
            return 0.0
        if interval > self.JUMP_S:
            self._offset, self._caught_up = None, False
            return None
        if not self._caught_up:
            if dt < interval / 2:
                return None  # still draining what was buffered at open
            self._caught_up = True
        off = now - stream_s
        self._offset = off if self._offset is None else min(off, self._offset + self.SLACK * dt)
        return off - self._offset
