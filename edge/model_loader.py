"""Loading a model package for the station: compiled, its signature and hashes checked, judged by
its effective rules (edge.rules.effective_rules: config `rules:` over the package). Every default
lives in edge.config; the other runtime objects take their validated config section as it is
(AlarmTracker: alarms, check_frame: frame_checks, FrameGate: pipeline, sources: source,
SeqStore: edge.seqstore, MqttSettings: edge.mqtt.mqtt_settings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edge.config import Config
from edge.contract import PostprocessParams
from edge.cpu_check import CpuCheck, run_check
from edge.events import rules_hash
from edge.inference import Inferencer
from edge.membudget import map_share
from edge.package import PackageError, content_hash
from edge.rules import Rules, effective_rules
from edge.signature import verify_package_signature

log = logging.getLogger(__name__)
FP32_FILE = "fp32/model.xml"


@dataclass
class LoadedModel:
    """A compiled package and the limits it runs with; replaced as a whole on reload."""

    inferencer: Inferencer
    params: PostprocessParams
    rules: Rules
    info: dict[str, Any]  # name, version, sha256, package_sha256, precision: recorded in every event
    rules_dict: dict[str, Any]  # every limit that decides a verdict: recorded in every event
    max_regions: int  # regions listed in an event (the largest; pipeline.event_max_regions)
    map_share: float = 1.0  # map pixels a waiting part holds per frame pixel (edge.membudget.map_share): fixed at load
    cpu_check: CpuCheck | None = None  # this CPU against the export's reference (edge.cpu_check); None: no check file
    fallback: str | None = None  # why the package's FP32 IR runs instead of model.file (the daemon raises an alarm)
    # edge.events.rules_hash of rules_dict, once per model (a recipe's replace() computes its own), not per event
    rules_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.rules_sha256 = rules_hash(self.rules_dict)


def load_model(cfg: Config) -> LoadedModel:
    """Compile the package; its limits are edge.rules.effective_rules (config `rules:` over the package)."""
    m = cfg.model
    if m.public_key is not None:  # before anything trusts package.json's hashes
        verify_package_signature(m.path, m.public_key)
    inf = Inferencer(m.path, xml_name=m.file, device=m.device, num_requests=m.num_requests,
                     threads=m.threads or None, hint=m.hint, verify=m.verify_hashes)
    inf, check, fallback = _checked_on_this_cpu(inf, cfg)
    try:
        policy = effective_rules(inf.params, cfg.rules)
    except (TypeError, ValueError) as e:
        raise PackageError(f"{m.path}: rules are invalid: {e}") from e
    roi = None if cfg.roi is None else [cfg.roi.x, cfg.roi.y, cfg.roi.w, cfg.roi.h]
    info = {**inf.info.to_dict(), "package_sha256": content_hash(inf.model_dir)}  # the folder read at load
    return LoadedModel(inf, policy.params, policy.rules, info, {**policy.to_dict(), "roi": roi},
                       cfg.pipeline.event_max_regions, map_share(inf.spec.scale, inf.spec.output_stride), check, fallback)


def _checked_on_this_cpu(inf: Inferencer, cfg: Config) -> tuple[Inferencer, CpuCheck | None, str | None]:
    """The package's check tiles on this CPU (edge.cpu_check); on a mismatch its FP32 IR, if that passes.

    (inferencer to use, its check, why the FP32 IR replaced model.file or None). PackageError when
    neither computes as the export measured: running a model that is known to compute differently
    from its validation would pass parts nobody judged."""
    m = cfg.model
    if not m.cpu_check:
        return inf, None, None
    try:
        check = run_check(inf.model_dir, inf)
    except ValueError as e:
        inf.close()  # a refused model is released (a reload keeps running the old one)
        raise PackageError(str(e)) from e
    if check is None or check.passed:
        if check is not None:
            log.info("cpu check of %s: %s", m.file, check.describe())
        return inf, check, None
    reason = f"{inf.model_dir / m.file} computes differently on this CPU than where it was exported: {check.describe()}"
    if m.file == FP32_FILE or FP32_FILE not in inf.meta.files:
        inf.close()
        raise PackageError(reason + "; the package has no other IR to fall back to")
    inf.close()
    # the folder resolved at load: a `current` link switched meanwhile must not pair another version's FP32
    fp32 = Inferencer(inf.model_dir, xml_name=FP32_FILE, device=m.device, num_requests=m.num_requests,
                      threads=m.threads or None, hint=m.hint, verify=m.verify_hashes)
    try:
        check32 = run_check(fp32.model_dir, fp32)
    except ValueError as e:
        fp32.close()
        raise PackageError(str(e)) from e
    if check32 is not None and not check32.passed:
        fp32.close()
        raise PackageError(f"{reason}; its FP32 IR does too: {check32.describe()}")
    fallback = f"{reason}; running its FP32 IR instead (slower, computes as validated)"
    log.error("%s", fallback)
    return fp32, check32, fallback
