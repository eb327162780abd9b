"""`python -m edge promote` / `rollback`: switch the model store's `current`/`previous` links
(the layout deploy/install.sh keeps: <store>/{current,previous,versions/<id>/}) only after the
station has proven the new model on its golden set.

The order is install.sh's: the running daemon is asked to load the target first (model-request.json
+ SIGHUP, edge.lifecycle.model_state), which goes through the reload path and its golden gate; only when
loaded-model.json confirms the request do the links move, each by one rename of a new symlink, so
a reader sees the old link or the new one. A refused target leaves links and the running model as
they were. With no daemon running, the golden set is run here instead. Every attempt, accepted or
refused, is appended to the audit log and published on `<base>/model`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.config import Config
from edge.lifecycle import audit, model_state
from edge.package import PackageError, content_hash, read_package
from edge.signature import verify_package_signature
from edge.statelock import STATE_LOCK

log = logging.getLogger(__name__)

CURRENT, PREVIOUS = "current", "previous"
LOCK_FILE = ".install.lock"  # install.sh's lock (<state root>/.install.lock): one model switch at a time
MODEL_TOPIC = "model"


class PromotionError(RuntimeError):
    """The switch was refused or is impossible; the message says why, links are unchanged."""


def store_of(cfg: Config) -> Path:
    """The model store whose `current` link the station's model.path is."""
    path = cfg.model.path
    if path.name != CURRENT or not path.is_symlink():
        raise PromotionError(f"model.path {path} is not the `{CURRENT}` link of a model store (deploy/install.sh "
                             f"keeps <store>/{CURRENT} -> versions/<id>); promote/rollback switch that link")
    return path.parent


def read_link(store: Path, name: str) -> str | None:
    try:
        return os.readlink(store / name)
    except FileNotFoundError:
        return None


