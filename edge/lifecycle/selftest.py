"""Golden-sample self-test: the station proves on its own reference parts that a model still
judges them as they were judged when they were chosen (edge.lifecycle.golden).

When it runs and what a failure does:
- at start: the daemon refuses to inspect, raises `selftest_failed` and exits 78 (SelfTestFailed
  is a PackageError: the package cannot be used on this station);
- at every reload (SIGHUP, install.sh, `edge promote`/`rollback`): the new model is refused and
  closed, the old one keeps inspecting (the reload path raises `model_reload`);
- between parts, every `selftest.interval_s` or on an MQTT command on `<base>/command`
  ({"command": "selftest", "id": "..."}): a failure raises `selftest_failed` and, with
  `selftest.on_failure: stop`, every part gets an `error` verdict until a self-test passes again.

Every run is published on `<base>/selftest` with each sample's score against its threshold and the
margin (positive: how far from flipping; negative: it flipped), so drift shows before a verdict
changes. The run uses the model's synchronous request, apart from the line's async queue.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.alarms import AlarmTracker
from edge.config import RoiConfig, SelfTestConfig
from edge.events import rules_hash
from edge.lifecycle.golden import GoldenError, Sample, load_samples, read_image
from edge.model_loader import LoadedModel
from edge.mqtt import MqttSink
from edge.package import PackageError
from edge.rules import decide
from edge.text import loads_untrusted

log = logging.getLogger(__name__)

SELFTEST_FAILED = "selftest_failed"
TOPIC = "selftest"
COMMAND_TOPIC = "command"
START_PUBLISH_WAIT_S = 5.0  # at a failed start: how long to wait for the broker so the alarm gets out


class SelfTestFailed(PackageError):
    """The model disagrees with the golden set (or the set cannot be read): not to be trusted here."""


@dataclass
class SelfTestResult:
    kind: str  # start | reload | scheduled | command | cli
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the set itself is unusable (manifest, too few samples)
    duration_ms: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    rules_sha256: str = ""

    @property
    def failed(self) -> list[str]:
        return [s["id"] for s in self.samples if not s["ok"]]

    @property
    def status(self) -> str:
        if self.error or self.failed:
            return "fail"
        return "pass" if self.samples else "empty"

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    @property
    def min_margin(self) -> float | None:
        margins = [s["margin"] for s in self.samples if s["margin"] is not None]
        return min(margins) if margins else None

    def summary(self) -> str:
        if self.error:
            return self.error
        if not self.samples:
            return "no golden samples (python -m edge golden add): the model is trusted untested"
        bad = [s for s in self.samples if not s["ok"]]
        if not bad:
            return f"{len(self.samples)} golden samples agree (min margin {self.min_margin})"
        parts = [f"{s['id']} expected {s['expected']}, got {s['verdict']}"
                 + (f" ({s['error']})" if s["error"] else
                    f" (score {s['score']} vs {s['threshold']}, {s['regions']} region(s))") for s in bad]
        return f"{len(bad)} of {len(self.samples)} golden samples disagree: " + "; ".join(parts)

    def event(self, station: dict[str, str], request: str | None = None) -> dict[str, Any]:
        return {"kind": self.kind, "status": self.status, "ok": self.ok, "request": request, "station": station,
                "model": self.model, "rules_sha256": self.rules_sha256, "samples": self.samples,
                "failed": self.failed, "min_margin": self.min_margin, "error": self.error,
                "summary": self.summary(), "duration_ms": round(self.duration_ms, 1), "ts": round(time.time(), 3)}


def run_golden(model: LoadedModel, state_dir: Path, roi: RoiConfig | None, kind: str,
               min_samples: int = 0) -> SelfTestResult:
    """Every golden sample through `model` exactly as the line judges a part (ROI, postprocess, rules)."""
    t0 = time.monotonic()
    result = SelfTestResult(kind, model=model.info, rules_sha256=rules_hash(model.rules_dict))
    try:
        samples = load_samples(state_dir)
    except GoldenError as e:
        result.error = str(e)
        return result
    if len(samples) < min_samples:
        result.error = f"{len(samples)} golden sample(s), selftest.min_samples is {min_samples}"
    for sample in samples:
        result.samples.append(_judge(model, state_dir, roi, sample))
    result.duration_ms = (time.monotonic() - t0) * 1000
    return result


def _judge(model: LoadedModel, state_dir: Path, roi: RoiConfig | None, sample: Sample) -> dict[str, Any]:
    row: dict[str, Any] = {"id": sample.id, "expected": sample.expected, "verdict": "error", "ok": False,
                           "decided_by": None, "score": None, "threshold": None, "margin": None, "regions": None,
                           "error": None}
    try:
        image = read_image(state_dir, sample)
        if roi is not None:
            image = roi.crop(image)  # ValueError: this sample disagrees (below)
        det = model.inferencer.inspect(image, model.params)
        verdict, _ = decide(det, model.rules)
    except Exception as e:  # an unreadable sample or a broken model: this sample disagrees
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    if det.part_score is not None and det.part_threshold is not None:
        by, score, threshold = "part_score", det.part_score, det.part_threshold
    else:
        by, score, threshold = "regions", det.score, model.params.pixel_threshold
    margin = score - threshold if sample.expected == "fail" else threshold - score
    row.update(verdict=verdict, ok=verdict == sample.expected, decided_by=by, score=round(float(score), 6),
               threshold=threshold, margin=round(float(margin), 6) if math.isfinite(margin) else None,
               regions=len(det.regions))
    return row


class SelfTester:
    """The daemon's side: gates at start and reload, scheduled and commanded runs between parts,
    events, the alarm and the `stop` hold on parts (`hold(reason)`; None lifts it)."""

    def __init__(self, settings: SelfTestConfig, state_dir: Path, station: dict[str, str], sink: MqttSink | None,
                 alarms: AlarmTracker, hold: Callable[[str | None], None]) -> None:
        self.settings, self.state_dir, self.station = settings, state_dir, station
        self.sink, self.alarms, self.hold = sink, alarms, hold
        self._requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._next_due = time.monotonic() + settings.interval_s if settings.interval_s else math.inf
        self._thread: threading.Thread | None = None
        self._generation = 0  # +1 per model that passed a reload gate: older runs are superseded
        self._state_lock = threading.Lock()  # generation, alarm and hold change together
        self.last: SelfTestResult | None = None
        if sink is not None and settings.commands:
            sink.add_subscription(COMMAND_TOPIC, self.on_command)

    # -- gates: start and reload ---------------------------------------------------------------
    def gate(self, model: LoadedModel, roi: RoiConfig | None, kind: str, request: str | None = None) -> None:
        """Pass, or close `model` and raise SelfTestFailed naming the samples that disagree."""
        result = self._run(model, roi, kind, request)
        if result.ok:
            with self._state_lock:
                if kind == "reload":
                    self._generation += 1
                self._failed(False, f"{kind}: {result.summary()}")
            return
        if kind == "start":
            self.alarms.set(SELFTEST_FAILED, True, f"refusing to inspect: {result.summary()}")
            self._wait_published()
        model.inferencer.close()
        raise SelfTestFailed(f"golden self-test failed for {model.info['name']} {model.info['version']}: "
                             f"{result.summary()}")

    # -- between parts: schedule and commands --------------------------------------------------
    def on_command(self, payload: bytes, retained: bool) -> None:
        """MQTT thread: {"command": "selftest", "id": ...} queues a run; anything else is logged."""
        try:
            body = loads_untrusted(payload)
        except ValueError:
            body = None
        if retained or not isinstance(body, dict) or body.get("command") != "selftest":
            log.warning("command ignored (retained, not JSON or not {\"command\": \"selftest\"}): %r", payload[:200])
            return
        self._requests.put(str(body.get("id") or f"mqtt-{time.time():.3f}"))

    def tick(self, model: LoadedModel, roi: RoiConfig | None, busy: bool = False) -> None:
        """Main loop: start a run in the background when one is due or asked for (not during a reload)."""
        if busy or (self._thread is not None and self._thread.is_alive()):
            return
        try:
            request: str | None = self._requests.get_nowait()
        except queue.Empty:
            if time.monotonic() < self._next_due:
                return
            request = None
        if self.settings.interval_s:
            self._next_due = time.monotonic() + self.settings.interval_s
        kind = "scheduled" if request is None else "command"
        self._thread = threading.Thread(target=self._between_parts, args=(model, roi, kind, request, self._generation),
                                        name="selftest", daemon=True)
        self._thread.start()

    def _between_parts(self, model: LoadedModel, roi: RoiConfig | None, kind: str, request: str | None,
                       generation: int) -> None:
        try:
            result = run_golden(model, self.state_dir, roi, kind, self.settings.min_samples)
        except Exception:
            log.exception("self-test (%s) crashed", kind)
            return
        with self._state_lock:  # a reload gate passing at the same moment must not be overwritten by this
            if generation != self._generation:  # a reload swapped (and closed) this model meanwhile
                log.info("self-test (%s) of %s %s superseded by a reload; result dropped", kind,
                         model.info["name"], model.info["version"])
                return
            self._report(result, request)
            self._failed(not result.ok, f"{kind}: {result.summary()}")

    # -- shared ---------------------------------------------------------------------------------
    def _run(self, model: LoadedModel, roi: RoiConfig | None, kind: str, request: str | None) -> SelfTestResult:
        result = run_golden(model, self.state_dir, roi, kind, self.settings.min_samples)
        self._report(result, request)
        return result

    def _report(self, result: SelfTestResult, request: str | None) -> None:
        self.last = result
        log.log(logging.INFO if result.ok else logging.ERROR, "self-test (%s) %s on %s %s: %s", result.kind,
                result.status, result.model.get("name"), result.model.get("version"), result.summary())
        if self.sink is not None:
            self.sink.publish_side(TOPIC, result.event(self.station, request))

    def _failed(self, failed: bool, message: str) -> None:
        """Latch the alarm; with on_failure 'stop', hold parts (error verdicts) while it is raised."""
        self.alarms.set(SELFTEST_FAILED, failed, message)
        if self.settings.on_failure == "stop":
            self.hold(f"golden self-test failed, inspection stopped: {message}" if failed else None)

    def _wait_published(self) -> None:
        """A failed start exits right after: give the broker connection a moment so the alarm and the
        event leave (they are queued and sent on connect)."""
        deadline = time.monotonic() + START_PUBLISH_WAIT_S
        while self.sink is not None and not self.sink.connected and time.monotonic() < deadline:
            time.sleep(0.05)
