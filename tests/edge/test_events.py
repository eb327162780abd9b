"""Result events match the published JSON Schema; ids are deterministic."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import events
from edge.events import (
    EventValidationError,
    build_result_event,
    encode,
    event_id_for,
    load_schema,
    validate_event,
)
from edge.text import safe_part_id


def _event(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        station={"line": "line1", "name": "station3"},
        seq=7,
        part_id="P-0001",
        capture_ts=1_700_000_000.123456,
        verdict="fail",
        reasons=["region area 120 px > 50 px"],
        regions=[{"area": 120, "bbox": [10, 20, 12, 10], "centroid": [15.5, 24.0],
                  "max_score": 0.97, "mean_score": 0.81}],
        total_defect_area=120,
        image={"width": 640, "height": 480},
        model={"name": "unet-tiny", "version": "1.2.0", "sha256": "ab" * 32, "precision": "INT8"},
        rules={"max_defect_area": 50},
        timings_ms={"capture_to_result": 31.5, "preprocess": 2.0, "inference": 25.1, "postprocess": 1.2},
    )
    kw.update(over)
    return build_result_event(**kw)


def test_schema_is_valid_draft_2020_12() -> None:
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_event_validates_and_roundtrips() -> None:
    ev = _event()
    validate_event(ev)
    back = json.loads(encode(ev))
    assert back == ev
    validate_event(back)
    assert back["capture_time"] == "2023-11-14T22:13:20.123Z"
    assert back["event_id"] == event_id_for("line1/station3", "P-0001", 1_700_000_000.123456)


def test_error_event_needs_message_and_validates() -> None:
    ev = _event(verdict="error", reasons=["camera lost"], regions=[], total_defect_area=0,
                error="no frame for 2.0 s", timings_ms={"capture_to_result": 0.0})
    validate_event(ev)
    ev2 = _event(verdict="error", regions=[], total_defect_area=0)
    assert ev2["error"]  # never a silent error verdict
    validate_event(ev2)
    ev2["error"] = None
    with pytest.raises(EventValidationError):
        validate_event(ev2)


@pytest.mark.parametrize("mutate", [
    lambda e: e.update(extra=1),
    lambda e: e.update(verdict="ok"),
    lambda e: e.pop("event_id"),
    lambda e: e["regions"][0].pop("bbox"),
    lambda e: e["regions"][0].update(bbox=[1, 2, 3]),
    lambda e: e["timings_ms"].pop("capture_to_result"),
    lambda e: e.update(schema_version=2),
])
def test_invalid_events_are_rejected(mutate: Any) -> None:
    ev = _event()
    mutate(ev)
    with pytest.raises(EventValidationError):
        validate_event(ev)


def test_minimal_check_without_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_jsonschema(name: str, *a: Any, **k: Any) -> Any:
        if name == "jsonschema":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    validate_event(_event())
    with pytest.raises(EventValidationError):
        validate_event({**_event(), "bogus": 1})


def test_bad_verdict_refused_at_build() -> None:
    with pytest.raises(ValueError):
        _event(verdict="maybe")


def test_encode_handles_numpy_and_refuses_nan() -> None:
    ev = _event(regions=[{"area": np.int64(5), "bbox": np.array([1, 2, 3, 4]), "centroid": [np.float32(1.5), 2.0],
                          "max_score": np.float32(0.5), "mean_score": 0.25}])
    back = json.loads(encode(ev))
    assert back["regions"][0]["bbox"] == [1, 2, 3, 4] and back["regions"][0]["area"] == 5
    validate_event(back)
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


@settings(max_examples=50, deadline=None)
@given(station=st.text(min_size=1, max_size=20), part=st.text(max_size=20),
       ts=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_event_id_is_deterministic(station: str, part: str, ts: float) -> None:
    a = event_id_for(station, part, ts)
    assert a == event_id_for(station, part, ts)
    assert a == event_id_for(station, part, json.loads(json.dumps(ts)))  # survives a JSON round trip
    assert a != event_id_for(station + "x", part, ts)
    assert a != event_id_for(station, part, ts + 0.001)
    # the uuid module's own uuid5 (event_id_for formats the same digest itself)
    assert a == str(uuid.uuid5(events._NAMESPACE, f"{station}\x1f{safe_part_id(part)}\x1f{float(ts):.6f}"))


def test_event_ids_are_those_of_earlier_releases() -> None:
    """Consumers de-duplicate by event_id across restarts and upgrades: the ids must never change."""
    assert event_id_for("line1/station3", "P-0001", 1_700_000_000.123456) == "b04dc9c1-f571-535b-872b-44535075a682"
    assert event_id_for("l1/s1", "teil-ü✓", 0.5) == "cce92f73-aac2-5c81-8cb8-f09d0cc32564"


def test_distinct_parts_get_distinct_ids() -> None:
    ids = {event_id_for("l/s", f"P{i}", 1000.0) for i in range(1000)}
    assert len(ids) == 1000
    assert events.SCHEMA_VERSION == 1


# -- untrusted text: file names and messages (issue 14) ---------------------------------------------
@pytest.mark.parametrize(("raw", "shown"), [
    ("P-0001", "P-0001"),
    ("part-\udcff\udcfe", "part-\\xff\\xfe"),  # bytes that were not UTF-8 (os.fsdecode / surrogateescape)
    ("line\nbreak\ttab\r", "line\\nbreak\\ttab\\r"),
    ("esc\x1b[31m", "esc\\x1b[31m"),
    ("unicodé ü ☃", "unicodé ü ☃"),
    ("rtl\u202e", "rtl\\u202e"),
])
def test_safe_part_id_escapes_only_what_needs_it(raw: str, shown: str) -> None:

    assert safe_part_id(raw) == shown
    assert safe_part_id(shown) == shown  # idempotent: the source and the event may both apply it
    shown.encode("utf-8")


def test_long_ids_are_clipped_with_a_hash_and_messages_say_what_was_cut() -> None:
    from edge.text import PART_ID_EVENT_MAX, safe_part_id, safe_text

    a, b = "\udcfe" * 200 + "a", "\udcfe" * 200 + "b"
    ia, ib = safe_part_id(a), safe_part_id(b)
    assert len(ia) == len(ib) == PART_ID_EVENT_MAX and ia != ib and ia[-9] == "~"
    assert safe_part_id(a) == ia  # stable
    msg = safe_text("x" * 5000, 100)
    assert len(msg) == 100 and msg.endswith("x... (4926 more characters)")


@given(st.text(min_size=0, max_size=400))
@settings(max_examples=200, deadline=None)
def test_any_part_id_gives_a_valid_encodable_event(part_id: str) -> None:
    ev = _event(part_id=part_id, verdict="error", error=f"cannot read {part_id}\n" * 50, reasons=[part_id])
    validate_event(ev)
    back = json.loads(encode(ev))
    assert back["part_id"].isprintable() and len(back["part_id"]) <= 256 and len(back["error"]) <= 1000
    assert back["event_id"] == event_id_for("line1/station3", part_id, 1_700_000_000.123456)


def test_event_id_of_a_non_utf8_name_is_stable_and_equals_its_escaped_ids() -> None:
    raw = "part-\udcff\udcfe"
    assert event_id_for("l/s", raw, 1.5) == event_id_for("l/s", raw, 1.5) == event_id_for("l/s", "part-\\xff\\xfe", 1.5)


def test_region_count_and_truncation_are_reported_and_validated() -> None:
    region = {"area": 4, "bbox": [1, 2, 2, 2], "centroid": [1.5, 2.5], "max_score": 0.9, "mean_score": 0.8}
    full = _event()
    assert full["region_count"] == 1 and full["regions_truncated"] is False
    cut = _event(regions=[region] * 3, region_count=4000)
    validate_event(cut)
    assert cut["region_count"] == 4000 and cut["regions_truncated"] is True
    with pytest.raises(EventValidationError, match="regions"):
        validate_event({**cut, "regions": [region] * 501})
    with pytest.raises(EventValidationError, match="part_id"):
        validate_event({**cut, "part_id": "x" * 257})
    old = {k: v for k, v in cut.items() if k not in ("region_count", "regions_truncated")}
    validate_event(old)  # optional: events of earlier versions still validate


def test_log_lines_carry_hostile_names_escaped_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from edge.__main__ import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("text", "json"):
            setup_logging(fmt)
            logging.getLogger("edge.test").warning("cannot move %s", "bad\nname-\udcff\x1b.png")
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "\x1b" not in err, err
            msg = json.loads(err)["msg"] if fmt == "json" else err
            assert "cannot move bad\\nname-\\xff\\x1b.png" in msg, err
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
