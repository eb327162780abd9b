"""Loading a model package for the station: compiled, its signature and hashes checked, judged by
its effective rules (edge.rules.effective_rules: config `rules:` over the package). Every default
lives in edge.config; the other runtime objects take their validated config section as it is
(AlarmTracker: alarms, check_frame: frame_checks, FrameGate: pipeline, sources: source,
SeqStore: edge.seqstore, MqttSettings: edge.mqtt.mqtt_settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.config import Config
from edge.contract import PostprocessParams
from edge.events import rules_hash
from edge.inference import Inferencer
from edge.membudget import map_share
from edge.package import PackageError, content_hash
from edge.rules import Rules, effective_rules
from edge.signature import verify_package_signature


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
    try:
        policy = effective_rules(inf.params, cfg.rules)
    except (TypeError, ValueError) as e:
        raise PackageError(f"{m.path}: rules are invalid: {e}") from e
    roi = None if cfg.roi is None else [cfg.roi.x, cfg.roi.y, cfg.roi.w, cfg.roi.h]
    info = {**inf.info.to_dict(), "package_sha256": content_hash(inf.model_dir)}  # the folder read at load
    return LoadedModel(inf, policy.params, policy.rules, info, {**policy.to_dict(), "roi": roi},
                       cfg.pipeline.event_max_regions, map_share(inf.spec.scale, inf.spec.output_stride))
