"""Credentials out of everything the station writes: logs, events, MQTT status/alarms/stats, health.

Cameras are commonly configured as `rtsp://user:password@host/stream`, and that URI is the
source's name, so it would travel into log lines, the systemd STATUS=, error texts that OpenCV
or FFmpeg echo back, and every payload that names the source. `redact_uri` masks the userinfo
of any `scheme://userinfo@` in a text; `RedactingFilter` applies it to every log record as a
safety net behind the explicit calls.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://userinfo@ - the userinfo is greedy up to the last '@' before the path, so an
# unescaped '@' inside a password (common in hand-written camera URIs) is masked too.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@]*(?:@[^\s/?#@]*)*)@")
# Cameras also take the password as a query parameter (video.cgi?user=admin&password=...) and
# GStreamer's rtspsrc as a property (user-pw=...).
_PARAM = re.compile(r"(?P<key>(?:^|(?<=[?&;\s]))(?:password|passwd|pass|pwd|user-pw|user_pw)=)[^&\s!]+",
                    re.IGNORECASE)


def _mask(m: re.Match[str]) -> str:
    user, sep, _password = m.group("userinfo").partition(":")
    shown = f"{user}:{MASK}" if sep and "@" not in user else MASK
    return f"{m.group('scheme')}{shown}@"


def redact_uri(text: str) -> str:
    """`rtsp://admin:secret@10.0.0.5/s` -> `rtsp://admin:***@10.0.0.5/s`; a lone user/token -> `***@`;
    `...?password=secret` and rtspsrc `user-pw=secret` -> `password=***`, `user-pw=***`."""
    if "://" in text:
        text = _USERINFO.sub(_mask, text)
    return _PARAM.sub(lambda m: m.group("key") + MASK, text) if "=" in text else text


class RedactingFilter(logging.Filter):
    """Masks URI credentials in the formatted message and the traceback of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_uri(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_uri(record.exc_text)
        return True
