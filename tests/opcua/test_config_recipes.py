"""The `opcua:` and `recipes:` config sections, the gate's recipe check for MQTT triggers, and the
rules a recipe gives a part (no daemon: these are fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import ConfigError, PipelineConfig, RulesConfig, validate_config
from edge.events import rules_hash
from edge.metrics import Metrics
from edge.model_loader import load_model
from edge.recipes import Recipes
from edge.sources.base import Frame
from edge.triggering.gate import FrameGate
from tests.daemon_proc import station


def _config(tmp_path: Path, pkg: Path, **sections: Any) -> dict[str, Any]:
    return station(tmp_path, pkg, None, {"type": "synthetic"}, pipeline={"mode": "triggered"}, **sections)


@pytest.mark.parametrize(("opcua", "says"), [
    ({"enabled": True}, "needs certificate, private_key, trusted_clients"),
    ({"enabled": True, "security_policy": "None"}, "set allow_anonymous: true"),
    ({"enabled": True, "endpoint": "http://x:1/"}, "opcua.endpoint"),
    ({"enabled": True, "security_policy": "None", "allow_anonymous": True, "max_jobs": 0}, "opcua.max_jobs"),
])
def test_opcua_section_errors_name_the_field(tmp_path: Path, tiny_package: Path, opcua: dict[str, Any],
                                             says: str) -> None:
    with pytest.raises(ConfigError) as ei:
        validate_config(_config(tmp_path, tiny_package, opcua=opcua))
    assert says in str(ei.value)


def test_opcua_needs_triggered_mode_and_recipe_names_are_checked(tmp_path: Path, tiny_package: Path) -> None:
    data = _config(tmp_path, tiny_package, opcua={"enabled": True, "security_policy": "None", "allow_anonymous": True})
    data["pipeline"] = {"mode": "free_run"}
    with pytest.raises(ConfigError, match=r"pipeline\.mode 'triggered'"):
        validate_config(data)
    with pytest.raises(ConfigError, match="recipes"):
        validate_config(_config(tmp_path, tiny_package, recipes={"a/b": {}}))
    with pytest.raises(ConfigError, match=r"recipes\.x\.min_area"):
        validate_config(_config(tmp_path, tiny_package, recipes={"x": {"min_area": -1}}))


def test_mqtt_trigger_with_an_unknown_recipe_gets_an_error_result(tmp_path: Path) -> None:
    gate = FrameGate(PipelineConfig(mode="triggered", trigger_max_age_s=0), Metrics(), recipes={"a"})
    assert gate.on_trigger(b'{"part_id": "p1", "recipe": "b"}') == "invalid"
    assert gate.on_trigger(b'{"part_id": "p2", "recipe": 7}') == "invalid"
    assert gate.on_trigger(b'{"part_id": "p3", "recipe": "a"}') == "accepted"
    errors = {f.part_id: f.error for f in gate.expired_triggers()}
    assert "unknown recipe 'b'" in str(errors["p1"]) and 'field "recipe"' in str(errors["p2"])
    frame = Frame("cam-1", 0.0, np.zeros((8, 8), np.uint8))
    assert [f.meta.get("recipe") for f in gate.admit(frame)] == ["a"]  # the part carries its recipe


def test_a_recipe_overrides_the_station_rules_field_by_field(tmp_path: Path, tiny_package: Path) -> None:
    cfg = validate_config(_config(tmp_path, tiny_package, rules={"max_defects": 2, "min_area": 9}))
    base = load_model(cfg)
    recipes = Recipes({"loose": RulesConfig(max_defects=7), "fine": RulesConfig(pixel_threshold=0.3)})
    loose, fine = recipes.model(base, "loose"), recipes.model(base, "fine")
    assert (loose.rules.max_defects, loose.params.min_area) == (7, 9)  # unset fields keep the station's
    assert (fine.rules.max_defects, fine.params.pixel_threshold) == (2, 0.3)
    assert loose.rules_dict["recipe"] == "loose" and "recipe" not in base.rules_dict
    for m in (base, loose, fine):  # the events' rules_sha256, computed once per model: of its own rules
        assert m.rules_sha256 == rules_hash(m.rules_dict)
    assert recipes.model(base, "loose") is loose and loose.inferencer is base.inferencer  # no second compile
    with pytest.raises(KeyError):
        recipes.model(base, "nope")
    base.inferencer.close()
