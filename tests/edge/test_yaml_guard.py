"""Hostile YAML shapes (alias bombs, deep nesting) are refused by line, fast, by both config readers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge.config import ConfigError
from edge.config import load_config as load_station
from edge.yaml_guard import YamlShapeError, check_yaml_shape
from training.core.train_config import load_config as load_training

LAUGHS = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
                 for k, p in zip("abcdefghij", ["", *"abcdefghi"], strict=True))  # 9**10 values from 10 lines
DEEP = "a: " + "[" * 3000 + "]" * 3000 + "\n"  # a RecursionError traceback in PyYAML's composer


def test_shapes_a_config_never_has_are_refused_where_they_cross_the_limit() -> None:
    with pytest.raises(YamlShapeError, match="more than 100000 values") as e:
        check_yaml_shape(LAUGHS)
    assert e.value.line == 6  # 9**6 > 100,000 at the sixth anchor
    with pytest.raises(YamlShapeError, match="nested more than 64 levels") as e:
        check_yaml_shape(DEEP)
    assert e.value.line == 1
    with pytest.raises(YamlShapeError, match="more than 10 values"):
        check_yaml_shape("x: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n", max_values=10)


def test_ordinary_anchors_and_nesting_pass() -> None:
    check_yaml_shape("base: &b {lr: 0.001, wd: 0.0}\nrun1: *b\nrun2: {<<: *b, lr: 0.01}\n")
    check_yaml_shape("a: " + "[" * 63 + "]" * 63 + "\n")  # the mapping is level 1
    check_yaml_shape("")


@pytest.mark.parametrize(("text", "words"), [(LAUGHS, ":6: expands to more than 100000 values"),
                                             (DEEP, ":1: nested more than 64 levels deep")])
def test_both_config_readers_refuse_them_fast_with_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as station:
        load_station(cfg)
    with pytest.raises(ConfigError) as training:
        load_training(cfg)
    assert time.monotonic() - t0 < 10  # the duplicate-key walk took 11 s over 9**8 values, minutes over 9**10
    assert station.value.errors == [f"{cfg}{words}" + station.value.errors[0].split(words, 1)[1]]
    assert str(training.value).startswith(f"{cfg}{words}")


def test_training_config_that_is_not_text_or_quotes_a_huge_value(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"optim:\n  lr: \xc4\x00\xff\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not a text file \(byte 13 is not UTF-8\)"):
        load_training(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("optim:\n  lr: [" + ", ".join(["1"] * 50_000) + "]\n")
    with pytest.raises(ConfigError) as e:
        load_training(huge)
    assert str(e.value).endswith("optim.lr: Input should be a valid number (got [1, 1, 1, 1, ...])")
