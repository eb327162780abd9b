"""Result events: construction (with the region helpers it needs), deterministic ids, encoding, and
(test-time) schema validation. The one place an event is built: edge.flow and `edge inspect` call in.

Times: an event carries `capture_ts` (epoch seconds, plus `capture_time` ISO-8601 UTC) and
`created_ts` (when the verdict was stored in the outbox). There is deliberately no publish
time in the payload: the payload is committed to the durable outbox before it is sent and
may be resent after an outage, so its bytes must not change between attempts (consumers
de-duplicate by event_id). The MQTT sink instead attaches the send time as an MQTT 5 user
property `sent_ts`; on MQTT 3.1.1 consumers use their receive time.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

from edge.config import FrameChecksConfig
from edge.contract import Region
from edge.text import safe_part_id, safe_text

SCHEMA_VERSION = 1
SCHEMA_FILE = "event.schema.json"
VERDICTS = ("pass", "fail", "error")
# An event stays far below the broker's message limit (deploy/mosquitto: message_size_limit 1 MiB):
# regions are capped (pipeline.event_max_regions) and free text is clipped (edge.text).
EVENT_MAX_BYTES = 64 * 1024  # far below the shipped broker's message_size_limit (256 KiB)

# Fixed namespace: the same (station, part, capture time) gives the same id on any host/run.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:defect-inspection:result-event")
_NAMESPACE_BYTES = _NAMESPACE.bytes


class EventValidationError(ValueError):
    """The event does not match edge/event.schema.json."""


def event_id_for(station: str, part_id: str, capture_ts: float) -> str:
    """uuid5 over station, part id and capture time (microsecond resolution).

    Re-inspecting the same captured part after a crash yields the same id, so the outbox
    keeps one row and consumers see at most duplicates of one verdict. The time is
    formatted to microseconds so a float that went through JSON still maps to the same id.
    The part id is taken as it appears in the event (edge.text.safe_part_id), so a file
    name that is not UTF-8 has an id too, and the same one on every run.
    """
    part_id = safe_part_id(part_id)
    key = f"{station}\x1f{part_id}\x1f{float(capture_ts):.6f}"
    return _uuid5_text(key)


def _uuid5_text(name: str) -> str:
    """str(uuid.uuid5(_NAMESPACE, name)) without the UUID object (its checks and int conversions cost
    more than the SHA-1 on every result): RFC 4122 version 5 set on the digest, then 8-4-4-4-12 hex."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def rules_hash(rules: dict[str, Any]) -> str:
    """SHA-256 of the rules as canonical JSON (sorted keys, no spaces): an auditor recomputes it
    from the event's own `rules` object, and equal limits always give the same hash."""
    text = json.dumps(rules, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def iso_utc(ts: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with millisecond precision and a 'Z' suffix."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_result_event(
    *,
    station: dict[str, Any],
    seq: int,
    part_id: str,
    capture_ts: float,
    verdict: str,
    reasons: list[str],
    regions: list[dict[str, Any]],
    total_defect_area: int,
    image: dict[str, Any],
    model: dict[str, Any],
    rules: dict[str, Any],
    timings_ms: dict[str, Any],
    error: str | None = None,
    evidence: str | None = None,
    evidence_status: str | None = None,
    event_id: str | None = None,
    created_ts: float | None = None,
    region_count: int | None = None,
    part_score: float | None = None,
    part_threshold: float | None = None,
    image_quality: dict[str, Any] | None = None,
    rules_sha256: str | None = None,
) -> dict[str, Any]:
    """Assemble one result event (see edge/event.schema.json).

    `station` is {"line": ..., "name": ...}; the default event id is
    event_id_for(f"{line}/{name}", part_id, capture_ts). An `error` verdict always carries
    an error message (a broken camera must never be silent). `regions` may be the top N of
    `region_count` regions; the part id, reasons and error are escaped and clipped
    (edge.text), so any input gives valid, bounded UTF-8. `part_score`/`part_threshold`: the
    model's part decision and the threshold that judged it (None for a model without a part output,
    and the score None for an error verdict). `rules_sha256` (edge.events.rules_hash) and the model's
    `package_sha256` (edge.package.content_hash) let an auditor prove which limits and which exact
    package judged the part.
    and the score None for an error verdict). `image_quality` (edge.quality) is added only when given.
    `rules_sha256`: rules_hash(rules) when the caller has it already (edge.model_loader.LoadedModel).
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if verdict == "error" and not error:
        error = "unspecified error"
    part_id = safe_part_id(part_id)
    count = len(regions) if region_count is None else int(region_count)
    st = {"line": str(station["line"]), "name": str(station["name"])}
    if event_id is None:
        event_id = event_id_for(f"{st['line']}/{st['name']}", part_id, capture_ts)
    created = time.time() if created_ts is None else float(created_ts)
    event = {
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id,
        "seq": int(seq),
        "station": st,
        "part_id": part_id,
        "capture_ts": round(float(capture_ts), 6),
        "capture_time": iso_utc(capture_ts),
        "created_ts": round(created, 6),
        "verdict": verdict,
        "reasons": [safe_text(r) for r in reasons],
        "regions": list(regions),
        "region_count": max(count, len(regions)),
        "regions_truncated": count > len(regions),
        "total_defect_area": int(total_defect_area),
        "part_score": None if part_score is None else round(float(part_score), 6),
        "part_threshold": None if part_threshold is None else float(part_threshold),
        "image": {"width": int(image["width"]), "height": int(image["height"])},
        "model": dict(model),
        "rules": dict(rules),
        "rules_sha256": rules_hash(rules) if rules_sha256 is None else rules_sha256,
        "timings_ms": dict(timings_ms),
        "error": None if error is None else safe_text(error),
        "evidence": evidence,
        "evidence_status": evidence_status,
    }
    if image_quality is not None:
        event["image_quality"] = dict(image_quality)
    return event


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
    """One region as the event lists it; with the station's scale its area in mm2 too."""
    d = r.to_dict()
    if mm_per_pixel:
        d["area_mm2"] = round(r.area * mm_per_pixel**2, 4)
    return d


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays (and tuples inside them) without importing numpy here."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# json.dumps with options builds a new JSONEncoder per call (~4 us of a result's ~6 us); this is the one it would build
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)


def encode(event: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are refused (not valid JSON for consumers)."""
    return _ENCODER.encode(event).encode("utf-8")


def decode(payload: bytes) -> dict[str, Any]:
    data = json.loads(payload.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("event payload is not a JSON object")
    return data


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The JSON Schema shipped as package data beside this module."""
    text = resources.files("edge").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_event(event: dict[str, Any]) -> None:
    """Validate against the schema with jsonschema (a dev dependency); a minimal check without it."""
    schema = load_schema()
    try:
        import jsonschema
    except ImportError:  # runtime installs do not need jsonschema
        _minimal_check(event, schema)
        return
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(event), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
        raise EventValidationError("; ".join(msgs))


def _minimal_check(event: dict[str, Any], schema: dict[str, Any]) -> None:
    missing = [k for k in schema["required"] if k not in event]
    extra = [k for k in event if k not in schema["properties"]]
    if missing or extra:
        raise EventValidationError(f"missing keys {missing}, unexpected keys {extra}")
    if event["verdict"] not in VERDICTS:
        raise EventValidationError(f"verdict: {event['verdict']!r} is not one of {VERDICTS}")
    if event["schema_version"] != SCHEMA_VERSION:
        raise EventValidationError(f"schema_version: expected {SCHEMA_VERSION}")
