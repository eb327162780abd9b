"""Which images show the same physical part, so a split never puts one part on both sides.

A camera often takes several shots of one part (exposures, lights, angles). Split those images
at random and the held-out figures are not held out: the model trained on, and the threshold was
chosen on, the same part under another light. Magnetic-Tile is such a set: its
``<type>_exp<k>_num_<n>`` images are bursts of up to 7 exposures of one tile, with rising ``k``
and nearby ``n`` (docs/benchmarks.md, "Ninth session").

`data.parts` is a regular expression searched in each image's name, with named groups:

- ``part``: images whose ``part`` text is equal show one part (e.g. ``^(?P<part>[^_]+)_view\\d``);
- ``shot`` and ``seq`` (integers): bursts. Within one category, images ordered by ``seq``
  belong to one part while ``shot`` keeps rising; a shot number that does not rise starts the
  next part. A missing shot (a burst with a gap) does not split it.

Over-merging two parts into one group only makes the split coarser; splitting one part in two
leaks it. The rules err on the merging side.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def category(self) -> str: ...


class PartRuleError(ValueError):
    """`data.parts` is not a usable rule, or matches none of the images."""


def compile_rule(pattern: str) -> re.Pattern[str]:
    """The rule as a regex, checked for the named groups it needs (a clear error otherwise)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise PartRuleError(f"data.parts: {pattern!r} is not a regular expression: {e}") from None
    names = set(rx.groupindex)
    if "part" not in names and not {"shot", "seq"} <= names:
        raise PartRuleError(f"data.parts: {pattern!r} needs a named group (?P<part>...), or both (?P<shot>...) and "
                            f"(?P<seq>...) for bursts of shots; it has {sorted(names) or 'none'}")
    return rx


def part_ids(samples: Sequence[_Named], pattern: str | None) -> tuple[dict[str, str], list[str]]:
    """(image name -> part id, names the rule did not match). Without a rule every image is its own part.

    Unmatched images stay parts of their own; a rule that matches no image at all is an error,
    since it almost surely names a different data set.
    """
    if not pattern:
        return {s.name: s.name for s in samples}, []
    rx = compile_rule(pattern)
    ids: dict[str, str] = {}
    unmatched: list[str] = []
    bursts: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for s in samples:
        m = rx.search(s.name)
        if m is None:
            ids[s.name] = s.name
            unmatched.append(s.name)
        elif "part" in rx.groupindex:
            ids[s.name] = f"part:{m.group('part')}"
        else:
            try:
                bursts[s.category].append((int(m.group("seq")), int(m.group("shot")), s.name))
            except (TypeError, ValueError):
                raise PartRuleError(f"data.parts: in image {s.name!r} the groups shot={m.group('shot')!r} and "
                                    f"seq={m.group('seq')!r} must both be integers") from None
    if samples and len(unmatched) == len(samples):
        raise PartRuleError(f"data.parts: {pattern!r} matches none of the {len(samples)} image names "
                            f"(e.g. {samples[0].name!r})")
    for category, shots in bursts.items():
        shots.sort()
        first, last_shot = "", None
        for _seq, shot, name in shots:
            if last_shot is None or shot <= last_shot:
                first = name
            ids[name] = f"burst:{category}:{first}"
            last_shot = shot
    return ids, sorted(unmatched)

