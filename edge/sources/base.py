"""What every frame source gives the pipeline, and the checks a frame passes before inference.

A source never returns "nothing happened" when something went wrong: a lost camera or an
unreadable file becomes a Frame with `error` set, which the pipeline turns into an `error`
verdict for that part. Silence on a line looks exactly like a stopped conveyor.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge.config import FrameChecksConfig
from edge.text import loads_untrusted

PART_ID_MAX = 128
RECIPE_NAME = r"[A-Za-z0-9_.-]{1,64}"  # as config.recipes keys


@dataclass
class Frame:
    """One capture (or one failure to capture) of one part."""

    part_id: str
    capture_ts: float  # wall clock, seconds since the epoch (file mtime for folder parts)
    image: np.ndarray | None  # None when `error` is set
    error: str | None = None  # why there is no usable image; becomes an `error` verdict
    error_kind: str = ""  # one of edge.rules.ERROR_KINDS (metrics label errors{kind})
    mono_ts: float = field(default_factory=time.monotonic)  # when the source produced it: latency, staleness
    live: bool = True  # a live stream frame may be dropped or found stale; a part (file, trigger) never
    meta: dict[str, Any] = field(default_factory=dict)  # source details for the event (file name, frame index)
    held_bytes: int = 0  # what the frame path's memory budget charged for it (edge.flow), released with its result

    def fail(self, kind: str, message: str) -> None:
        """This frame cannot be judged: the flow gives its part the `error` verdict of `kind` (one of
        edge.rules.ERROR_KINDS) saying `message`. The image is let go: nothing inspects it any more."""
        self.image, self.error, self.error_kind = None, message, kind


def error_frame(part_id: str, capture_ts: float, kind: str, message: str, *, live: bool = True,
                meta: dict[str, Any] | None = None) -> Frame:
    """A part that has no usable image (lost camera, unreadable file, trigger without a frame): the one
    way a source or the trigger gate reports a failure, so it becomes that part's `error` verdict."""
    frame = Frame(part_id=part_id, capture_ts=capture_ts, image=None, live=live, meta=meta or {})
    frame.fail(kind, message)
    return frame


@runtime_checkable
class FrameSource(Protocol):
    """Small seam between capture and the pipeline: open, read, commit, close."""

    name: str

    def open(self) -> None:
        """Acquire the device or folder; raise SourceError when that is impossible by configuration."""

    def read(self, timeout: float) -> Frame | None:
        """Next frame, an error Frame, or None when nothing is due within `timeout` seconds."""

    def commit(self, frame: Frame, ok: bool) -> None:
        """The frame's result is durable: a folder moves its file to done/ (ok) or failed/."""

    def close(self) -> None:
        """Release everything; safe to call twice."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source (video with stop_at_end, counted synthetic) has nothing more."""


class SourceError(RuntimeError):
    """The source cannot work with this configuration (missing folder, ...): a startup failure."""


def now_part_id(prefix: str, ts: float, counter: int) -> str:
    """Readable, unique part id for free-running frames that have no id of their own."""
    stamp = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    return f"{prefix}-{stamp}Z-{counter}"


