"""Append-only audit log of what changed a station's judgement: model promotions and rollbacks,
golden set edits. `<state_dir>/audit.jsonl`, one JSON object per line, each write one `write`
on an O_APPEND descriptor followed by fsync, so concurrent writers never interleave a line and
a power cut loses at most the record being written (never an earlier one). `append_jsonl` and
`read_jsonl` serve other station logs of the same kind (edge.lifecycle.shadow).
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"


def append(state_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write one record (with time, user and pid added) and return it as written."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        user = str(os.getuid())
    body = {"ts": round(time.time(), 3), "user": user, "pid": os.getpid(), **record}
    append_jsonl(Path(state_dir) / AUDIT_FILE, body)
    return body


def append_jsonl(path: Path, body: dict[str, Any], sync: bool = True) -> None:
    """One line, one write on an O_APPEND descriptor (never interleaved), fsynced unless `sync` is False."""
    line = (json.dumps(body, separators=(",", ":"), default=str) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, line)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(state_dir: Path) -> list[dict[str, Any]]:
    """Every complete audit record; a torn last line (power cut mid-write) is skipped."""
    return read_jsonl(Path(state_dir) / AUDIT_FILE)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
