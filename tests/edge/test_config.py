"""Station config: good files load, bad ones fail with the field path and the YAML line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import Config, ConfigError, load_config, resolve_password, validate_config

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "station": {"line": "l1", "name": "s1"},
    "source": {"type": "folder", "path": "incoming"},
    "model": {"path": "pkg"},
    "state_dir": "state",
}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "station.yaml"
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    return ei.value.errors


def test_example_config_documents_a_valid_station() -> None:
    cfg = load_config(ROOT / "configs/edge/example.yaml")
    assert cfg.base_topic == "inspection/line1/station3"
    text = (ROOT / "configs/edge/example.yaml").read_text()
    # every field of every section is documented in the example
    for section, model in Config.model_fields.items():
        assert f"{section}:" in text
        sub = model.annotation
        for name in getattr(sub, "model_fields", {}):
            if name != "password":
                assert f"{name}:" in text, f"{section}.{name} missing from example.yaml"


def test_minimal_config_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, yaml.safe_dump(BASE)))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.model.path == tmp_path / "pkg"
    assert cfg.source.type == "folder" and cfg.source.path == tmp_path / "incoming"
    assert cfg.mqtt.host == "localhost" and cfg.metrics.host == "127.0.0.1"


def test_unknown_key_names_field_and_line(tmp_path: Path) -> None:
    text = "station: {line: l1, name: s1}\nsource:\n  type: folder\n  path: x\n  setle_s: 2\nmodel: {path: p}\nstate_dir: s\n"
    errs = errors_of(tmp_path, text)
    assert len(errs) == 1
    assert ":5: source.setle_s:" in errs[0] and "Extra inputs" in errs[0]


def test_wrong_type_and_bounds(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["mqtt"] = {"port": "eighteen"}
    data["pipeline"] = {"queue_size": 0}
    errs = "\n".join(errors_of(tmp_path, yaml.safe_dump(data, sort_keys=False)))
    assert "mqtt.port" in errs and "pipeline.queue_size" in errs and "greater than or equal to 1" in errs


def test_missing_field_and_bad_source_type(tmp_path: Path) -> None:
    errs = "\n".join(errors_of(tmp_path, "station: {line: l1}\nsource: {type: webcam}\nstate_dir: s\n"))
    assert "station.name: Field required" in errs
    assert "model: Field required" in errs
    assert "source:" in errs and "webcam" in errs


def test_password_in_yaml_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["mqtt"] = {"username": "edge", "password": "hunter2-secret"}
    errs = errors_of(tmp_path, yaml.safe_dump(data))
    joined = "\n".join(errs)
    assert "mqtt.password" in joined and "password_file" in joined
    assert "hunter2-secret" not in joined


def test_duplicate_key_and_yaml_syntax(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "station: {line: l1, name: s1}\nstate_dir: a\nstate_dir: b\n")
    assert errs == [f"{tmp_path / 'station.yaml'}:3: state_dir: key given twice"]
    errs = errors_of(tmp_path, "station: [unclosed\n")
    assert "not valid YAML" in errs[0] and ":2" in errs[0]
    errs = errors_of(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in errs[0]


def test_cross_field_rules(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["rules"] = {"max_region_area_mm2": 2.0}
    assert "rules: Value error, max_region_area_mm2 needs mm_per_pixel" in errors_of(tmp_path, yaml.safe_dump(data))[0]
    data = copy.deepcopy(BASE)
    data["pipeline"] = {"mode": "triggered"}
    assert "'triggered' needs a camera, video or synthetic source" in errors_of(tmp_path, yaml.safe_dump(data))[0]


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = validate_config(copy.deepcopy(BASE))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert resolve_password(cfg.mqtt) is None
    (tmp_path / "mqtt-password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_password(cfg.mqtt) == "from-credential"
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    assert resolve_password(cfg.mqtt.model_copy(update={"password_file": pw})) == "from-file"
    monkeypatch.setenv("EDGE_PW", "from-env")
    assert resolve_password(cfg.mqtt.model_copy(update={"password_env": "EDGE_PW"})) == "from-env"
    with pytest.raises(ConfigError, match="EDGE_MISSING"):
        resolve_password(cfg.mqtt.model_copy(update={"password_env": "EDGE_MISSING"}))


# -- fuzzing: any input gives a Config or a ConfigError, nothing else --------------------------------
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                  st.text(max_size=12), st.sampled_from(["camera", "video", "folder", "synthetic", "5", "3.1.1"]))
_value = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                 st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)
_paths = st.sampled_from([("station", "line"), ("source",), ("source", "type"), ("source", "path"), ("model",),
                          ("mqtt", "port"), ("mqtt", "password"), ("roi",), ("rules", "pixel_threshold"),
                          ("pipeline", "mode"), ("state_dir",), ("evidence", "quota_mb"), ("extra_key",)])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(_paths, _value), max_size=4), whole=st.one_of(st.none(), _value))
def test_fuzzed_configs_fail_cleanly(mutations: list[tuple[tuple[str, ...], Any]], whole: Any) -> None:
    data: Any = copy.deepcopy(BASE) if whole is None else whole
    for path, value in mutations:
        if not isinstance(data, dict):
            break
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or key not in node else {}
        node[path[-1]] = value
    try:
        cfg = validate_config(data)
    except ConfigError as e:
        assert e.errors and all(isinstance(x, str) and x for x in e.errors)
    else:
        assert isinstance(cfg, Config)
