"""MQTT sink: drains the durable outbox to the broker, acking rows only on a successful PUBACK.

Design (why it looks like this):
- paho's in-memory queue is not trusted across reconnects. On every CONNACK the sink drops
  paho's unacknowledged messages and resends from the outbox in seq order; duplicates carry
  the same event_id, loss is impossible because a row is deleted only after its PUBACK.
- paho calls on_publish while holding its internal message lock, so callbacks never touch the
  sender's state: they enqueue events, and a single sender thread owns the mid -> seq map.
- Persistent session (session_expiry > 0, stable client id): the broker queues QoS 1 triggers
  while the station is away. Incoming triggers are acked manually, only after `on_trigger`
  returned, i.e. after the gate stored them durably; a redelivery (DUP) of a trigger the
  broker sent before is de-duplicated by the gate, not here.
- A PUBACK reason code >= 0x80 (MQTT 5, e.g. 0x87 not authorized by an ACL) is not a delivery:
  the row stays, is retried with backoff, and the `publish_rejected` alarm is raised. MQTT
  3.1.1 cannot report this (brokers ack and drop), which is why MQTT 5 is the default; under
  3.1.1 the sink logs an error once at start and raises `mqtt_unverified_acks`.
- PUBACK 0x10 (no matching subscribers) is not a failure code, but the broker dropped the
  result: nobody had a session subscribed to it. With `no_subscribers="retry"` (the default)
  the row is treated like a rejection under the `no_subscribers` alarm; "deliver" acks it.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.alarms import CLIENT_ID_CONFLICT, MQTT_UNVERIFIED_ACKS, NO_SUBSCRIBERS, PUBLISH_REJECTED
from edge.config import Config, MqttConfig, resolve_password
from edge.mqtt_props import ResultProperties
from edge.outbox import Outbox, OutboxRow
from edge.triggering.triggers import TriggerMessage

log = logging.getLogger(__name__)

_RC_NO_MATCHING_SUBSCRIBERS = 0x10
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another connection took our client id
_RESERVED_INFLIGHT = 2  # slots left for status/alarm messages under the broker's Receive Maximum


@dataclass(frozen=True)
class MqttSettings:
    """What the sink runs with: the validated `mqtt` config section (edge.config.MqttConfig holds
    every field, bound and default) plus what is known only at start (mqtt_settings below)."""

    config: MqttConfig = field(default_factory=MqttConfig)
    client_id: str = ""  # "" = a random id; the daemon's is mqtt.client_id or edge-<line>-<station>
    password: str | None = field(default=None, repr=False)  # from password_file/_env or LoadCredential

    def __post_init__(self) -> None:
        if self.password is not None and self.config.username is None:
            raise ValueError("mqtt.password needs mqtt.username")

    @property
    def tls(self) -> bool:
        return bool(self.config.tls_ca or self.config.tls_cert)


def mqtt_settings(cfg: Config) -> MqttSettings:
    """The sink's settings: the mqtt section, the station's client id and the resolved password."""
    m = cfg.mqtt
    return MqttSettings(m, m.client_id or f"edge-{cfg.station.line}-{cfg.station.name}", resolve_password(m))


def _reason_text(reason_code: Any) -> str:
    """A PUBACK reason code as alarms and logs show it, e.g. 'Not authorized (0x87)'."""
    return f"{reason_code} (0x{int(getattr(reason_code, 'value', 0)):02X})"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def new_client(s: MqttSettings, client_id: str, **options: Any) -> mqtt.Client:
    """A paho client speaking the station's protocol with its credentials and TLS: the daemon's sink
    and the station's side connections (promote's event) alike. TLS never falls back to plaintext:
    a handshake failure is a connect failure."""
    c = s.config
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5 if c.protocol == "5" else MQTTProtocolVersion.MQTTv311,
                         **options)
    if c.username is not None:
        client.username_pw_set(c.username, s.password)
    if s.tls:
        client.tls_set(ca_certs=_str(c.tls_ca), certfile=_str(c.tls_cert), keyfile=_str(c.tls_key),
                       cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(c.tls_insecure)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on every (re)connected socket: results go out the moment they are durable.

    With Nagle's algorithm a PUBLISH written while the previous one is not yet acknowledged at the TCP
    level waits for that ACK, which the broker may delay by up to 40 ms (delayed ACK): at 80 parts/s a
    few % of the results reached their PUBACK ~45 ms late, and the median took 18 instead of 9 ms
    (docs/benchmarks.md). MQTT packets are whole messages; there is nothing to gain by coalescing them."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as e:  # a transport without TCP options (e.g. a proxy wrapper): only slower
        log.debug("mqtt: TCP_NODELAY not set on %r: %s", sock, e)


class MqttSink:
    """Publishes outbox rows to `<base_topic>/result`; status/alarm/stats beside it; /trigger in."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        base_topic: str,
        status_payload: dict[str, Any],
        on_alarm: Callable[[str, bool, str], None] | None = None,
        on_trigger: Callable[[TriggerMessage], object] | None = None,
    ) -> None:
        self.settings, self.cfg = settings, settings.config
        self.outbox = outbox
        base = base_topic.rstrip("/")
        self.topic_result, self.topic_status = f"{base}/result", f"{base}/status"
        self.topic_alarm, self.topic_stats, self.topic_trigger = f"{base}/alarm", f"{base}/stats", f"{base}/trigger"
        self.topic_preview = f"{base}/preview"
        self._status = dict(status_payload)
        self._base = base
        self._side_topics = {self.topic_alarm}  # QoS 1 side messages re-published after a reconnect
        self._subscriptions: list[str] = []  # <base>/<name> topics besides the trigger (add_subscription)
        self._on_alarm = on_alarm
        self._on_trigger = on_trigger
        self._v5 = self.cfg.protocol == "5"
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._counters = {"published": 0, "acked": 0, "rejected": 0, "no_subscribers": 0, "reconnects": 0,
                          "inflight": 0}
        self._connected = False
        self._connects = 0
        self._resumed_at: float | None = None  # monotonic time of a CONNACK that resumed a stored session
        self._window = self.cfg.max_inflight
        self._held: dict[str, set[int]] = {PUBLISH_REJECTED: set(), NO_SUBSCRIBERS: set()}  # alarm -> seqs kept
        self._ack_timeout = max(30.0, 2.0 * self.cfg.keepalive)
        # sender thread only: rows awaiting their PUBACK by seq, and (ack time, row) of recent PUBACKs
        self._sent_rows: dict[int, OutboxRow] = {}
        self._recent_acks: deque[tuple[float, OutboxRow]] = deque()
        self._thread: threading.Thread | None = None
        self._started = False
        self._client = self._make_client()

    # --- setup --------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s, c = self.settings, self.cfg
        if c.session_expiry_s and not s.client_id:
            log.warning("mqtt.session_expiry set without a fixed client id: the session can never be resumed")
        client = new_client(
            s, s.client_id or f"edge-{socket.gethostname()}-{id(self):x}",
            clean_session=None if self._v5 else not c.session_expiry_s,
            manual_ack=True,  # a trigger is acked only once the gate has stored it
        )
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)  # type: ignore[arg-type]  # floats work
        client.max_inflight_messages_set(c.max_inflight)
        client.max_queued_messages_set(0)
        self._set_will(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.message_callback_add(self.topic_trigger, self._on_trigger_message)
        client.on_message = self._on_other_message
        return client

    def _set_will(self, client: mqtt.Client) -> None:
        client.will_set(self.topic_status, self._status_bytes("offline", reason="connection lost", ts=False),
                        qos=1, retain=True)

    def _status_bytes(self, state: str, ts: bool = True, **extra: Any) -> bytes:
        body: dict[str, Any] = {"state": state, **self._status, **extra}
        if ts:
            body["ts"] = round(time.time(), 3)
        return json.dumps(body, separators=(",", ":"), default=str).encode()

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the sender thread."""
        if self._started:
            return
        self._started = True
        c = self.cfg
        log.info("mqtt connecting to %s:%d (MQTT %s%s) as %r", c.host, c.port, c.protocol,
                 ", TLS" if self.settings.tls else "", c.username)
        if not self._v5:
            msg = ("MQTT 3.1.1: a PUBACK cannot report an ACL denial or a missing subscriber; the broker acks and "
                   "drops such results, so 'nothing lost' is not verified: use mqtt.protocol 5")
            log.error(msg)
            self._alarm(MQTT_UNVERIFIED_ACKS, True, msg)
        self._thread = threading.Thread(target=self._sender, name="mqtt-sender", daemon=True)
        self._thread.start()
        session: dict[str, Any] = {}
        if self._v5:  # 3.1.1: clean_session was set on the client
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = c.session_expiry_s
            session = {"clean_start": not c.session_expiry_s, "properties": props}
        self._client.connect_async(c.host, c.port, keepalive=c.keepalive, **session)
        self._client.loop_start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Flush the outbox (up to drain_timeout), publish a retained offline status, disconnect."""
        if not self._started:
            return
        deadline = time.monotonic() + max(0.0, drain_timeout)
        while self.outbox.count() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.outbox.count()
        if left:
            log.warning("mqtt stop: %d event(s) not yet acknowledged stay in the outbox for the next start", left)
        self._events.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._connected:
            info = self._client.publish(self.topic_status, self._status_bytes("offline", reason="shutdown"),
                                        qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            except (RuntimeError, ValueError) as e:
                log.warning("offline status not confirmed: %s", e)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False
        self._started = False

    def notify_new(self) -> None:
        """Wake the sender: a row was added to the outbox."""
        self._events.put(("wake",))

    @property
    def connected(self) -> bool:
        return self._connected

    def counters(self) -> dict[str, int]:
        with self._lock:
            c = dict(self._counters)
        c["pending"] = self.outbox.count()
        c["connected"] = int(self._connected)
        return c

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    # --- side channels (best effort, not via the outbox) --------------------------------
    def publish_alarm(self, name: str, active: bool, message: str, details: dict[str, Any] | None = None) -> None:
        """QoS 1 to /alarm; queued by paho while offline and re-sent after reconnect."""
        body: dict[str, Any] = {"alarm": name, "state": "raised" if active else "cleared", "message": message,
                                **{k: v for k, v in self._status.items() if k in ("station", "line")},
                                "ts": round(time.time(), 3)}
        if details:
            body["details"] = details
        self._client.publish(self.topic_alarm, json.dumps(body, default=str, separators=(",", ":")), qos=1)

    def publish_side(self, name: str, body: dict[str, Any]) -> None:
        """QoS 1 to <base>/<name> (e.g. selftest, model), outside the outbox like alarms: queued while
        offline and re-published after a reconnect, never held for a missing subscriber."""
        topic = f"{self._base}/{name}"
        self._side_topics.add(topic)
        self._client.publish(topic, json.dumps(body, default=str, separators=(",", ":")), qos=1)

    def add_subscription(self, name: str, callback: Callable[[bytes, bool], None]) -> None:
        """Before start(): messages on <base>/<name> go to callback(payload, retained), then are acked."""
        topic = f"{self._base}/{name}"
        self._subscriptions.append(topic)

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(bytes(msg.payload), bool(msg.retain))
            except Exception:
                log.exception("handler of %s failed", msg.topic)
            client.ack(msg.mid, msg.qos)

        self._client.message_callback_add(topic, on_message)

    def publish_stats(self, stats: dict[str, Any]) -> None:
        """QoS 0 snapshot; skipped while offline (stale stats are worthless)."""
        if self._connected:
            body = {**stats, "ts": round(time.time(), 3)}
            self._client.publish(self.topic_stats, json.dumps(body, default=str, separators=(",", ":")), qos=0)

    def publish_preview(self, jpeg: bytes, event_id: str = "") -> None:
        """QoS 0 JPEG on /preview for the station page (edge.preview); skipped while offline. MQTT 5 names the
        part's event in a user property, so the page can tell whether the preview is the part it shows."""
        if self._connected:
            props = None
            if self._v5 and event_id:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("event_id", event_id)]
            self._client.publish(self.topic_preview, jpeg, qos=0, properties=props)

    def update_status(self, status_payload: dict[str, Any]) -> None:
        """Replace the birth message (e.g. after a model swap) and republish it retained."""
        self._status = dict(status_payload)
        self._set_will(self._client)  # takes effect on the next connect
        if self._connected:
            self._client.publish(self.topic_status, self._status_bytes("online"), qos=1, retain=True)

    def _alarm(self, name: str, active: bool, message: str) -> None:
        if self._on_alarm is None:
            self.publish_alarm(name, active, message)
            return
        try:
            self._on_alarm(name, active, message)
        except Exception:
            log.exception("on_alarm callback failed")

    # --- paho callbacks (network thread: never block, never touch sender state) ---------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            log.error("mqtt connection refused by %s:%d: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        # Drop paho's copies of unacked messages: results are resent from the outbox (in order);
        # alarms are re-published since they live nowhere else.
        for m in client.drop_out_messages():
            if m.topic in self._side_topics:
                client.publish(m.topic, m.payload, qos=1)
        recv_max = getattr(properties, "ReceiveMaximum", None) if self._v5 else None
        self._window = self.cfg.max_inflight
        if recv_max is not None and recv_max - _RESERVED_INFLIGHT < self._window:
            self._window = max(1, int(recv_max) - _RESERVED_INFLIGHT)
        resumed = bool(getattr(flags, "session_present", False))
        self._resumed_at = time.monotonic() if resumed else None
        if self.cfg.session_expiry_s and not resumed and self._connects:
            log.warning("mqtt broker kept no session for us: triggers sent while the station was away are lost")
        client.subscribe([(t, 1) for t in (self.topic_trigger, *self._subscriptions)])
        client.publish(self.topic_status, self._status_bytes("online"), qos=1, retain=True)
        self._connects += 1
        if self._connects > 1:
            self._count("reconnects")
        self._connected = True
        log.info("mqtt connected to %s:%d (window %d)", self.cfg.host, self.cfg.port, self._window)
        self._events.put(("connected",))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was = self._connected
        self._connected = False
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER and self._on_alarm is not None:
            # another client connected with our client id (possibly on another machine): say so, loudly
            log.error("mqtt: the broker handed our session (client id %r) to another client (0x8E); "
                      "two stations share one client id", self.settings.client_id)
            self._on_alarm(CLIENT_ID_CONFLICT, True, f"client id {self.settings.client_id!r} taken over by "
                           "another connection (MQTT reason 0x8E): two stations share one client id")
        if was:
            log.warning("mqtt disconnected: %s; will reconnect and resend unacknowledged events", reason_code)
        self._events.put(("disconnected",))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        code = int(getattr(reason_code, "value", 0))
        kind = "rejected" if reason_code.is_failure else "ok"
        if code == _RC_NO_MATCHING_SUBSCRIBERS and self._v5:
            kind = "no_subscribers"
        # the reason code itself: its text (paho looks its name up) is only needed for a row that is held
        self._events.put(("puback", mid, kind, reason_code))

    def _on_trigger_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Hand the trigger over, then ack it: it is durable by then (or deliberately ignored)."""
        if self._on_trigger is not None:
            resumed = None if self._resumed_at is None else time.monotonic() - self._resumed_at
            try:
                self._on_trigger(TriggerMessage(bytes(msg.payload), bool(msg.retain), bool(msg.dup), resumed))
            except Exception:  # e.g. the trigger store cannot write: no ack, the broker redelivers on reconnect
                log.exception("on_trigger callback failed; trigger left unacknowledged for redelivery")
                return
        client.ack(msg.mid, msg.qos)

    def _on_other_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """A message on a topic we no longer want (a subscription left in a resumed session): ack it."""
        client.ack(msg.mid, msg.qos)

    # --- sender thread --------------------------------------------------------------------
    def _sender(self) -> None:
        """Owns the mid -> (seq, sent time) map; publishes in seq order within the inflight window."""
        inflight: dict[int, tuple[int, float]] = {}
        retry: dict[int, float] = {}  # seq -> monotonic due time (rejected or unacked rows, all <= cursor)
        cursor, online = 0, False
        while True:
            events = self._next_events(self._wait_time(online, inflight, retry))
            acks: list[int] = []
            for ev in events:
                if ev[0] == "puback":
                    self._on_puback(ev, inflight, retry, acks)
                elif ev[0] in ("connected", "disconnected"):
                    if online and ev[0] == "disconnected":
                        self._requeue_recent_acks()
                    online = ev[0] == "connected"
                    cursor = 0  # resend everything unacknowledged, in order
                    inflight.clear()
                    retry.clear()
                    self._sent_rows.clear()
                elif ev[0] == "stop":
                    self._set_inflight(0)
                    return
            try:
                if acks:
                    self._acked(acks)
                if online:
                    cursor = self._send_some(cursor, inflight, retry)
            except Exception:  # e.g. a disk error in the outbox: keep the thread alive, retry from the start
                log.exception("mqtt sender error; retrying")
                cursor = 0
                inflight.clear()
                retry.clear()
                time.sleep(1.0)
            self._set_inflight(len(inflight))

    def _on_puback(self, ev: tuple[Any, ...], inflight: dict[int, tuple[int, float]], retry: dict[int, float],
                   acks: list[int]) -> None:
        """A PUBACK (sender thread): its row is acknowledged, or held for a retry (no subscribers, rejected)."""
        entry = inflight.pop(ev[1], None)
        if entry is None:
            return  # from a connection we already gave up on; the row was resent
        if ev[2] == "no_subscribers":
            self._count("no_subscribers")
            if self.cfg.no_subscribers == "deliver":
                acks.append(entry[0])
            else:
                self._hold(NO_SUBSCRIBERS, entry[0], _reason_text(ev[3]), retry)
        elif ev[2] == "rejected":
            self._count("rejected")
            self._hold(PUBLISH_REJECTED, entry[0], _reason_text(ev[3]), retry)
        else:
            acks.append(entry[0])

    def _next_events(self, timeout: float) -> list[tuple[Any, ...]]:
        try:
            events = [self._events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _wait_time(self, online: bool, inflight: dict[int, tuple[int, float]], retry: dict[int, float]) -> float:
        if not online:
            return 1.0
        now = time.monotonic()
        due = [1.0]
        due += [t - now for t in retry.values()]
        due += [sent + self._ack_timeout - now for _, sent in inflight.values()]
        return max(0.005, min(due))

    def _send_some(self, cursor: int, inflight: dict[int, tuple[int, float]], retry: dict[int, float]) -> int:
        now = time.monotonic()
        for mid, (seq, sent) in list(inflight.items()):
            if now - sent > self._ack_timeout:  # no PUBACK on a live connection: resend
                del inflight[mid]
                retry[seq] = now
        cap = self._window - len(inflight)
        for seq in sorted(s for s, due in retry.items() if due <= now):
            if cap <= 0:
                break
            del retry[seq]
            row = self.outbox.get(seq)
            if row is not None:
                if not self._publish(row, inflight):
                    return cursor
                cap -= 1
        if cap > 0:
            for row in self.outbox.pending(limit=cap, after_seq=cursor):
                if not self._publish(row, inflight):
                    break
                cursor = row.seq
        return cursor

    def _publish(self, row: OutboxRow, inflight: dict[int, tuple[int, float]]) -> bool:
        props = None
        if self._v5:
            props = ResultProperties(row.event_id, f"{time.time():.3f}")
        info = self._client.publish(row.topic, row.payload, qos=row.qos, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish of seq %d failed locally: %s", row.seq, mqtt.error_string(info.rc))
            return False
        self._count("published")
        if row.qos == 0:  # no PUBACK will come; QoS 0 rows are fire-and-forget by choice of the caller
            self._acked([row.seq])
            return True
        inflight[info.mid] = (row.seq, time.monotonic())
        if self.cfg.replay_acked_s > 0:
            self._sent_rows[row.seq] = row
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _acked(self, seqs: list[int]) -> None:
        self.outbox.ack_many(seqs)
        self._count("acked", len(seqs))
        if self.cfg.replay_acked_s > 0:
            now = time.monotonic()
            for seq in seqs:
                row = self._sent_rows.pop(seq, None)
                if row is not None:
                    self._recent_acks.append((now, row))
            while self._recent_acks and now - self._recent_acks[0][0] > self.cfg.replay_acked_s:
                self._recent_acks.popleft()
        for name, held in self._held.items():
            if held:
                held.difference_update(seqs)
                if not held:
                    self._alarm(name, False, "previously held events were delivered")

    def _requeue_recent_acks(self) -> None:
        """The connection is lost: put results acknowledged in the last `replay_acked_s` back into the outbox.

        Why: Mosquitto sends the PUBACK before its autosave writes the message, so a broker killed in
        that gap has acknowledged a result it no longer holds (seen as one lost result in ~1 of 12
        SIGKILL fault runs). Sending them again costs a duplicate with the same event_id at most."""
        now = time.monotonic()
        rows = [row for t, row in self._recent_acks if now - t <= self.cfg.replay_acked_s]
        self._recent_acks.clear()
        if rows:
            try:
                n = self.outbox.restore(rows)
            except Exception:  # a disk error must not stop the sender: what the outbox still holds goes on
                log.exception("mqtt: could not queue %d recently acknowledged result(s) again", len(rows))
                return
            log.info("mqtt: %d result(s) acknowledged in the last %.1f s queued again (same event_id, same order), "
                     "in case the broker went down before it saved them", n, self.cfg.replay_acked_s)

    def _hold(self, alarm: str, seq: int, reason: str, retry: dict[int, float]) -> None:
        """Keep a PUBACKed-but-not-delivered row in the outbox and retry it with backoff."""
        self._sent_rows.pop(seq, None)
        self.outbox.mark_attempt(seq)
        row = self.outbox.get(seq)
        attempts = row.attempts if row else 1
        c = self.cfg
        delay = min(c.reconnect_max_s, max(1.0, c.reconnect_min_s) * 2 ** min(attempts - 1, 10))
        retry[seq] = time.monotonic() + delay
        held = self._held[alarm]
        # Loud once per episode (the alarm says the rest); every retry would flood the journal.
        log.log(logging.DEBUG if held else logging.WARNING,
                "broker did not deliver event seq %d (%s); kept in the outbox, retry in %.1fs", seq, reason, delay)
        if not held:
            what = "no consumer session subscribes to" if alarm == NO_SUBSCRIBERS else "broker rejected publish to"
            self._alarm(alarm, True, f"{what} {self.topic_result}: {reason}; events kept in the outbox")
        held.add(seq)

    def _set_inflight(self, n: int) -> None:
        with self._lock:
            self._counters["inflight"] = n
