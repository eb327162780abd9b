"""Prometheus metrics, /healthz, and the latency window behind the periodic stats message.

Each pipeline gets its own CollectorRegistry, so tests and benchmarks can run several in one
process. The HTTP server binds 127.0.0.1 by default: metrics reveal production rates and
should not be open on the plant network without a firewall.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from edge.config import MetricsConfig, default_of

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """All metrics of one station pipeline."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames = Counter("edge_frames_captured", "Frames (or failures to capture) from the source.", registry=r)
        self.skipped = Counter("edge_frames_skipped", "Frames not inspected on purpose (every_nth, max_fps, "
                               "no trigger pending).", registry=r)
        self.dropped = Counter("edge_frames_dropped", "Live frames dropped because the pipeline was busy.",
                               ["reason"], registry=r)
        self.results = Counter("edge_results", "Verdicts stored in the outbox.", ["verdict"], registry=r)
        self.errors = Counter("edge_errors", "`error` verdicts by cause.", ["kind"], registry=r)
        self.duplicates = Counter("edge_results_duplicate", "Results whose event id was already in the outbox "
                                  "(re-inspection after a restart).", registry=r)
        self.triggers = Counter("edge_triggers", "Trigger messages.", ["outcome"], registry=r)
        self.latency = Histogram("edge_latency_seconds", "Capture to stored result.", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.inference = Histogram("edge_inference_seconds", "Submit to probability map.", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.queue_depth = Gauge("edge_queue_depth", "Frames waiting for inference.", registry=r)
        self.inflight = Gauge("edge_inflight", "Frames taken but not yet stored as a result.", registry=r)
        self.backlog = Gauge("edge_outbox_backlog", "Events not yet acknowledged by the broker.", registry=r)
        self.mqtt_connected = Gauge("edge_mqtt_connected", "1 while connected to the broker.", registry=r)
        self.alarm = Gauge("edge_alarm_active", "1 while the alarm is raised.", ["name"], registry=r)
        self.evidence_bytes = Gauge("edge_evidence_bytes", "Disk used by evidence files.", registry=r)
        self.evidence_queued_bytes = Gauge("edge_evidence_queued_bytes", "Frames and masks waiting for the "
                                           "background evidence writer.", registry=r)
        self.evidence_thinned = Counter("edge_evidence_thinned", "Parts whose evidence was dropped because the "
                                        "writer fell behind.", registry=r)
        self.last_result = Gauge("edge_last_result_timestamp_seconds", "When the last result was stored.", registry=r)
        self.reloads = Counter("edge_reloads", "SIGHUP reloads.", ["outcome"], registry=r)
        self.model = Info("edge_model", "Model package in use.", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LatencyWindow:
    """Recent capture->result latencies for the stats message (Prometheus keeps the histogram)."""

    def __init__(self, size: int = 10_000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def drain(self) -> dict[str, float | None]:
        """p50/p95/p99/max in ms of what came in since the last call, then start over."""
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64)
            self._values.clear()
        if values.size == 0:
            return {"p50": None, "p95": None, "p99": None, "max": None}
        p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000.0
        return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
                "max": round(float(values.max()) * 1000.0, 2)}


HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /healthz (200 healthy / 503 not, JSON details)."""

    def __init__(self, metrics: Metrics, health: HealthFn, host: str = default_of(MetricsConfig, "host"),
                 port: int = default_of(MetricsConfig, "port")) -> None:
        self.metrics, self.health = metrics, health
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics, health on /healthz", self.host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, owner.metrics.exposition())
                elif path in ("/healthz", "/health"):
                    try:
                        ok, details = owner.health()
                    except Exception as e:  # a health probe must answer, even about itself
                        ok, details = False, {"error": str(e)}
                    body = json.dumps({"healthy": ok, **details}, default=str).encode()
                    self._send(200 if ok else 503, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes every few seconds would flood the journal."""

        return Handler