def valid_part_id(value: Any) -> str | None:
    """The part id if it is safe to put in events, topics of consumers and file names, else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not 0 < len(value) <= PART_ID_MAX or not value.isprintable() or "/" in value or "\\" in value:
        return None
    return value


@dataclass(frozen=True)
class TriggerFields:
    """What a trigger message says: the part id, and optionally the PLC's sequence number and send time.

    `problem` names an optional field that is present but unusable: the part id is known, so the
    part gets an `error` verdict (the PLC waits for a result) rather than being dropped as malformed.
    """

    part_id: str
    seq: int | None = None  # PLC counter, +1 per part: a gap or a repeat is detected and alarmed
    ts: float | None = None  # PLC send time, epoch seconds: a trigger that arrives late is detected
    problem: str | None = None
    recipe: str | None = None  # named rule set of the station config (`recipes:`) this part is judged by


def parse_trigger(payload: bytes) -> str:
    """Part id of a trigger message: JSON {"part_id": "..."} or the plain text id.

    Raises ValueError with a short reason for anything else; the caller counts and logs it.
    """
    return parse_trigger_fields(payload).part_id


def parse_trigger_fields(payload: bytes) -> TriggerFields:
    """Like parse_trigger, plus the optional JSON fields "seq" (integer >= 0), "ts" (epoch seconds) and
    "recipe" (a name of the station's `recipes:`; whether it exists is the gate's question)."""
    if len(payload) > 4096:
        raise ValueError(f"payload too large ({len(payload)} bytes)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("payload is not UTF-8") from None
    stripped = text.strip()
    if stripped.startswith(("{", "[", '"')):
        try:
            data = loads_untrusted(stripped)
        except ValueError:
            raise ValueError("payload looks like JSON but does not parse") from None
        fields = data if isinstance(data, dict) else {}
        part = valid_part_id(fields.get("part_id") if isinstance(data, dict) else data)
        if part is None:
            raise ValueError('JSON trigger needs {"part_id": "<1-128 printable characters, no slashes>"}')
        return _optional_fields(part, fields)
    part = valid_part_id(stripped)
    if part is None:
        raise ValueError("plain-text part id must be 1-128 printable characters without slashes")
    return TriggerFields(part)


def _optional_fields(part: str, fields: dict[str, Any]) -> TriggerFields:
    """PLCs often send numbers as text: "12" and ISO-8601 times with a zone are taken too. A value
    that still does not fit is not ignored (it claims to order or date the part): `problem`."""
    seq, ts, recipe = fields.get("seq"), fields.get("ts"), fields.get("recipe")
    if recipe is not None and not (isinstance(recipe, str) and re.fullmatch(RECIPE_NAME, recipe)):
        return TriggerFields(part, problem=f'trigger field "recipe" must be a recipe name ({RECIPE_NAME}), '
                                           f'got {recipe!r:.40}')
    if isinstance(seq, str) and seq.strip().isdigit():
        seq = int(seq)
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63):
        return TriggerFields(part, problem=f'trigger field "seq" must be an integer >= 0, got {seq!r:.40}')
    if isinstance(ts, str):
        try:
            when = dt.datetime.fromisoformat(ts.strip())
            ts = when.timestamp() if when.tzinfo is not None else None
        except ValueError:
            ts = None
        if ts is None:
            return TriggerFields(part, problem=f'trigger field "ts" must be epoch seconds or ISO-8601 with a '
                                               f'time zone, got {fields["ts"]!r:.40}')
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)
                           or ts <= 0):
        return TriggerFields(part, problem=f'trigger field "ts" must be epoch seconds, got {ts!r:.40}')
    return TriggerFields(part, seq, None if ts is None else float(ts), recipe=recipe)


def check_frame(frame: Frame, checks: FrameChecksConfig, now_mono: float | None = None) -> str | None:
    """Why this frame must not be inspected, or None. Cheap: runs on every frame. The limits and
    their defaults are the station's `frame_checks` section (edge.config.FrameChecksConfig)."""
    img = frame.image
    if img is None or not isinstance(img, np.ndarray) or img.size == 0:
        return "frame is empty"
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        return f"frame has an unexpected shape {img.shape}"
    if img.dtype not in (np.uint8, np.uint16):
        return f"frame has an unsupported pixel type {img.dtype} (8 or 16 bit expected)"
    h, w = img.shape[:2]
    if h < 8 or w < 8:
        return f"frame is too small ({w}x{h}); at least 8x8 pixels expected"
    if checks.expect_width is not None and w != checks.expect_width:
        return f"frame width {w} != expected {checks.expect_width}"
    if checks.expect_height is not None and h != checks.expect_height:
        return f"frame height {h} != expected {checks.expect_height}"
    if frame.live and checks.max_age_s > 0:
        age = (time.monotonic() if now_mono is None else now_mono) - frame.mono_ts
        if age > checks.max_age_s:
            return f"stale frame: {age:.2f} s old > max_age_s {checks.max_age_s}"
    return _exposure_problem(img, checks) if checks.reject_black or checks.reject_white else None


def _exposure_problem(img: np.ndarray, checks: FrameChecksConfig) -> str | None:
    """A uniform black (lens cap, dead light) or white (blown-out) frame shows no part: why, or None."""
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 65536)))  # a strided sample: microseconds on 20 MP
    sample = img[::step, ::step].astype(np.float32)
    if img.dtype == np.uint16:
        sample /= 257.0
    mean = float(sample.mean())
    # the spread only matters for a dark or a saturated frame: a lit one (every good part) skips numpy's std
    if checks.reject_black and mean < checks.black_mean_below and (std := float(sample.std())) < checks.black_std_below:
        return f"all-black frame (mean {mean:.1f}, std {std:.1f})"
    if checks.reject_white and mean > checks.white_mean_above and (std := float(sample.std())) < checks.white_std_below:
        return f"all-white frame, saturated (mean {mean:.1f}, std {std:.1f})"
    return None
