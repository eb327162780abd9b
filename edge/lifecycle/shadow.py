"""Shadow runs: a second package (`model.shadow`) judges the same parts as the live model, on its
own thread and compiled model, but never decides anything.

- Every Nth part (`model.shadow_every_nth`) with a live verdict other than `error` is offered; the
  offer never waits. The runner keeps its duty cycle under `model.shadow_cpu_share` (after an
  inference of t s it rests t x (1/share - 1) s), and parts offered while its small queue is full
  are skipped and counted as thinned: the shadow thins, the line is never slowed. The shadow is
  compiled with one thread and one request, so while busy it takes about one core.
- Each run counts the (live, shadow) verdict pair. A disagreement is published on `<base>/shadow`
  with both verdicts and scores, its frame is kept in `<state_dir>/shadow/frames/` (the newest
  MAX_FRAMES), and it is appended to `<state_dir>/shadow/shadow.jsonl`; the pair counts are appended
  and published as a summary every SUMMARY_S and at stop. `python -m edge shadow-report` reads it.

Scores: the part score for a model with a part output, else the peak of its defect regions (0
without one); the same measure on both sides.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.config import Config, RoiConfig
from edge.lifecycle.audit import append_jsonl
from edge.model_loader import LoadedModel, load_model
from edge.mqtt import MqttSink
from edge.package import PackageError
from edge.rules import decide

log = logging.getLogger(__name__)

TOPIC = "shadow"
SHADOW_ERROR = "shadow_error"
SHADOW_DIR, LOG_FILE, FRAMES_DIR = "shadow", "shadow.jsonl", "frames"
QUEUE_SIZE = 4  # frames waiting for the shadow; more are thinned (bounded memory, never a wait)
SUMMARY_S = 10.0
MAX_FRAMES = 500
KEEPS_UP_AFTER = 4 * QUEUE_SIZE  # hysteresis of the thinning log lines


def start_shadow(cfg: Config, sink: MqttSink | None, station: dict[str, str],
                 on_alarm: Callable[[str, bool, str], None]) -> ShadowRunner | None:
    """The runner for `model.shadow`, or None without one. A shadow that cannot load never stops the
    station (it decides nothing): the `shadow_error` alarm says why."""
    if cfg.model.shadow is None:
        return None
    # compiled small (one thread, one request): its cost is bounded by design, whatever the live settings
    model_cfg = cfg.model.model_copy(update={"path": cfg.model.shadow, "threads": 1, "num_requests": 1,
                                             "hint": "LATENCY"})
    try:
        model = load_model(cfg.model_copy(update={"model": model_cfg}))
    except (PackageError, OSError) as e:
        log.error("shadow model not loaded, running without it: %s", e)
        on_alarm(SHADOW_ERROR, True, f"model.shadow not loaded: {e}")
        return None
    return ShadowRunner(model, cfg.state_dir, station, sink, cfg.model.shadow_every_nth, cfg.model.shadow_cpu_share)


def score_of(part_score: float | None, regions: list[Any]) -> float:
    if part_score is not None:
        return round(float(part_score), 6)
    return round(max((float(r.max_score) for r in regions), default=0.0), 6)


class ShadowRunner:
    """Owns the shadow model and its thread; `offer` is called by the result thread."""

    def __init__(self, model: LoadedModel, state_dir: Path, station: dict[str, str], sink: MqttSink | None,
                 every_nth: int, cpu_share: float) -> None:
        self.model, self.sink, self.station = model, sink, station
        self.dir = state_dir / SHADOW_DIR
        (self.dir / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
        self.every_nth, self.cpu_share = every_nth, cpu_share
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._lock = threading.Lock()
        # offered = run + thinned + failed + unfinished (still queued at stop)
        self.counts = {"offered": 0, "run": 0, "thinned": 0, "agree": 0, "disagree": 0, "failed": 0,
                       "unfinished": 0}
        self.pairs: dict[str, int] = {}  # "live/shadow" -> parts, since start
        self._delta: dict[str, int] = {}  # since the last summary
        self._thinned_delta = 0
        self._seen = 0
        self._episode: int | None = None  # during a thinning episode: the thinned count before it began
        self._accepted_run = 0  # offers taken in a row; KEEPS_UP_AFTER of them end an episode
        self._busy_s = 0.0
        self._live_info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()
        log.info("shadow model %s %s runs on 1 part in %d, at most %.0f %% of a core", model.info["name"],
                 model.info["version"], every_nth, cpu_share * 100)

    # -- result thread ----------------------------------------------------------------------------
    def offer(self, event_id: str, frame: Any, roi: RoiConfig | None, live_info: dict[str, Any],
              outcome: Any) -> None:
        """Hand a judged part over, or count it as thinned; never waits, never raises."""
        try:
            self._seen += 1
            if (self._seen - 1) % self.every_nth or frame.image is None:
                return
            item = (event_id, frame.part_id, frame.capture_ts, frame.image, roi, dict(live_info),
                    outcome.verdict, score_of(outcome.part_score, outcome.regions))
            with self._lock:
                self.counts["offered"] += 1
            self._queue.put_nowait(item)
            self._accepted_run += 1
            if self._episode is not None and self._accepted_run >= KEEPS_UP_AFTER:
                log.info("shadow keeps up again after skipping %d part(s)", self.counts["thinned"] - self._episode)
                self._episode = None
        except queue.Full:
            with self._lock:
                self.counts["thinned"] += 1
                self._thinned_delta += 1
            self._accepted_run = 0
            if self._episode is None:
                self._episode = self.counts["thinned"] - 1
                log.warning("shadow over its CPU budget (model.shadow_cpu_share %.2f): skipping parts, counted as "
                            "thinned; the line is not slowed", self.cpu_share)
        except Exception:
            log.exception("shadow: offer failed (the part itself is not affected)")

    # -- shadow thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        next_summary = time.monotonic() + SUMMARY_S
        while not self._stop.is_set():
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + SUMMARY_S
                self._summary()
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.monotonic()
            try:
                self._judge(*item)
            except Exception:
                log.exception("shadow: part %s not judged", item[1])
                with self._lock:
                    self.counts["failed"] += 1
            busy = time.monotonic() - t0
            self._busy_s += busy
            self._stop.wait(busy * (1.0 / self.cpu_share - 1.0))  # the budget: rest in proportion

    def _judge(self, event_id: str, part_id: str, capture_ts: float, image: np.ndarray, roi: RoiConfig | None,
               live_info: dict[str, Any], live_verdict: str, live_score: float) -> None:
        crop = image if roi is None else roi.crop(image)
        det = self.model.inferencer.inspect(crop, self.model.params)
        verdict, reasons = decide(det, self.model.rules)
        pair = f"{live_verdict}/{verdict}"
        with self._lock:
            self.counts["run"] += 1
            self.counts["agree" if verdict == live_verdict else "disagree"] += 1
            self.pairs[pair] = self.pairs.get(pair, 0) + 1
            self._delta[pair] = self._delta.get(pair, 0) + 1
            self._live_info = live_info
        if verdict == live_verdict:
            return
        frame_path = self.dir / FRAMES_DIR / f"{int(capture_ts * 1000):013d}-{event_id}.png"
        saved = bool(cv2.imwrite(str(frame_path), image))
        self._prune_frames()
        record = {"kind": "disagreement", "ts": round(time.time(), 3), "event_id": event_id, "part_id": part_id,
                  "capture_ts": capture_ts, "station": self.station,
                  "live": {"verdict": live_verdict, "score": live_score, "model": _ident(live_info)},
                  "shadow": {"verdict": verdict, "score": score_of(det.part_score, det.regions),
                             "reasons": reasons, "model": _ident(self.model.info)},
                  "evidence": str(frame_path.relative_to(self.dir)) if saved else None}
        append_jsonl(self.dir / LOG_FILE, record, sync=False)
        if self.sink is not None:
            self.sink.publish_side(TOPIC, record)

    def _summary(self) -> None:
        """Append and publish the pair counts since the last summary (nothing when nothing happened)."""
        with self._lock:
            delta, thinned = self._delta, self._thinned_delta
            self._delta, self._thinned_delta = {}, 0
            totals = {**self.counts, "pairs": dict(self.pairs)}
            live = self._live_info
        if not delta and not thinned:
            return
        record = {"kind": "summary", "ts": round(time.time(), 3), "station": self.station, "pairs": delta,
                  "thinned": thinned, "live": _ident(live), "shadow": _ident(self.model.info), "totals": totals,
                  "busy_s": round(self._busy_s, 3)}
        append_jsonl(self.dir / LOG_FILE, record)
        if self.sink is not None:
            self.sink.publish_side(TOPIC, record)

    def _prune_frames(self) -> None:
        frames = sorted((self.dir / FRAMES_DIR).glob("*.png"))
        for old in frames[: max(0, len(frames) - MAX_FRAMES)]:
            with contextlib.suppress(OSError):
                old.unlink()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "pairs": dict(self.pairs)}

    def close(self, timeout: float = 2.0) -> None:
        """Finish what is queued (bounded), write the last summary, release the model."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            self.counts["unfinished"] = self._queue.qsize()
        self._summary()
        log.info("shadow %s %s stopped: %s, verdict pairs (live/shadow) %s", self.model.info["name"],
                 self.model.info["version"], self.counts, self.pairs)
        self.model.inferencer.close()


def _ident(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in ("name", "version", "package_sha256")}