def switch_link(store: Path, name: str, target: str) -> None:
    """Point <store>/<name> at target by renaming a fresh symlink over it (atomic), then fsync the folder."""
    tmp = store / f".{name}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, store / name)
    fd = os.open(store, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(store: Path, timeout_s: float = 60.0) -> Iterator[None]:
    with open(store.parent / LOCK_FILE, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionError(f"another model switch holds {store.parent / LOCK_FILE}") from None
                time.sleep(0.2)
        yield


def running_daemon(state_dir: Path) -> int | None:
    """The pid of the daemon holding the station's state lock, or None when none runs."""
    path = state_dir / STATE_LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # we got it: nobody holds it
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
    finally:
        os.close(fd)


def switch(cfg: Config, action: str, package: Path | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """promote (to `package`, default model.shadow) or rollback (to `previous`); returns the audit
    record (ok or not)."""
    store = store_of(cfg)
    with store_lock(store):
        old = read_link(store, CURRENT)
        if action == "promote":
            package = package or cfg.model.shadow
            if package is None:
                raise PromotionError("promote needs --package DIR (or model.shadow in the config)")
            resolved = package.resolve()
            try:
                target = str(resolved.relative_to(store.resolve()))
            except ValueError:
                target = str(resolved)
        else:
            prev = read_link(store, PREVIOUS)
            if prev is None:
                raise PromotionError(f"no `{PREVIOUS}` link in {store}: nothing to roll back to")
            target = prev
        if old is not None and (store / old).resolve() == (store / target).resolve():
            raise PromotionError(f"{target} is already `{CURRENT}`")
        record: dict[str, Any] = {"action": action, "station": f"{cfg.station.line}/{cfg.station.name}",
                                  "from": old, "to": target, "ok": False, "error": None}
        try:
            record["package"] = _verify(cfg, store / target)
            record["confirmed_by"] = _confirm(cfg, store / target, action, timeout_s)
        except (PackageError, PromotionError, OSError) as e:
            record["error"] = str(e)
        if record["error"] is None:
            try:
                _switch_links(store, action, old, target)
                record["ok"] = True
            except OSError as e:  # the station runs the target already; a restart would load `current`
                record["error"] = (f"the station loaded {target} but the links were not switched ({e}): "
                                   f"`{CURRENT}` is {read_link(store, CURRENT)}; fix the store before a restart")
    written = audit.append(cfg.state_dir, record)
    publish_once(cfg, MODEL_TOPIC, written)
    return written


def _switch_links(store: Path, action: str, old: str | None, target: str) -> None:
    if action == "promote":  # previous first: if interrupted, `current` still names the old model
        if old is not None:
            switch_link(store, PREVIOUS, old)
        switch_link(store, CURRENT, target)
    else:  # current first (install.sh): if interrupted, `previous` still names the rollback target
        switch_link(store, CURRENT, target)
        if old is not None:
            switch_link(store, PREVIOUS, old)


def _verify(cfg: Config, path: Path) -> dict[str, Any]:
    if cfg.model.public_key is not None:
        verify_package_signature(path, cfg.model.public_key)
    meta = read_package(path, verify_hashes=True)
    return {"name": meta.name, "version": meta.version, "sha256": meta.files.get("model.bin", ""),
            "package_sha256": content_hash(path)}


def _confirm(cfg: Config, path: Path, action: str, timeout_s: float) -> str:
    """The running daemon loads `path` through its reload path (golden gate included); with no daemon
    the golden set is run here. PromotionError when the model is refused."""
    pid = running_daemon(cfg.state_dir)
    if pid is None:
        return _offline_selftest(cfg, path)
    req_id = f"{action}-{os.getpid()}-{time.time_ns()}"
    request = cfg.state_dir / model_state.REQUEST_FILE
    tmp = request.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"id": req_id, "path": str(path), "action": action}), encoding="utf-8")
    tmp.replace(request)
    try:
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                state = json.loads((cfg.state_dir / model_state.STATE_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("request") == req_id:
                if state.get("ok"):
                    return f"daemon pid {pid} (reload {req_id}, golden set passed)"
                raise PromotionError(f"the station (pid {pid}) refused the model, it keeps running the old one: "
                                     f"{state.get('error')}")
            time.sleep(0.1)
        raise PromotionError(f"the station (pid {pid}) did not report within {timeout_s:.0f} s "
                             f"({cfg.state_dir / model_state.STATE_FILE})")
    finally:
        with contextlib.suppress(FileNotFoundError):
            request.unlink()


def _offline_selftest(cfg: Config, path: Path) -> str:
    from edge.lifecycle.selftest import run_golden  # OpenVINO loads only here
    from edge.model_loader import load_model

    trial = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})})
    model = load_model(trial)
    try:
        result = run_golden(model, cfg.state_dir, cfg.roi, "cli", cfg.selftest.min_samples)
    finally:
        model.inferencer.close()
    if not result.ok:
        raise PromotionError(f"golden self-test failed (no daemon running, tested here): {result.summary()}")
    return f"offline golden self-test ({result.summary()})"


def publish_once(cfg: Config, name: str, body: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """QoS 1 to <base>/<name> over a short connection of its own (client id <station's>-admin, so the
    running daemon is not kicked off); best effort: the audit log is the record. False if not sent."""
    from edge.config import ConfigError
    from edge.mqtt import mqtt_settings, new_client

    try:
        s = mqtt_settings(cfg)
    except ConfigError as e:  # e.g. the password is a systemd credential of the unit, not readable here
        log.warning("event on %s/%s not published (%s); it is in the audit log", cfg.base_topic, name, e)
        return False
    client = new_client(s, f"{s.client_id}-admin")
    try:
        client.connect(s.config.host, s.config.port, keepalive=10)
        client.loop_start()
        info = client.publish(f"{cfg.base_topic}/{name}", json.dumps(body, default=str, separators=(",", ":")), qos=1)
        info.wait_for_publish(timeout_s)
        sent = info.is_published()
        client.disconnect()
        client.loop_stop()
    except (OSError, RuntimeError, ValueError, ssl.SSLError) as e:
        log.warning("event on %s/%s not published (%s); it is in the audit log", cfg.base_topic, name, e)
        return False
    if not sent:
        log.warning("event on %s/%s not confirmed within %.0f s; it is in the audit log", cfg.base_topic, name,
                    timeout_s)
    return sent
