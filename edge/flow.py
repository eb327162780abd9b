"""The frame path of a station: capture thread -> bounded queue -> submit thread -> OpenVINO
AsyncInferQueue (callback) -> result thread -> outbox -> MQTT sink, so capture, inference and
publishing overlap.

Live frames are dropped (and counted) when the path is busy; parts with an identity (folder
files, triggered or synthetic parts) wait instead, because dropping one would lose a verdict.
Every failure on a part's way (no frame, bad frame, inference error) becomes an `error`
verdict for that part. The source commits a part (a folder moves its file) only after the
event is in the outbox, so a crash can duplicate an event (same event_id), never lose a part.
Results that are ready together are stored in one outbox transaction (group commit: one fsync for
the group, outbox.group_commit_max/_ms); their parts are committed once that transaction is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.alarms import FRAME_ERROR, OUTBOX_ERROR, STALE_FRAMES, AlarmTracker
from edge.config import FrameChecksConfig, RoiConfig
from edge.contract import NonFiniteError, Region, Verdict
from edge.events import (
    EVENT_MAX_BYTES,
    build_result_event,
    encode,
    event_id_for,
    expected_size,
    region_dict,
    shift_regions,
)
from edge.evidence import EvidenceWriter
from edge.inference import ModelClosed
from edge.membudget import MemoryBudget, frame_cost
from edge.metrics import LatencyWindow, Metrics
from edge.model_loader import LoadedModel
from edge.mqtt import MqttSink
from edge.outbox import Outbox
from edge.postprocess import postprocess_map
from edge.preprocess import CoarseMap, FrameError
from edge.preview import PreviewFeed
from edge.quality import image_quality
from edge.rules import BAD_FRAME, INFERENCE, INTERNAL, NON_FINITE, SELFTEST, STALE, decide
from edge.seqstore import SeqStore
from edge.sources import Frame, FrameSource, check_frame
from edge.text import safe_part_id, safe_text
from edge.triggering.gate import FrameGate

log = logging.getLogger(__name__)

_STOP = object()  # sentinel through the queues

ResultListener = Callable[[Frame, str, bytes], None]  # (part's frame, event id, encoded event) once durable
RecipeModel = Callable[[LoadedModel, str], LoadedModel]  # the model judging by a named recipe's rules


@dataclass
class Outcome:
    """What one part's inspection decided (before it becomes an event)."""

    verdict: Verdict
    reasons: list[str] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    mask: np.ndarray | None = None
    part_score: float | None = None  # the model's part decision score (models with a part output)
    error: str | None = None  # why the part could not be judged (verdict `error`): the event's `error`
    error_kind: str = ""  # one of edge.rules.ERROR_KINDS: the metrics label errors{kind}


def error_outcome(kind: str, message: str) -> Outcome:
    """The `error` verdict of a part that cannot be judged, of one of edge.rules.ERROR_KINDS: the one
    place it is made. Every failure on a part's way (an error frame from its source or the trigger gate,
    a refused frame, an inference or postprocess failure, a failed event build) ends here."""
    return Outcome("error", error=message, error_kind=kind)


@dataclass
class Ready:
    """A part whose event is built, waiting for its group's transaction."""

    job: Job
    event_id: str
    payload: bytes
    verdict: Verdict
    t_built: float  # monotonic: the part's latency is counted up to here (as before group commit)


@dataclass(frozen=True)
class Runtime:
    """What a reload replaces, as one snapshot (FrameFlow.swap): each frame is checked, cropped and
    inspected with the model, frame checks and ROI of one config, never a mix of old and new."""

    model: LoadedModel
    checks: FrameChecksConfig
    roi: RoiConfig | None


