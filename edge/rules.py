"""The verdict policy: why a part passed, failed or got `error`, in one file.

1. Which limits apply: `effective_rules(package, overrides)`. The package's calibrated
   postprocess values (package.json, chosen by training's calibration) are the defaults; a line
   engineer may override any of them, and set the count and area limits below, in the station
   config's `rules:` section (or `edge inspect`'s options) without re-exporting the model. The
   daemon, `edge inspect`, training's evaluate and the demo all judge through it.
2. pass or fail: `decide(detection, rules)`. Two ways to a verdict: a model without a part
   output fails a part on its regions (`max_defects`); a model with one (a trained decision
   head, see training/core/unet.py) fails it iff its part score >= `part_threshold`, and its regions
   are only listed, not counted. The optional area limits (`max_total_area`,
   `max_region_area_mm2`) apply in both cases: a line engineer who sets them means them.
3. error: a part that cannot be judged gets the `error` verdict, never a pass, with one of the
   ERROR_KINDS below (metrics label `errors{kind}`; the event's `error` says it in words).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from edge.alarms import CAMERA_LOST, TRIGGER_SEQUENCE
from edge.config import RulesConfig
from edge.contract import Detection, NonFiniteError, PostprocessParams, Verdict

# -- error kinds: why a part got `error` ------------------------------------------------------------
# CAMERA_LOST: no frame from the camera for source.stall_timeout_s (also the alarm's name)
UNREADABLE = "unreadable"  # a folder file that does not decode as an image
NOT_A_FILE = "not_a_file"  # symlink, directory, FIFO, device named like an image
NO_MEMORY = "memory"  # the frame would not fit in the service's memory limit
QUARANTINED = "quarantined"  # in flight during source.quarantine_after_crashes crashes in a row
BAD_FRAME = "bad_frame"  # frame_checks refused it (black, wrong size), the ROI is outside it, or the model cannot take it
STALE = "stale"  # a live frame older than frame_checks.max_age_s at inference
INFERENCE = "inference"  # OpenVINO or postprocessing failed (raises model_error)
NON_FINITE = "non_finite"  # the model's map held NaN/inf (raises model_error like inference errors)
INTERNAL = "internal"  # building this part's event failed; the part still gets an error event
NO_FRAME = "no_frame"  # a trigger got no frame in time, overflowed, or its station restarted
BAD_TRIGGER = "bad_trigger"  # a trigger's optional field (seq, ts) is present but unusable
LATE_TRIGGER = "late_trigger"  # the trigger arrived after its part passed the camera (pipeline.trigger_max_age_s)
# TRIGGER_SEQUENCE: the PLC's sequence number repeated or went back (also the alarm's name)
SELFTEST = "selftest"  # the golden set disagreed and selftest.on_failure is stop: no part is judged (edge.lifecycle.selftest)
ERROR_KINDS = (CAMERA_LOST, UNREADABLE, NOT_A_FILE, NO_MEMORY, QUARANTINED, BAD_FRAME, STALE, INFERENCE, NON_FINITE,
               INTERNAL, NO_FRAME, BAD_TRIGGER, LATE_TRIGGER, TRIGGER_SEQUENCE, SELFTEST)


@dataclass(frozen=True)
class Rules:
    """Limits a part must stay within to pass."""

    max_defects: int = 0  # a part with more defect regions than this fails
    max_total_area: int | None = None  # optional: fail when total defect area exceeds this (pixels)
    max_region_area_mm2: float | None = None  # optional: fail on any region larger than this
    mm_per_pixel: float | None = None  # needed for the mm2 rule and reported in events

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EffectiveRules:
    """Every limit that decides a part's verdict; recorded in every event (`rules`)."""

    params: PostprocessParams  # how the probability map becomes regions
    rules: Rules  # how the regions (or the part score) become the verdict

    def to_dict(self) -> dict[str, Any]:
        return {**self.params.to_dict(), **self.rules.to_dict()}


_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(PostprocessParams))


def effective_rules(package: PostprocessParams, overrides: RulesConfig | None = None,
                    base: Rules | None = None) -> EffectiveRules:
    """The package's calibrated values (package.json `postprocess`) with each value the station set
    in `overrides` replacing its own; the count and area limits default to `base` (`Rules()`), so a
    recipe (edge.recipes) layers over the station's effective rules the same way.

    ValueError (or TypeError) when the result is not usable, e.g. a threshold outside (0, 1)."""
    given = {} if overrides is None else overrides.model_dump(exclude_none=True)
    params = dataclasses.replace(package, **{k: v for k, v in given.items() if k in _PARAM_FIELDS})
    params.validate()
    return EffectiveRules(params, dataclasses.replace(base or Rules(),
                                                      **{k: v for k, v in given.items() if k not in _PARAM_FIELDS}))


def decide(det: Detection, rules: Rules) -> tuple[Verdict, list[str]]:
    """Return the verdict and the reasons for a fail (empty for a pass).

    NonFiniteError when the score or a region score is NaN/inf: a comparison with NaN is
    False, so such a detection would pass; the caller turns it into an `error` verdict.
    """
    scores = [det.score, *(s for r in det.regions for s in (r.max_score, r.mean_score))]
    if det.part_score is not None:
        scores.append(det.part_score)
    if not all(math.isfinite(s) for s in scores):
        raise NonFiniteError(f"detection score is not finite (score {det.score}, part score {det.part_score}, "
                             f"{len(det.regions)} region(s))")
    reasons: list[str] = []
    if det.part_score is not None and det.part_threshold is not None:
        if det.part_score >= det.part_threshold:
            reasons.append(f"part score {det.part_score:.4f} >= part_threshold {det.part_threshold:g}")
    elif len(det.regions) > rules.max_defects:
        reasons.append(f"{len(det.regions)} defect region(s) > max_defects {rules.max_defects}")
    if rules.max_total_area is not None and det.total_area > rules.max_total_area:
        reasons.append(f"total defect area {det.total_area} px > {rules.max_total_area} px")
    if rules.max_region_area_mm2 is not None and rules.mm_per_pixel:
        px_mm2 = rules.mm_per_pixel**2
        big = [r for r in det.regions if r.area * px_mm2 > rules.max_region_area_mm2]
        if big:
            reasons.append(f"{len(big)} region(s) larger than {rules.max_region_area_mm2} mm2")
    return ("fail" if reasons else "pass"), reasons
