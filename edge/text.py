"""Untrusted text (file names, exception messages) made safe for events and log lines.

A hot-folder file name is whatever bytes the writer chose: on SMB/NFS shares often not
UTF-8 (Python hands them over as lone surrogates, which cannot be encoded), sometimes with
newlines or terminal escapes, up to 255 bytes. Such text must neither crash the encoder nor
forge extra log lines. `safe_text` escapes it the way Python's `ascii()` would, but only the
characters that need it (so `part-ü 1` stays readable and `b'part-\\xff\\xfe'` becomes the
text `part-\\xff\\xfe`), and bounds its length with a hash suffix. It is deterministic (the
same file gives the same part id and event id on every run) and idempotent.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PART_ID_EVENT_MAX = 256  # characters of a part id in an event (file stems can be up to 255 bytes)
MESSAGE_MAX = 1000  # characters of an error message or reason in an event
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """Non-printable characters and undecodable bytes as backslash escapes; the rest unchanged."""
    if text.isprintable() and _utf8(text):
        return text
    return "".join(ch if ch.isprintable() and _utf8(ch) else _escape_char(ch) for ch in text)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clip(text: str, max_chars: int, *, hashed: bool = False) -> str:
    """At most `max_chars` characters. `hashed`: end in '~' + 8 hex digits of the whole text
    (ids: two long names that share their start stay distinct); else say how much was cut."""
    if len(text) <= max_chars:
        return text
    if hashed:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        return f"{text[: max_chars - 9]}~{digest}"
    keep = max(0, max_chars - len(f"... ({len(text)} more characters)"))  # the count's digits are at most these
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


def safe_text(text: object, max_chars: int = MESSAGE_MAX, *, hashed: bool = False) -> str:
    """Printable, UTF-8-encodable, bounded text of anything (see module doc)."""
    return clip(escape(str(text)), max_chars, hashed=hashed)


def safe_part_id(part_id: object) -> str:
    """A part id fit for an event: escaped, at most PART_ID_EVENT_MAX characters, stable."""
    return safe_text(part_id, PART_ID_EVENT_MAX, hashed=True)


def loads_untrusted(data: bytes | bytearray | str) -> Any:
    """JSON from outside (an MQTT message, a package file) -> values, or ValueError with the reason.

    One place for every way such bytes fail: not UTF-8, not JSON, or nested too deeply for json's recursive
    decoder, whose RecursionError would otherwise escape the caller's ValueError handling (out of a paho
    callback it killed the client's network thread).
    """
    try:
        return json.loads(data if isinstance(data, str) else bytes(data).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