class Job:
    """One part on its way through the pipeline (slots: created per frame)."""

    __slots__ = ("error", "error_kind", "frame", "image_size", "model", "nbytes", "offset", "part", "prob",
                 "runtime", "t_done", "t_submit")

    def __init__(self, frame: Frame, runtime: Runtime) -> None:
        self.frame, self.runtime, self.model = frame, runtime, runtime.model
        self.prob: CoarseMap | np.ndarray | None = None  # CoarseMap from the pipeline; dropped once judged
        self.part: float | None = None  # max over tiles of the part output (None: the model has none)
        self.error: str | None = frame.error
        self.error_kind = frame.error_kind
        self.offset = (0, 0)
        self.image_size: tuple[int, int] | None = None  # (width, height) of the full frame
        self.t_submit = self.t_done = 0.0
        self.nbytes = frame.held_bytes  # charged to the memory budget by FrameFlow._put, released once stored

    def fail(self, kind: str, message: str) -> None:
        """This part cannot be judged: it is decided as error_outcome(kind, message)."""
        self.error, self.error_kind = message, kind


class FrameFlow:
    """The three pipeline threads and their queues. `swap` replaces the runtime (model, checks, ROI)
    at any time (reload); each frame uses the one current when it is submitted."""

    def __init__(self, *, station: dict[str, str], result_topic: str, source: FrameSource, gate: FrameGate,
                 runtime: Runtime, outbox: Outbox,
                 sink: MqttSink | None, alarms: AlarmTracker, metrics: Metrics, evidence: EvidenceWriter | None,
                 seq: SeqStore, latency: LatencyWindow, queue_size: int, observe_camera: bool,
                 max_queued_bytes: int, group_commit_ms: float, group_commit_max: int,
                 preview: PreviewFeed | None = None) -> None:
        self.station, self.station_key = station, f"{station['line']}/{station['name']}"
        self.result_topic, self.source, self.gate = result_topic, source, gate
        self.runtime = runtime
        self.outbox, self.sink, self.alarms, self.metrics = outbox, sink, alarms, metrics
        self.evidence, self.seq, self.latency = evidence, seq, latency
        self.preview = preview
        self.observe_camera = observe_camera
        # Group commit: results ready together share one outbox transaction (one fsync); 1 = one per part.
        self.group_commit_s, self.group_commit_max = group_commit_ms / 1000.0, max(1, group_commit_max)
        self.counters = gate.counters  # parts by verdict, inspected, dropped, skipped: one lock
        self.fatal: str | None = None
        self.hold_reason: str | None = None  # set: every part gets an `error` verdict (edge.lifecycle.selftest, on_failure stop)
        self.shadow: Any = None  # edge.lifecycle.shadow.ShadowRunner: judged parts are offered to it, never waited for
        self.last_progress = self.hold_beat = self.capture_beat = time.monotonic()  # hold_beat: a full outbox/disk is retried
        self._frames: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._capture_waiting = False  # a part waits for room in the frame path (memory budget or queue)
        if evidence is not None and evidence.backlog is None:  # parts waiting: the writer keeps to its CPU budget
            evidence.backlog = lambda: self._capture_waiting or not self._frames.empty()
        # Unbounded: the budget admits at most queue_size + 64 parts, so it never blocks a callback.
        self._results: queue.Queue[Any] = queue.Queue()
        self.budget = MemoryBudget(max_queued_bytes, queue_size + 64)
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._capture_stop = threading.Event()
        self._abandon = threading.Event()  # drain deadline: stop waiting, leave the rest uncommitted
        self._last_size: tuple[int, int] | None = None
        # Hooks (edge.opcua): told of every result once it is durable; a trigger's recipe -> its rules.
        self.result_listeners: list[ResultListener] = []
        self.recipe_model: RecipeModel | None = None
        self.threads = [threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
                        for name, fn in (("capture", self._capture_loop), ("submit", self._submit_loop),
                                         ("results", self._result_loop))]

    def swap(self, runtime: Runtime) -> None:
        """Use `runtime` from the next frame on; frames already submitted keep theirs (Job.runtime)."""
        self.runtime = runtime  # one reference: readers take it once per frame, never half old, half new

    def start(self) -> None:
        for t in self.threads:
            t.start()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return self._frames.qsize()

    def capture_done(self) -> bool:
        return not self.threads[0].is_alive()

    def idle(self) -> bool:
        with self._inflight_cond:
            return self._inflight == 0 and self._frames.empty()

    def drain(self, deadline: float, keepalive: Callable[[], Any]) -> None:
        """Stop capture, then finish every part already taken until `deadline` (monotonic).

        No wait here outlives the deadline: parts not finished by then are given up and logged,
        uncommitted (a folder file stays for the next start; nothing is lost)."""
        self._capture_stop.set()
        self._join(self.threads[0], deadline, keepalive)
        while not self._abandon.is_set():  # _STOP behind the last queued frame
            try:
                self._frames.put(_STOP, timeout=0.2)
                break
            except queue.Full:
                self._tick(deadline, keepalive)
        self._join(self.threads[1], deadline, keepalive)
        with self._inflight_cond:
            while self._inflight > 0 and not self._abandon.is_set():
                self._inflight_cond.wait(0.2)
                self._tick(deadline, keepalive)
            if self._inflight:
                log.error("%d part(s) still in flight at the drain deadline", self._inflight)
        self._abandon.set()
        self._results.put(_STOP)
        self._join(self.threads[2], time.monotonic() + 5.0, keepalive)
        left = [f.part_id for f in _empty(self._frames) if f is not _STOP]
        if left:
            log.warning("%d part(s) not inspected at stop, left for the next start: %s", len(left), left[:20])

    def _tick(self, deadline: float, keepalive: Callable[[], Any]) -> None:
        keepalive()
        if time.monotonic() >= deadline and not self._abandon.is_set():
            log.error("drain deadline reached: giving up on the parts still on their way (left uncommitted)")
            self._abandon.set()

    def _join(self, thread: threading.Thread, deadline: float, keepalive: Callable[[], Any]) -> None:
        """Join until `deadline`; past it, abandon (every wait in the path gives up) and join briefly."""
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            keepalive()
        if thread.is_alive():
            self._tick(deadline, keepalive)
            thread.join(2.0)
            if thread.is_alive():
                log.error("thread %s still busy at the drain deadline; leaving it", thread.name)

    # -- capture thread ------------------------------------------------------------------------------
    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as e:  # a dead thread must end the daemon loudly, not leave it half alive
            log.exception("thread %s crashed", threading.current_thread().name)
            self.fatal = f"{threading.current_thread().name}: {type(e).__name__}: {e}"

    def _capture_loop(self) -> None:
        while not self._capture_stop.is_set():
            self.capture_beat = time.monotonic()  # a read or decode that never returns stops the watchdog
            for f in self.gate.expired_triggers():
                self._put(f)
            if self.source.exhausted:
                break
            frame = self.source.read(0.2)
            if frame is None:
                continue
            self.metrics.frames.inc()
            if frame.error is None:
                bad = check_frame(frame, self.runtime.checks)
                if bad is not None:
                    frame.fail(BAD_FRAME, bad)
            if self.observe_camera:  # live sources: a bad frame means the camera (or its light) is in trouble
                self.alarms.observe_camera(frame.error is None, frame.error or "frames arrive again")
            else:  # files: whoever writes them is in trouble
                self.alarms.set(FRAME_ERROR, frame.error is not None, frame.error or "readable frames again")
            for f in self.gate.admit(frame):
                self._put(f)
        for f in self.gate.flush("the daemon stopped before a frame arrived for this part"):
            self._put(f, force=True)

    def _put(self, frame: Frame, force: bool = False) -> None:
        """Live frames are dropped when the path is full (queue or memory budget); parts wait (never lost)
        until there is room, the pipeline failed or the drain deadline passed (then they stay uncommitted)."""
        cost = frame.held_bytes = frame_cost(frame.image, self.runtime.model.map_share)
        if frame.live and frame.error is None:
            if not self.budget.try_acquire(cost):
                self._drop("memory_full")
                return
            try:
                self._frames.put_nowait(frame)
            except queue.Full:
                self.budget.release(cost)
                self._drop("queue_full")
            return
        if not self.budget.try_acquire(cost):
            self._capture_waiting = True
            try:
                while not self.budget.acquire(cost, 0.2):
                    self.capture_beat = time.monotonic()  # waiting for room is backpressure, not a hang
                    if self._give_up(frame, force):
                        return
            finally:
                self._capture_waiting = False
        while True:
            try:
                self._frames.put(frame, timeout=0.2)
                return
            except queue.Full:
                self.capture_beat = time.monotonic()
                if self._give_up(frame, force):
                    self.budget.release(cost)
                    return

    def _drop(self, reason: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        self.counters.add("dropped")

    def _give_up(self, frame: Frame, force: bool) -> bool:
        if self.fatal or self._abandon.is_set():
            log.warning("part %s not queued (the pipeline is stopping): left for the next start", frame.part_id)
            return True
        return self._capture_stop.is_set() and not force and frame.live

    # -- submit thread -----------------------------------------------------------------------------
    def _submit_loop(self) -> None:
        while not self._abandon.is_set():
            try:
                frame = self._frames.get(timeout=0.2)
            except queue.Empty:
                continue
            if frame is _STOP:
                return
            with self._inflight_cond:
                self._inflight += 1
            job = Job(frame, self.runtime)  # read per frame: a reload swaps it between frames
            job.model = self._model_for(frame, job.runtime)
            self._submit(job)

    def _model_for(self, frame: Frame, runtime: Runtime) -> LoadedModel:
        """The runtime's model, judging by the rules of the recipe a trigger named (edge.recipes)."""
        recipe = frame.meta.get("recipe")
        if recipe is None or self.recipe_model is None:
            return runtime.model
        return self.recipe_model(runtime.model, recipe)

    def _submit(self, job: Job) -> None:
        """Start the part's inference; a part that cannot be inspected goes straight to the result thread."""
        if job.error is None and self.hold_reason is not None:
            job.fail(SELFTEST, self.hold_reason)
        img = self._admit(job) if job.error is None else None
        if img is not None and self._start_inference(job, img):
            return
        self._results.put(job)

    def _admit(self, job: Job) -> np.ndarray | None:
        """The image to inspect (cropped to the ROI), or None when the part cannot be inspected (then
        job.error says why, unless the frame had no image at all)."""
        frame, checks = job.frame, job.runtime.checks
        img = frame.image
        if img is None:
            return None
        job.image_size = (int(img.shape[1]), int(img.shape[0]))
        self._last_size = job.image_size
        age = time.monotonic() - frame.mono_ts
        stale = frame.live and checks.max_age_s > 0 and age > checks.max_age_s
        if frame.live:  # latched: one raise when frames go stale, one clear when they are fresh again
            self.alarms.set(STALE_FRAMES, stale, f"frame {age:.2f} s old at inference" if stale else "fresh")
        if stale:
            job.fail(STALE, f"stale frame: {age:.2f} s old > {checks.max_age_s} s")
            return None
        r = job.runtime.roi
        if r is None:
            return img
        try:
            crop = r.crop(img)
        except ValueError as e:
            job.fail(BAD_FRAME, str(e))
            return None
        job.offset = (r.x, r.y)
        return crop

    def _start_inference(self, job: Job, img: np.ndarray) -> bool:
        """Hand the image to the model (its callback takes it on); False when that failed (job.error set)."""
        job.t_submit = time.monotonic()
        try:
            try:
                job.model.inferencer.submit(img, job, self._on_inferred, coarse=True)
            except ModelClosed:  # a reload released this model just now: use the new one
                job.model = self._model_for(job.frame, self.runtime)
                job.model.inferencer.submit(img, job, self._on_inferred, coarse=True)
            return True
        except FrameError as e:  # the frame's fault (size, type): not a model error
            job.fail(BAD_FRAME, f"cannot inspect frame: {e}")
            job.t_submit = 0.0
        except Exception as e:  # OpenVINO errors: an error verdict and the model_error alarm
            job.fail(INFERENCE, f"cannot inspect frame: {e}")
        return False

    def _on_inferred(self, prob: CoarseMap | np.ndarray | None, error: BaseException | None, job: Job,
                     part: float | None = None) -> None:
        """OpenVINO callback thread: hand over and return quickly (the request is reused)."""
        job.t_done = time.monotonic()
        job.prob, job.part = prob, part
        if error is not None:
            job.fail(INFERENCE, f"inference failed: {type(error).__name__}: {error}")
        self._results.put(job)

    # -- result thread -----------------------------------------------------------------------------
    def _result_loop(self) -> None:
        """Take every result that is ready (group commit), store them in one transaction, then commit
        each part. A group never outlives the drain deadline: past it the rest is left uncommitted."""
        stop = False
        while not stop:
            jobs = self._take_group()
            if jobs[-1] is _STOP:
                jobs.pop()
                stop = True
            try:
                if self._abandon.is_set():
                    for job in jobs:
                        log.warning("part %s not finished by the drain deadline: left for the next start",
                                    job.frame.part_id)
                else:
                    self._finish_group(jobs)
            finally:
                for job in jobs:
                    self.budget.release(job.nbytes)
                with self._inflight_cond:
                    self._inflight -= len(jobs)
                    self._inflight_cond.notify_all()
                self.last_progress = time.monotonic()

    def _take_group(self) -> list[Any]:
        """The next result (waiting for it), then every one already queued, up to group_commit_max; while
        more parts are in flight, waits up to group_commit_ms for them so they share the fsync."""
        jobs = [self._results.get()]
        deadline = time.monotonic() + self.group_commit_s
        while len(jobs) < self.group_commit_max and jobs[-1] is not _STOP:
            try:
                jobs.append(self._results.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._inflight <= len(jobs):  # nothing more on its way: do not wait for nothing
                break
            try:
                jobs.append(self._results.get(timeout=left))
            except queue.Empty:
                break
        return jobs

    def _finish_group(self, jobs: list[Job]) -> None:
        """A group of results, step by step: each part is decided and its event built (_prepare), the
        events are stored in one transaction (_store: one fsync), and only once they are durable each part
        is committed at its source (_commit: folder file moved, trigger closed) and counted (_account)."""
        ready = [item for item in map(self._prepare, jobs) if item is not None]
        self._store(ready)

    def _prepare(self, job: Job) -> Ready | None:
        """Decide one part and build its event. Whatever goes wrong while deciding or building (a name that
        cannot be encoded, a non-finite map, a bug) gives this part an `error` event (kind "internal")
        and its file goes to failed/: no single input stops the line."""
        frame, t0 = job.frame, time.monotonic()
        try:
            outcome = self._decide(job)
            built = self._build_event(job, outcome, t0, with_evidence=True)
        except Exception as e:
            log.exception("part %s: cannot build its result event; it gets an error verdict instead",
                          safe_part_id(frame.part_id))
            outcome = self._error(job, INTERNAL,
                                  f"internal error while building the result: {type(e).__name__}: {e}")
            try:
                built = self._build_event(job, outcome, t0, with_evidence=False)
            except Exception:  # not even an error event: still never stop the thread for one part
                log.exception("part %s: no result event can be built; moving it to failed/ without one",
                              safe_part_id(frame.part_id))
                self._commit(frame, ok=False, trigger=False)  # its trigger stays open: error result at restart
                return None
        if built is None:
            return None  # shutdown while the disk is full: the file stays for the next run
        if self.shadow is not None and outcome.verdict != "error":
            self.shadow.offer(built[0], frame, job.runtime.roi, job.model.info, outcome)
        return Ready(job, built[0], built[1], outcome.verdict, time.monotonic())

    # -- step 1: decide --------------------------------------------------------------------------------
    def _decide(self, job: Job) -> Outcome:
        """Verdict of one part from its map (or its error); feeds the inference alarm."""
        prob, job.prob = job.prob, None  # the full map lives only while this part is judged
        outcome = self._judge(job, prob) if job.error is None and prob is not None else None
        if job.error_kind in (INFERENCE, NON_FINITE) or job.t_submit:
            self.alarms.observe_inference(job.error is None, job.error or "")
        if job.error is not None:
            log.warning("part %s: error verdict: %s", safe_part_id(job.frame.part_id), safe_text(job.error))
            return self._error(job, job.error_kind, job.error)
        if outcome is None:  # neither a map nor an error: a source or flow bug, still never a pass
            return self._error(job, INTERNAL, "the part has neither an inference result nor an error")
        return outcome

    def _judge(self, job: Job, prob: CoarseMap | np.ndarray) -> Outcome | None:
        """pass/fail by the part's rules (edge.rules.decide); None when its map cannot be judged (job.error)."""
        model = job.model
        try:
            det = postprocess_map(prob, model.params, job.part)  # a passing part never builds the full map
            verdict, reasons = decide(det, model.rules)
        except NonFiniteError as e:  # a model emitting NaN would otherwise pass every part
            job.fail(NON_FINITE, f"model output rejected: {e}")
            return None
        except Exception as e:
            job.fail(INFERENCE, f"postprocess failed: {e}")
            return None
        return Outcome(verdict, reasons, shift_regions(det.regions, job.offset), det.mask, det.part_score)

    def _error(self, job: Job, kind: str, message: str) -> Outcome:
        """The part's `error` verdict (error_outcome), counted by kind in the errors{kind} metric."""
        job.fail(kind, message)
        self.metrics.errors.labels(kind or "other").inc()
        return error_outcome(kind, message)

    # -- step 2: build the event ---------------------------------------------------------------------
    def _build_event(self, job: Job, outcome: Outcome, t0: float,
                     with_evidence: bool) -> tuple[str, bytes] | None:
        """(event_id, encoded event) of one part, or None when no sequence number could be had at shutdown.

        At most `model.max_regions` regions (the largest) go into the event, with the count of all."""
        frame, model = job.frame, job.model
        part_id = safe_part_id(frame.part_id)
        # A triggered part's id is keyed by its trigger, so a restart's error result for it has the same id.
        event_id = event_id_for(self.station_key, part_id, frame.meta.get("trigger_ts", frame.capture_ts))
        evidence, evidence_status = None, None
        if self.preview is not None:  # rate-limited, one slot, its own thread (edge.preview)
            self.preview.offer(frame.image, outcome.mask, outcome.regions, outcome.verdict, job.offset, event_id)
        if with_evidence and self.evidence is not None:  # handed to the background writer: never waits for the disk
            evidence, evidence_status = self.evidence.offer(event_id, frame.capture_ts, frame.image, outcome.mask,
                                                            outcome.regions, outcome.verdict, job.offset)
        timings = _timings(job, t0)
        width, height = job.image_size or self._last_size or expected_size(job.runtime.checks)
        mpp = model.rules.mm_per_pixel
        seq = self._next_seq(part_id)
        if seq is None:
            return None
        regions = outcome.regions
        event = build_result_event(
            station=self.station, seq=seq, part_id=part_id, capture_ts=frame.capture_ts,
            verdict=outcome.verdict, reasons=outcome.reasons,
            regions=[region_dict(r, mpp) for r in regions[: model.max_regions]], region_count=len(regions),
            total_defect_area=sum(r.area for r in regions), image={"width": width, "height": height},
            model=model.info, rules=model.rules_dict, rules_sha256=model.rules_sha256, timings_ms=timings,
            error=outcome.error, evidence=evidence, evidence_status=evidence_status, event_id=event_id,
            part_score=outcome.part_score,
            part_threshold=model.params.part_threshold,
            image_quality=image_quality(frame.image) if frame.image is not None and outcome.error is None else None)
        payload = encode(event)
        if len(payload) > EVENT_MAX_BYTES:
            raise ValueError(f"result event is {len(payload)} bytes > {EVENT_MAX_BYTES}")
        return event_id, payload

    def _next_seq(self, part_id: str) -> int | None:
        """SeqStore.next, retried while its file cannot be written (disk full): the part waits."""
        warned = False
        while True:
            try:
                seq = self.seq.next()
            except OSError as e:
                if not warned:
                    log.error("cannot reserve sequence numbers for part %s: %s; holding the pipeline", part_id, e)
                    self.alarms.set(OUTBOX_ERROR, True, f"sequence numbers cannot be stored: {e}")
                    warned = True
                self.hold_beat = time.monotonic()  # deliberately holding: the watchdog keeps being fed
                if self._abandon.wait(0.5):
                    log.critical("result of part %s NOT stored at shutdown (no sequence number)", part_id)
                    return None
                continue
            if warned:
                self.alarms.set(OUTBOX_ERROR, False, "sequence numbers are stored again")
            return seq

    # -- step 3: store (one transaction per group) ---------------------------------------------------
    def _store(self, ready: list[Ready]) -> None:
        """Outbox.add_many, then each stored part's commit in order. Parts the outbox cannot take (full,
        disk full, I/O error) are held and retried, never dropped; at the drain deadline they are left
        uncommitted (their files stay for the next run)."""
        topic = self.result_topic
        warned = False
        while ready:
            error = None
            try:
                added = self.outbox.add_many([(r.event_id, topic, r.payload, 1) for r in ready])
            except Exception as e:  # disk full, I/O error: nothing of this group was stored
                added, error = [None] * len(ready), f"{type(e).__name__}: {e}"
            held = [r for r, a in zip(ready, added, strict=True) if a is None]
            if error is None:
                log.debug("%d result(s) stored in one transaction, %d held", len(ready) - len(held), len(held))
            for r, a in zip(ready, added, strict=True):
                if a is not None:
                    self._commit(r.job.frame, ok=r.verdict != "error")
                    self._account(r, a)
            if self.sink is not None and len(held) < len(ready):
                self.sink.notify_new()
            ready = held
            if not ready:
                if warned:
                    self.alarms.set(OUTBOX_ERROR, False, "results are stored again")
                return
            if not warned:
                error = error or f"outbox full: {self.outbox.count()} events (max_events={self.outbox.max_events})"
                log.error("cannot store the result of %d part(s) (%s...): %s; holding the pipeline",
                          len(ready), safe_part_id(ready[0].job.frame.part_id), error)
                self.alarms.set(OUTBOX_ERROR, True, f"results cannot be stored: {error}")
                warned = True
            self.hold_beat = time.monotonic()  # deliberately holding: the watchdog keeps being fed
            if self._abandon.wait(0.5):
                for r in ready:
                    log.critical("result of part %s (event %s) NOT stored at shutdown",
                                 safe_part_id(r.job.frame.part_id), r.event_id)
                return


    # -- step 4: commit the part at its source -------------------------------------------------------
    def _commit(self, frame: Frame, ok: bool, trigger: bool = True) -> None:
        """source.commit and gate.commit (the stored trigger is done) once the result is durable; never
        stops the result thread (a file then stays until a restart, a trigger gets its error result there)."""
        try:
            self.source.commit(frame, ok=ok)
            if trigger:
                self.gate.commit(frame)
        except Exception:
            log.exception("part %s: cannot commit it", safe_part_id(frame.part_id))

    # -- step 5: account -----------------------------------------------------------------------------
    def _account(self, item: Ready, added: bool) -> None:
        """A stored and committed part: counters, metrics, alarms, latency, then the result listeners."""
        job, verdict, frame = item.job, item.verdict, item.job.frame
        if added:
            self.counters.add(verdict)
            self.metrics.results.labels(verdict).inc()
            self.alarms.observe_verdict(verdict)
        else:
            self.counters.add("duplicate")
            self.metrics.duplicates.inc()
        self.metrics.last_result.set(time.time())
        self.latency.add(item.t_built - frame.mono_ts)
        self.metrics.latency.observe(item.t_built - frame.mono_ts)
        if job.t_done:
            self.metrics.inference.observe(job.t_done - job.t_submit)
        self.counters.add("inspected")
        for listener in self.result_listeners:
            try:
                listener(frame, item.event_id, item.payload)
            except Exception:  # a listener (the PLC handshake) never stops the result thread
                log.exception("part %s: result listener failed", safe_part_id(frame.part_id))


def _timings(job: Job, t0: float) -> dict[str, float]:
    """The event's timings_ms: capture -> result, queue wait, inference and postprocess (t0 on)."""
    frame, now = job.frame, time.monotonic()
    return {"capture_to_result": round((now - frame.mono_ts) * 1000, 3),
            "queue": round(max(0.0, (job.t_submit or now) - frame.mono_ts) * 1000, 3),
            "inference": round(max(0.0, job.t_done - job.t_submit) * 1000, 3) if job.t_done else 0.0,
            "postprocess": round((now - t0) * 1000, 3)}

def _empty(q: queue.Queue[Any]) -> list[Any]:
    """Whatever is left in a queue, without waiting."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
