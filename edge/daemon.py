"""The station daemon: startup, main loop, reload and shutdown around the frame path (edge.flow).

Startup is a flat list of steps; READY=1 goes out only once the model is compiled and the
source opened. The main loop runs on stop_event.wait(): systemd watchdog, gauges, stats,
SIGHUP reloads, end of a finite source. Shutdown drains parts in flight and flushes the
outbox before saying offline. `run_pipeline` is the entry for the CLI, tests and benchmarks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import cv2

from edge import __version__
from edge.alarms import MODEL_FALLBACK, MODEL_RELOAD, OUTBOX_RECOVERED, AlarmTracker
from edge.config import Config, ConfigError, load_config
from edge.counters import PART_COUNTS
from edge.evidence import EvidenceStore, EvidenceWriter
from edge.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from edge.flow import FrameFlow, Runtime
from edge.lifecycle import model_state
from edge.lifecycle.selftest import SelfTester
from edge.lifecycle.shadow import ShadowRunner, start_shadow
from edge.metrics import LatencyWindow, Metrics, MetricsServer
from edge.model_loader import load_model
from edge.mqtt import MqttSink, mqtt_settings
from edge.outbox import Outbox, OutboxUnwritable
from edge.package import PackageError
from edge.preview import PreviewFeed
from edge.recipes import Recipes
from edge.seqstore import SeqStore
from edge.sources import SourceError, make_source
from edge.statelock import LockHeld, ProcessLock, client_id_lock, state_lock
from edge.systemd import Notifier
from edge.triggering.gate import FrameGate
from edge.triggering.triggers import TriggerStore

log = logging.getLogger(__name__)

HARD_STOP_GRACE_S = 15.0  # past drain_timeout_s: a stop that still hangs ends the process anyway


class Pipeline:
    """One station: owns the source, model, outbox, MQTT sink, alarms, evidence and metrics."""

    def __init__(self, cfg: Config, stop_event: threading.Event, *, config_path: str | None = None,
                 reload_event: threading.Event | None = None, notifier: Notifier | None = None) -> None:
        self.cfg, self.stop_event, self.config_path = cfg, stop_event, config_path
        self.reload_event = reload_event or threading.Event()
        self.notifier = notifier or Notifier()
        self.station = {"line": cfg.station.line, "name": cfg.station.name}
        self.station_key = f"{cfg.station.line}/{cfg.station.name}"
        self.metrics = Metrics()
        self.latency = LatencyWindow()
        self.flow: FrameFlow | None = None
        self._overwritten = 0
        self._reload_thread: threading.Thread | None = None
        self.sink: MqttSink | None = None
        self.server: MetricsServer | None = None
        self.evidence: EvidenceWriter | None = None
        self.preview: PreviewFeed | None = None
        self._thinned = 0
        self.triggers: TriggerStore | None = None
        self.shadow: ShadowRunner | None = None
        self.opcua: Any = None  # edge.opcua.server.OpcuaServer when opcua.enabled (the extra is optional)
        self.locks: list[ProcessLock] = []

    # -- startup: a flat list of steps; any failure here is a startup failure ------------------
    def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.locks.append(state_lock(cfg.state_dir))  # LockHeld -> exit 78: a second daemon on this station
        ms = mqtt_settings(cfg)
        self.locks.append(client_id_lock(ms.config.host, ms.config.port, ms.client_id))
        self.notifier.status("loading model")
        self.model = load_model(cfg)  # PackageError -> exit 78 before touching the camera
        model_state.record(cfg.state_dir, None, path=cfg.model.path, info=self.model.info)
        log.info("model %s %s (%s) from %s, rules %s", self.model.info["name"], self.model.info["version"],
                 self.model.info["precision"], cfg.model.path, self.model.rules_dict)
        self.metrics.model.info({k: str(v) for k, v in self.model.info.items()})
        self.outbox = Outbox(cfg.outbox.path or cfg.state_dir / "outbox.sqlite3", cfg.outbox.max_events)
        self.seq = SeqStore(cfg.state_dir / "seq.json")
        self.alarms = AlarmTracker(cfg.alarms, self._on_alarm)
        if cfg.evidence.enabled:
            ev = cfg.evidence
            store = EvidenceStore(ev.dir or cfg.state_dir / "evidence", int(ev.quota_mb * 1024 * 1024),
                                  ev.format, ev.save_fail, ev.save_error, ev.pass_sample_every,
                                  ev.overlay_max_side)
            self.evidence = EvidenceWriter(store, int(ev.queue_mb * 1024 * 1024), ev.keep_every_when_behind,
                                           ev.keep_first_bad, ev.thinning_alarm_s, on_alarm=self.alarms.set,
                                           cpu_share=ev.cpu_share)
        # Triggers are durable before they are acknowledged; open ones of a previous run are resolved
        # here, before the MQTT session (which may redeliver them) is resumed.
        self.triggers = TriggerStore(cfg.state_dir / "triggers.sqlite3", cfg.pipeline.trigger_dedup_s) \
            if cfg.pipeline.mode == "triggered" else None
        recipes = Recipes(cfg.recipes)
        self.gate = FrameGate(cfg.pipeline, self.metrics, self.triggers, on_alarm=self.alarms.set,
                              recipes=recipes.names)
        self.sink = MqttSink(ms, self.outbox, cfg.base_topic, self._status_payload(),
                             on_alarm=self.alarms.set, on_trigger=self.gate.on_trigger)
        self.selftest = SelfTester(cfg.selftest, cfg.state_dir, self.station, self.sink, self.alarms, self._hold_parts)
        self.sink.start()
        if self.outbox.recovery:
            self.alarms.set(OUTBOX_RECOVERED, True, self.outbox.recovery)
        if self.model.fallback:
            self.alarms.set(MODEL_FALLBACK, True, self.model.fallback)
        if cfg.metrics.enabled:
            self.server = MetricsServer(self.metrics, self.health, cfg.metrics.host, cfg.metrics.port)
            self.server.start()
        self.selftest.gate(self.model, cfg.roi, "start")  # golden set disagrees -> SelfTestFailed (exit 78)
        self.source = make_source(cfg.source, cfg.state_dir, lambda: self.model.inferencer.spec)
        self.source.open()  # SourceError (missing folder/file) -> exit 78
        if cfg.ui.preview_hz > 0 and self.sink is not None:  # the station page's live view (edge.preview)
            self.preview = PreviewFeed(cfg.ui.preview_hz, self.sink.publish_preview)
        self.flow = FrameFlow(
            station=self.station, result_topic=f"{cfg.base_topic}/result", source=self.source, gate=self.gate,
            runtime=Runtime(self.model, cfg.frame_checks, cfg.roi), outbox=self.outbox, sink=self.sink,
            alarms=self.alarms, metrics=self.metrics, evidence=self.evidence, seq=self.seq, latency=self.latency,
            queue_size=cfg.pipeline.queue_size, observe_camera=cfg.source.type != "folder",
            max_queued_bytes=int(cfg.pipeline.max_queued_mb * (1 << 20)),
            group_commit_ms=cfg.outbox.group_commit_ms, group_commit_max=cfg.outbox.group_commit_max,
            preview=self.preview)
        self.flow.shadow = self.shadow = start_shadow(cfg, self.sink, self.station, self.alarms.set)
        self.flow.recipe_model = recipes.model
        if cfg.opcua.enabled:  # before flow.start(): results of triggers recovered at start reach the PLC too
            from edge.opcua import attach
            self.opcua = attach(cfg, self.flow, self.alarms)
        self.flow.start()
        if self.opcua is not None:
            self.opcua.handshake.set_ready(True)
        self.notifier.ready(f"inspecting {self.source.name} with {self.model.info['name']} {self.model.info['version']}")
        log.info("station %s ready: source %s, topics %s/#", self.station_key, self.source.name, cfg.base_topic)

    def _status_payload(self) -> dict[str, Any]:
        return {"line": self.cfg.station.line, "station": self.cfg.station.name, "model": self.model.info,
                "rules": self.model.rules_dict, "mode": self.cfg.pipeline.mode, "software": __version__}

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Loop on stop_event.wait(): watchdog, stats, backlog alarm, reload, end of a finite source."""
        tick = min(0.5, self.notifier.watchdog_interval or 0.5)
        next_stats = time.monotonic() + self.cfg.metrics.stats_interval_s
        flow = self.flow
        assert flow is not None, "start() first"
        while not self.stop_event.wait(tick):
            if flow.fatal:
                log.critical("pipeline thread failed: %s; exiting so the service manager restarts us", flow.fatal)
                return EX_FAILURE
            if self.opcua is not None and not self.opcua.alive():  # the PLC would wait for a station that is gone
                log.critical("OPC UA server stopped; exiting so the service manager restarts us")
                return EX_FAILURE
            if self._healthy_for_watchdog():
                self.notifier.watchdog()
            self._refresh_gauges()
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._start_reload()
            self.selftest.tick(self.model, self.cfg.roi, busy=self._reload_thread is not None
                               and self._reload_thread.is_alive())
            if time.monotonic() >= next_stats:
                next_stats += self.cfg.metrics.stats_interval_s
                self._publish_stats()
            if flow.capture_done() and flow.idle():
                log.info("source %s finished", self.source.name)
                break
        return EX_OK

    def _healthy_for_watchdog(self) -> bool:
        """No ping when a thread died or results stopped coming while parts wait: systemd restarts us.

        Holding parts on purpose (full outbox or disk: the result thread retries, outbox_error is
        raised) is not a hang: a restart would not free space, and on a full disk we could not
        even start again. Only a thread stuck with no such reason stops the pings - including the
        capture thread in a read or decode that never returns (then the restart counts the file in
        flight, and the crash ledger quarantines it)."""
        flow = self.flow
        if flow is None or not all(t.is_alive() for t in flow.threads[1:]):
            return False
        hang_s = self.cfg.pipeline.hang_timeout_s or self._default_hang_s()
        now = time.monotonic()
        if not flow.capture_done() and now - flow.capture_beat >= hang_s:
            return False
        return flow.idle() or now - max(flow.last_progress, flow.hold_beat) < hang_s

    def _default_hang_s(self) -> float:
        """Longer than any wait the source itself may make (stall, open and read timeouts)."""
        src = self.cfg.source
        waits = [3 * float(getattr(src, "stall_timeout_s", 5.0)),
                 2 * (float(getattr(src, "open_timeout_s", 0.0)) + float(getattr(src, "read_timeout_s", 0.0)))]
        return max(60.0, *waits)

    def _refresh_gauges(self) -> None:
        overwritten = int(getattr(self.source, "overwritten", 0))
        if overwritten > self._overwritten:  # a live camera replaced frames the pipeline had no time for
            self.metrics.dropped.labels("camera_overwrite").inc(overwritten - self._overwritten)
            self.gate.counters.add("dropped", overwritten - self._overwritten)
            self._overwritten = overwritten
        backlog = self.outbox.count()
        self.metrics.backlog.set(backlog)
        if self.flow is not None:
            self.metrics.queue_depth.set(self.flow.queue_depth)
            self.metrics.inflight.set(self.flow.inflight)
        self.metrics.mqtt_connected.set(1 if self.sink and self.sink.connected else 0)
        if self.evidence:
            ev = self.evidence.snapshot()
            self.metrics.evidence_bytes.set(ev["disk_bytes"])
            self.metrics.evidence_queued_bytes.set(ev["queued_bytes"])
            if ev["thinned"] > self._thinned:
                self.metrics.evidence_thinned.inc(ev["thinned"] - self._thinned)
                self._thinned = ev["thinned"]
            self.evidence.tick()
        self.alarms.observe_backlog(self.outbox.fill_ratio())

    @property
    def counts(self) -> dict[str, int]:
        return self.flow.counters.snapshot(PART_COUNTS) if self.flow else {}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: 200 while every pipeline thread runs; details for the person looking."""
        alive = {t.name: t.is_alive() for t in self.flow.threads} if self.flow else {}
        details = {"station": self.station_key, "threads": alive, "alarms": self.alarms.active(),
                   "mqtt_connected": bool(self.sink and self.sink.connected), "backlog": self.outbox.count(),
                   "model": self.model.info, "counts": self.counts}
        healthy = self.flow is not None and self.flow.fatal is None and all(alive.values())
        return healthy, details

    def _publish_stats(self) -> None:
        snap = self.gate.snapshot()
        stats = {"station": self.station, "interval_s": self.cfg.metrics.stats_interval_s,
                 "throughput_fps": round(snap.pop("inspected_interval") / self.cfg.metrics.stats_interval_s, 3),
                 "latency_ms": self.latency.drain(), "counts": self.counts, **snap,
                 "queue_depth": self.flow.queue_depth if self.flow else 0,
                 "inflight": self.flow.inflight if self.flow else 0, "backlog": self.outbox.count(),
                 "outbox_fill": round(self.outbox.fill_ratio(), 4), "alarms": sorted(self.alarms.active()),
                 "model": {"name": self.model.info["name"], "version": self.model.info["version"]},
                 "mqtt": self.sink.counters() if self.sink else {},
                 "evidence": self.evidence.snapshot() if self.evidence else None}
        log.info("stats %s", stats)
        if self.sink:
            self.sink.publish_stats(stats)

    def _hold_parts(self, reason: str | None) -> None:
        """edge.lifecycle.selftest: with a reason every part gets an `error` verdict; None inspects again."""
        if self.flow is not None:
            self.flow.hold_reason = reason

    def _on_alarm(self, name: str, active: bool, message: str) -> None:
        self.metrics.alarm.labels(name).set(1 if active else 0)
        if self.sink is not None:
            self.sink.publish_alarm(name, active, message)

    # -- reload (SIGHUP) -----------------------------------------------------------------------------
    def _start_reload(self) -> None:
        if self._reload_thread is not None and self._reload_thread.is_alive():
            log.warning("reload already in progress; SIGHUP ignored")
            return
        self._reload_thread = threading.Thread(target=self._reload, name="reload", daemon=True)
        self._reload_thread.start()

    def _reload(self) -> None:
        """Build the new model first; swap only on success, so a bad package never stops the line."""
        self.notifier.reloading()
        request = model_state.pending(self.cfg.state_dir)  # install.sh: try this package, `current` not yet switched
        try:
            new_cfg = model_state.apply(load_config(self.config_path) if self.config_path else self.cfg, request)
            for section in ("station", "source", "mqtt", "state_dir", "outbox", "metrics", "pipeline", "evidence",
                            "alarms", "logging", "selftest", "recipes", "opcua"):
                if getattr(new_cfg, section) != getattr(self.cfg, section):
                    log.warning("reload: section %r changed; it takes effect only after a restart", section)
            if new_cfg.model.shadow != self.cfg.model.shadow:
                log.warning("reload: model.shadow changed; the shadow changes only after a restart")
            new_model = load_model(new_cfg)
            self.selftest.gate(new_model, new_cfg.roi, "reload", (request or {}).get("id"))  # fails: old model stays
        except (ConfigError, PackageError, OSError, RuntimeError) as e:
            self.metrics.reloads.labels("failed").inc()
            model_state.record(self.cfg.state_dir, request, error=str(e))
            self.alarms.set(MODEL_RELOAD, True, f"reload failed, still running {self.model.info['version']}: {e}")
            self.notifier.ready(f"reload failed: {str(e).splitlines()[0]}")
            return
        old, self.model = self.model, new_model
        model_state.record(self.cfg.state_dir, request, path=new_cfg.model.path, info=new_model.info)
        self.cfg = self.cfg.model_copy(update={"model": new_cfg.model, "rules": new_cfg.rules, "roi": new_cfg.roi,
                                               "frame_checks": new_cfg.frame_checks})
        if self.flow is not None:  # frames already submitted keep their runtime (Job.runtime)
            self.flow.swap(Runtime(new_model, self.cfg.frame_checks, self.cfg.roi))
        self.metrics.model.info({k: str(v) for k, v in new_model.info.items()})
        self.metrics.reloads.labels("ok").inc()
        if self.sink is not None:
            self.sink.update_status(self._status_payload())
        self.alarms.set(MODEL_RELOAD, False, f"now running {new_model.info['version']}")
        self.alarms.set(MODEL_FALLBACK, new_model.fallback is not None,
                        new_model.fallback or f"{new_model.info['version']} runs as exported")
        log.info("reloaded: model %s %s -> %s %s, rules %s", old.info["name"], old.info["version"],
                 new_model.info["name"], new_model.info["version"], new_model.rules_dict)
        self.notifier.ready(f"running {new_model.info['name']} {new_model.info['version']}")
        old.inferencer.close()  # frames in flight on the old model finish, then its memory and threads go

    # -- shutdown ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop capture, finish every part in flight, flush the outbox (bounded), say offline."""
        timeout = self.cfg.pipeline.drain_timeout_s
        self.notifier.stopping("draining")
        if self.opcua is not None:
            self.opcua.handshake.set_ready(False)  # StartJob is refused (NotReady) while parts drain
        deadline = time.monotonic() + timeout
        if self.flow is not None:
            self.flow.drain(deadline, self.notifier.watchdog)
        if hasattr(self, "source"):
            self.source.close()
        self._close_writers(deadline)
        if self.sink is not None:
            self.sink.stop(drain_timeout=max(0.5, deadline - time.monotonic()))
        self._close_services()
        log.info("station %s stopped: %s", self.station_key, self.counts)

    def _close_writers(self, deadline: float) -> None:
        """The side writers fed by the flow, once it has drained: shadow, preview, evidence."""
        if self.shadow is not None:  # its last pair counts are written and published
            self.shadow.close()
        if self.preview is not None:
            self.preview.close()
        if self.evidence is not None:  # what is queued is written (bounded: events already say "pending")
            self.evidence.close(timeout=max(1.0, deadline - time.monotonic()))

    def _close_services(self) -> None:
        """After the sink: the outbox, the trigger listener, the HTTP and OPC UA servers, the state locks."""
        if hasattr(self, "outbox"):
            self.outbox.close()
        if self.triggers is not None:
            self.triggers.close()
        if self.server is not None:
            self.server.stop()
        if self.opcua is not None:
            self.opcua.stop()
        for lock in self.locks:
            lock.release()


