"""Camera credentials never leave the station: the real daemon with `rtsp://user:password@` in its
camera URI (a closed localhost port, so OpenCV/FFmpeg fail and report), checked in the daemon log,
every MQTT payload (status, alarm, result, stats), /healthz and the systemd STATUS= datagrams."""

from __future__ import annotations

import json
import logging
import signal
import urllib.request
from pathlib import Path

from edge.redact import RedactingFilter, redact_uri
from tests.broker import Broker, Subscriber, free_port
from tests.daemon_proc import BASE, Daemon, alarms, station, wait_results, write_config
from tests.notify_socket import NotifySocket

PASSWORD = "S3cr3t-Pw"


def test_redact_uri_masks_userinfo_only() -> None:
    assert redact_uri("camera:rtsp://admin:secret@10.0.0.5/stream") == "camera:rtsp://admin:***@10.0.0.5/stream"
    assert redact_uri("rtsp://admin:p@ss@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"  # unescaped '@'
    assert redact_uri("open 'rtsp://tokenonly@cam/s' failed") == "open 'rtsp://***@cam/s' failed"
    assert redact_uri("http://cam/video.cgi?user=admin&password=secret&res=1") == \
        "http://cam/video.cgi?user=admin&password=***&res=1"
    assert redact_uri("rtspsrc location=rtsp://cam/s user-id=admin user-pw=secret ! appsink") == \
        "rtspsrc location=rtsp://cam/s user-id=admin user-pw=*** ! appsink"
    for untouched in ("rtsp://10.0.0.5/stream", "http://host/a@b", "camera:0", "/dev/video0", "user@host",
                      "max_pixels=1000", "bypass=1"):
        assert redact_uri(untouched) == untouched


def test_logging_filter_masks_messages_args_and_tracebacks() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    try:
        logger.warning("cannot open %s", f"rtsp://admin:{PASSWORD}@cam/s")
        try:
            raise RuntimeError(f"[rtsp @ 0x1] could not open rtsp://admin:{PASSWORD}@cam/s")
        except RuntimeError:
            logger.exception("camera failed")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2 and all(PASSWORD not in r for r in records), records
    assert "rtsp://admin:***@cam/s" in records[0] and "rtsp://admin:***@cam/s" in records[1]


def test_camera_password_never_leaves_the_station(tmp_path: Path, tiny_package: Path, broker: Broker) -> None:
    closed = free_port()  # nothing listens: FFmpeg's connection is refused and it says so
    uri = f"rtsp://admin:{PASSWORD}@127.0.0.1:{closed}/stream"
    sub = Subscriber(broker, [f"{BASE}/#"])
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    data = station(tmp_path, tiny_package, broker,
                   {"type": "camera", "uri": uri, "backend": "ffmpeg", "stall_timeout_s": 1.0, "open_timeout_s": 2.0,
                    "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
                   metrics={"enabled": True, "port": port, "stats_interval_s": 1.0}, evidence={"enabled": False})
    d = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log",
               env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        wait_results(sub, 2, 60)  # the stalled camera gives `error` parts naming the source
        assert sub.wait_for(lambda ms: any(a["alarm"] == "camera_lost" for a in alarms(sub)), 30), d.text()
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/stats" for m in ms), 30), d.text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                health = r.read().decode()
        except urllib.error.HTTPError as e:  # 503 still carries the JSON
            health = e.read().decode()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.text()
    finally:
        d.kill()
        sub.close()
        notify.close()
    payloads = {m.topic: m.payload.decode("utf-8", "replace") for m in sub.messages}
    assert {f"{BASE}/{t}" for t in ("status", "alarm", "result", "stats")} <= payloads.keys()
    places = {"daemon log": d.text(), "health": health, "sd_notify": notify.text(),
              **{f"mqtt {m.topic}": m.payload.decode("utf-8", "replace") for m in sub.messages}}
    leaks = [where for where, text in places.items() if PASSWORD in text]
    assert not leaks, f"password found in: {leaks}"
    # Redacted, not dropped: operators still see which camera it is.
    shown = f"rtsp://admin:***@127.0.0.1:{closed}/stream"
    assert shown in d.text() and shown in health and shown in notify.text()
    assert any(shown in json.dumps(json.loads(m.payload)) for m in sub.messages if m.topic.endswith("/result"))
