"""The page's MQTT client: indexes <base>/result, tracks status/stats/alarms/preview, publishes reviews.

Everything the page knows about the station comes through here, from the topics the daemon
already publishes; the page never talks to the daemon directly. Messages are untrusted input
(anyone with write access to the broker could send one): a malformed one is counted and dropped.
Results are indexed in batches (one SQLite transaction per FLUSH_S) by a writer thread, so a fast
line costs the page a few commits a second, not one per part. Reviews go out on <base>/review with QoS 1 and are marked published only once the broker
acknowledged them, so a review stored while the broker was down is sent after the reconnect.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Config, resolve_password
from edge.mqtt import MqttSettings, new_client
from edge.text import loads_untrusted
from edge.ui.drift import DriftWatch
from edge.ui.store import Store

log = logging.getLogger(__name__)

FLUSH_S = 0.2
PREVIEW_MAX_BYTES = 1 << 20
_EVENT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_REQUIRED = ("event_id", "part_id", "capture_ts", "verdict", "image", "model", "station")


def check_result(event: Any) -> str | None:
    """Why an incoming result cannot be indexed, or None. Only what the page relies on is checked."""
    if not isinstance(event, dict):
        return "not a JSON object"
    missing = [k for k in _REQUIRED if k not in event]
    if missing:
        return f"missing {missing}"
    if event["verdict"] not in ("pass", "fail", "error"):
        return f"unknown verdict {event['verdict']!r}"
    if not isinstance(event["part_id"], str) or not isinstance(event["event_id"], str):
        return "part_id/event_id not strings"
    if not _EVENT_ID.match(event["event_id"]):  # it goes into URLs and file names: the schema's uuid form only
        return f"event_id {event['event_id'][:80]!r} is not a uuid"
    if not isinstance(event["capture_ts"], int | float) or not isinstance(event["image"], dict) \
            or not isinstance(event["model"], dict):
        return "capture_ts/image/model of the wrong type"
    return None


class StationListener:
    """Subscribes to <base>/{result,status,stats,alarm}; `version` grows with every change the live view shows."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg, self.store = cfg, store
        self.base = cfg.base_topic
        self.topic_review = f"{self.base}/review"
        self.topic_alarm = f"{self.base}/alarm"
        self._lock = threading.Lock()
        self.connected = False
        self.subscribed = threading.Event()  # set once the broker confirmed the subscriptions
        self.status: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.active_alarms: dict[str, str] = {}
        self.dropped = 0
        self.version = 0
        self._pending: dict[int, int] = {}  # paho mid -> review id
        self._batch: list[tuple[dict[str, Any], bytes]] = []
        self.latest: dict[str, Any] | None = None  # newest result seen, before it is indexed
        self.preview: bytes | None = None  # newest JPEG on <base>/preview (edge.preview), memory only
        self.preview_seq = 0
        self.preview_event = ""  # the event the preview shows (MQTT 5 user property), "" if unknown
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="ui-index", daemon=True)
        self.drift = DriftWatch(cfg.ui.drift, self._drift_alarm)
        m = cfg.mqtt
        self._v5 = m.protocol == "5"
        # A fixed client id and a persistent session: results that arrive while the page restarts are
        # queued by the broker (mqtt.session_expiry_s, as for the daemon's triggers) and indexed after.
        self.client = new_client(  # the station's protocol, credentials and TLS, as the daemon's sink
            MqttSettings(m, password=resolve_password(m) if m.username is not None else None),
            f"edge-ui-{cfg.station.line}-{cfg.station.name}-{socket.gethostname()}",
            clean_session=None if self._v5 else not m.session_expiry_s)
        self.client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(max(1, m.reconnect_max_s)))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *_args: self.subscribed.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        m = self.cfg.mqtt
        self._writer.start()
        session: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = m.session_expiry_s
            session = {"clean_start": not m.session_expiry_s, "properties": props}
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive, **session)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._stop.set()
        self._writer.join(5)
        self._flush()

    def _write_loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self._flush()
            except Exception:  # a full disk must not end the page; the batch is kept for the next try
                log.exception("cannot index results")

    def _flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            added = self.store.add_events(batch)
        except Exception:
            with self._lock:
                self._batch[:0] = batch
            raise
        for event in added:
            quality = event.get("image_quality")
            sharp = quality.get("sharpness") if isinstance(quality, dict) else None
            self.drift.observe(event["verdict"], sharp if isinstance(sharp, int | float) else None)

    def _bump(self) -> None:
        with self._lock:
            self.version += 1

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("broker refused the page's connection: %s", rc)
            return
        self.connected = True
        client.subscribe([*((f"{self.base}/{t}", 1) for t in ("result", "status", "stats", "alarm")),
                          (f"{self.base}/preview", 0)])
        for review_id, payload in self.store.unpublished():
            self._send_review(review_id, payload)
        self._bump()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self.connected = False
        self.subscribed.clear()
        log.warning("disconnected from the broker: %s", rc)
        self._bump()

    # -- incoming --------------------------------------------------------------------------------
    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind == "preview":  # binary: a JPEG from edge.preview
            if msg.payload[:2] == b"\xff\xd8" and len(msg.payload) <= PREVIEW_MAX_BYTES:
                props = dict(getattr(msg.properties, "UserProperty", None) or [])
                with self._lock:
                    self.preview, self.preview_seq = bytes(msg.payload), self.preview_seq + 1
                    self.preview_event = str(props.get("event_id", ""))
            else:
                self.dropped += 1
            return
        try:
            body = loads_untrusted(msg.payload)
        except ValueError as e:
            self.dropped += 1
            log.warning("dropped a message on %s: %s", msg.topic, e)
            return
        try:
            if kind == "result":
                self._on_result(body, bytes(msg.payload))
            elif kind == "status" and isinstance(body, dict):
                self.status = body
            elif kind == "stats" and isinstance(body, dict):
                self.stats = body
            elif kind == "alarm" and isinstance(body, dict):
                self._on_alarm(body)
        except Exception:  # a hostile message must never stop the page's client
            self.dropped += 1
            log.exception("dropped a message on %s", msg.topic)
            return
        self._bump()

    def _on_result(self, event: Any, raw: bytes) -> None:
        why = check_result(event)
        if why:
            self.dropped += 1
            log.warning("dropped a result: %s", why)
            return
        with self._lock:
            self._batch.append((event, raw))  # indexed as received: no second JSON encoding
            if len(self._batch) > 10_000:  # the disk stalls: keep the newest, the daemon's outbox has them all
                del self._batch[:1000]
                self.dropped += 1000
            if self.latest is None or event["capture_ts"] >= self.latest["capture_ts"]:
                self.latest = event

    def _on_alarm(self, body: dict[str, Any]) -> None:
        name, state = str(body.get("alarm", "?")), str(body.get("state", "?"))
        message = str(body.get("message", ""))[:1000]
        with self._lock:
            if state == "raised":
                self.active_alarms[name] = message
            else:
                self.active_alarms.pop(name, None)
        ts = body.get("ts")
        self.store.add_alarm(name, state, message, float(ts) if isinstance(ts, int | float) else None)

    # -- outgoing --------------------------------------------------------------------------------
    def publish_review(self, review: dict[str, Any]) -> None:
        """Send a stored review (QoS 1); if the broker is down it goes out after the next connect."""
        if self.connected:
            self._send_review(int(review["review_id"]), json.dumps(review, separators=(",", ":")).encode())

    def _send_review(self, review_id: int, payload: bytes) -> None:
        with self._lock:
            info = self.client.publish(self.topic_review, payload, qos=1)
            self._pending[info.mid] = review_id

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        with self._lock:
            review_id = self._pending.pop(mid, None)
        if review_id is not None:
            self.store.mark_published(review_id)

    def _drift_alarm(self, name: str, active: bool, message: str) -> None:
        body = {"alarm": name, "state": "raised" if active else "cleared", "message": message,
                "line": self.cfg.station.line, "station": self.cfg.station.name, "source": "ui",
                "ts": round(time.time(), 3)}
        log.warning("alarm %s %s: %s", name, body["state"], message)
        # our own subscription to <base>/alarm records it in the history and the live state
        self.client.publish(self.topic_alarm, json.dumps(body, separators=(",", ":")), qos=1)

    # -- what the live view shows ----------------------------------------------------------------
    def station_state(self) -> dict[str, Any]:
        """One summary for the live view: state word, alarms, backlog, model, throughput."""
        with self._lock:
            alarms = dict(self.active_alarms)
        status, stats = self.status, self.stats
        model = (status.get("model") or stats.get("model") or {}) if isinstance(status, dict) else {}
        backlog = stats.get("backlog", 0) if isinstance(stats.get("backlog", 0), int) else 0
        if not self.connected:
            state = "broker down"
        elif status.get("state") == "offline":
            state = "station offline"
        elif "camera_lost" in alarms:
            state = "camera lost"
        elif backlog > 0 and "backlog_growing" in alarms:
            state = "backlog"
        elif status.get("state") == "online":
            state = "running"
        else:
            state = "waiting for the station"
        return {"state": state, "alarms": alarms, "backlog": backlog,
                "model": {"name": str(model.get("name", "?")), "version": str(model.get("version", "?"))},
                "throughput_fps": stats.get("throughput_fps"), "dropped": self.dropped}