def run_pipeline(cfg: Config, stop_event: threading.Event, *, config_path: str | None = None,
                 reload_event: threading.Event | None = None, notifier: Notifier | None = None) -> int:
    """Run one station until stop_event is set (or a finite source ends); returns an exit code."""
    cv2.setNumThreads(cfg.pipeline.opencv_threads or -1)  # process-wide: -1 = OpenCV's default
    pipeline = Pipeline(cfg, stop_event, config_path=config_path, reload_event=reload_event, notifier=notifier)
    try:
        pipeline.start()
    except (PackageError, SourceError, ConfigError, LockHeld, OutboxUnwritable) as e:
        log.error("cannot start station %s/%s: %s", cfg.station.line, cfg.station.name, e)
        pipeline.shutdown()
        return EX_CONFIG
    except Exception:  # port in use, unwritable state_dir, ...: not a config error, still a clean exit
        log.exception("cannot start station %s/%s", cfg.station.line, cfg.station.name)
        pipeline.shutdown()
        return EX_FAILURE
    try:
        return pipeline.run()
    finally:
        deadline = _hard_deadline(cfg.pipeline.drain_timeout_s + HARD_STOP_GRACE_S)
        pipeline.shutdown()
        deadline.cancel()  # stopped in time: a process that goes on (in-process runs) must not be exited later


def _hard_deadline(seconds: float) -> threading.Timer:
    """The last bound on a stop: every wait in shutdown has its own deadline, but a stop that
    hangs anyway (a stuck driver, a lock) must not keep systemd waiting until it SIGKILLs us."""
    def expire() -> None:
        log.critical("stop did not finish within %.0f s; exiting now (unfinished parts stay uncommitted)", seconds)
        logging.shutdown()
        os._exit(EX_FAILURE)

    timer = threading.Timer(seconds, expire)
    timer.name, timer.daemon = "hard-deadline", True
    timer.start()
    return timer
