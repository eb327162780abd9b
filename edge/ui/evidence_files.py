"""Finds a part's evidence files, strictly inside the evidence folder.

The event names its files by a relative prefix (`<day>/<event_id>`); that prefix arrives over
MQTT, so it is untrusted. A path is served only if its resolved form lies inside the evidence
folder and the prefix has the shape the daemon writes; `../../etc/passwd` or a symlink out of
the folder gives "no image", never a file.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any

KINDS = ("frame", "overlay", "mask")
_PREFIX = re.compile(r"^\d{4}-\d{2}-\d{2}/[0-9a-f-]{36}$")


class EvidenceFiles:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, event: dict[str, Any], kind: str) -> Path | None:
        """The file of one kind for this event, or None (not kept, not written yet, deleted, or refused)."""
        prefix = event.get("evidence")
        if kind not in KINDS or not isinstance(prefix, str) or not _PREFIX.match(prefix):
            return None
        for ext in ("png", "jpg") if kind != "mask" else ("png",):
            candidate = (self.root / f"{prefix}.{kind}.{ext}").resolve()
            if candidate.is_relative_to(self.root) and candidate.is_file():
                return candidate
        return None

    def available(self, event: dict[str, Any]) -> dict[str, bool]:
        return {kind: self.path(event, kind) is not None for kind in KINDS}

    @staticmethod
    def placeholder(kind: str) -> bytes:
        label = escape(kind if kind in KINDS else "image")
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="320" height="240" viewBox="0 0 320 240">'
                f'<rect width="320" height="240" fill="#e5e7eb"/><text x="160" y="125" font-family="sans-serif" '
                f'font-size="16" text-anchor="middle" fill="#6b7280">no {label} kept</text></svg>').encode()
