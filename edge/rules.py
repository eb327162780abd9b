"""Verdict from defect regions and the station's limits.

Defaults come from the model package (calibrated in training); a line engineer may
override any of them in the station config without re-exporting the model.

Two ways to a verdict: a model without a part output fails a part on its regions
(`max_defects`); a model with one (a trained decision head, see training/unet.py) fails it iff
its part score >= `part_threshold`, and its regions are only listed, not counted. The optional
area limits (`max_total_area`, `max_region_area_mm2`) apply in both cases: a line engineer who
sets them means them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edge.contract import Detection, NonFiniteError, Verdict


@dataclass(frozen=True)
class Rules:
    """Limits a part must stay within to pass."""

    max_defects: int = 0  # a part with more defect regions than this fails
    max_total_area: int | None = None  # optional: fail when total defect area exceeds this (pixels)
    max_region_area_mm2: float | None = None  # optional: fail on any region larger than this
    mm_per_pixel: float | None = None  # needed for the mm2 rule and reported in events

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
