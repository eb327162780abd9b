"""Which model the daemon really runs, for deploy/install.sh to confirm a model switch.

install.sh must not point `current` at a package the station has not loaded: a bad package
would then be picked up by the next restart. So it writes a request into the station's state
dir (`model-request.json`: {"id": ..., "path": <package folder>}) and sends SIGHUP; the reload
loads that package instead of model.path and reports the outcome in `loaded-model.json`
(written atomically after start and after every reload attempt). Only when that file names the
request with "ok": true does install.sh switch `current`; otherwise it leaves `current` alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edge.config import Config

log = logging.getLogger(__name__)

REQUEST_FILE = "model-request.json"
STATE_FILE = "loaded-model.json"


def pending(state_dir: Path) -> dict[str, Any] | None:
    """The switch install.sh asked for, or None (no file, or one that is not a valid request)."""
    path = state_dir / REQUEST_FILE
    try:
        req = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("%s unreadable (%s); reloading model.path from the config instead", path, e)
        return None
    if not (isinstance(req, dict) and isinstance(req.get("id"), str) and isinstance(req.get("path"), str)):
        log.error("%s: expected {\"id\": str, \"path\": str}; ignored", path)
        return None
    return req


def apply(cfg: Config, request: dict[str, Any] | None) -> Config:
    """cfg with model.path replaced by the requested package (a reload tries that one)."""
    if request is None:
        return cfg
    log.info("reload: install.sh request %s: trying %s", request["id"], request["path"])
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": Path(request["path"])})})


def record(state_dir: Path, request: dict[str, Any] | None, *, path: Path | None = None,
           info: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Write loaded-model.json (tmp + fsync + rename); never raises: it is a report, not the pipeline."""
    body = {"ok": error is None, "request": request["id"] if request else None,
            "path": str(path) if path is not None else (request or {}).get("path"),
            "resolved": os.path.realpath(path) if path is not None else None,
            **{k: (info or {}).get(k) for k in ("name", "version", "sha256", "package_sha256")},
            "error": error, "time": round(time.time(), 3), "pid": os.getpid()}
    out = state_dir / STATE_FILE
    tmp = out.with_suffix(".json.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as e:
        log.error("cannot write %s: %s", out, e)
