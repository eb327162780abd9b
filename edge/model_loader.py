"""Station runtime pieces derived from the config: the loaded model with its effective rules,
the persistent sequence number, and the MQTT settings. Every default lives in edge.config; the
other runtime objects take their validated config section as it is (AlarmTracker: alarms,
check_frame: frame_checks, FrameGate: pipeline, sources: source).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config import Config, FrameChecksConfig, resolve_password
from edge.contract import PostprocessParams, Region
from edge.inference import Inferencer
from edge.mqtt import MqttSettings
from edge.package import PackageError, content_hash
from edge.rules import Rules, effective_rules
from edge.signature import verify_package_signature

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A compiled package and the limits it runs with; replaced as a whole on reload."""

    inferencer: Inferencer
    params: PostprocessParams
    rules: Rules
    info: dict[str, Any]  # name, version, sha256, package_sha256, precision: recorded in every event
    rules_dict: dict[str, Any]  # every limit that decides a verdict: recorded in every event
    max_regions: int  # regions listed in an event (the largest; pipeline.event_max_regions)


def load_model(cfg: Config) -> LoadedModel:
    """Compile the package; its limits are edge.rules.effective_rules (config `rules:` over the package)."""
    m = cfg.model
    if m.public_key is not None:  # before anything trusts package.json's hashes
        verify_package_signature(m.path, m.public_key)
    inf = Inferencer(m.path, xml_name=m.file, device=m.device, num_requests=m.num_requests,
                     threads=m.threads or None, hint=m.hint, verify=m.verify_hashes)
    try:
        policy = effective_rules(inf.params, cfg.rules)
    except (TypeError, ValueError) as e:
        raise PackageError(f"{m.path}: rules are invalid: {e}") from e
    roi = None if cfg.roi is None else [cfg.roi.x, cfg.roi.y, cfg.roi.w, cfg.roi.h]
    info = {**inf.info.to_dict(), "package_sha256": content_hash(inf.model_dir)}  # the folder read at load
    return LoadedModel(inf, policy.params, policy.rules, info, {**policy.to_dict(), "roi": roi},
                       cfg.pipeline.event_max_regions)


class SeqStore:
    """Per-station sequence number that keeps increasing across restarts.

    Numbers are reserved in blocks written atomically to a small JSON file, so there is one
    fsync per block rather than per part. After a crash the unused rest of a block is
    skipped: numbers may jump but never repeat or go back.
    """

    BLOCK = 256

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._next = int(json.loads(path.read_text())["reserved"])
        except FileNotFoundError:
            self._next = 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Not worth stopping a line for: epoch milliseconds are above any count reached so far.
            self._next = int(time.time() * 1000)
            log.error("%s unreadable (%s); sequence continues at %d", path, e, self._next)
        self._reserved = self._next
        try:
            self._reserve()
        except OSError as e:  # disk full at start: start anyway; next() retries and the part waits
            log.error("cannot reserve sequence numbers in %s: %s; parts wait until it can be written", path, e)

    def _reserve(self) -> None:
        """Write the next block's end; only once it is durable may its numbers be handed out."""
        reserved = self._next + self.BLOCK
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"reserved": reserved}, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._reserved = reserved

    def next(self) -> int:
        """The next number; OSError (disk full) when a new block cannot be reserved - retry later."""
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            n = self._next
            self._next += 1
            return n


def mqtt_settings(cfg: Config) -> MqttSettings:
    """The sink's settings: the mqtt section, the station's client id and the resolved password."""
    m = cfg.mqtt
    return MqttSettings(m, m.client_id or f"edge-{cfg.station.line}-{cfg.station.name}", resolve_password(m))


def expected_size(checks: FrameChecksConfig) -> tuple[int, int]:
    """Size reported for an error part that never had an image (the schema wants a positive size)."""
    return checks.expect_width or 1, checks.expect_height or 1


def shift_regions(regions: list[Region], offset: tuple[int, int]) -> list[Region]:
    """ROI coordinates -> frame coordinates, so boxes match the saved frame."""
    ox, oy = offset
    if not (ox or oy):
        return regions
    return [Region(r.area, (r.bbox[0] + ox, r.bbox[1] + oy, r.bbox[2], r.bbox[3]),
                   (r.centroid[0] + ox, r.centroid[1] + oy), r.max_score, r.mean_score) for r in regions]


def region_dict(r: Region, mm_per_pixel: float | None) -> dict[str, Any]:
    d = r.to_dict()
    if mm_per_pixel:
        d["area_mm2"] = round(r.area * mm_per_pixel**2, 4)
    return d
