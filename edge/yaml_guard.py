"""Shape limits for YAML config files, checked on the event stream before anything is built.

A config is a few hundred values a few levels deep. Two shapes of hostile YAML break the tools
that read one: aliases that expand a 1 kB file into billions of values (the "billion laughs":
every walk over the document, such as the duplicate-key check or an error message that prints a
value, then runs for minutes or prints gigabytes), and nesting so deep that PyYAML's recursive
composer dies with a RecursionError traceback. `check_yaml_shape` walks PyYAML's parser events,
which is linear in the text and not recursive, and refuses both with the line where the limit
was crossed. Anchors and aliases of ordinary size keep working. The station config
(edge.config) and the training config (training.core.train_config) both read through it.
"""

from __future__ import annotations

import yaml

MAX_DEPTH = 64  # nested mappings/lists; PyYAML's composer overflows Python's stack at a few hundred
MAX_VALUES = 100_000  # scalars and collections with every alias expanded


class YamlShapeError(ValueError):
    """The text is YAML of a shape no config has; `line` is 1-based (None when unknown)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line

    def at(self, path: object) -> str:
        """`path:line: message`, as both config readers report it."""
        return f"{path}:{self.line}: {self}" if self.line else f"{path}: {self}"


def check_yaml_shape(text: str, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Raise YamlShapeError if `text` nests deeper than `max_depth` or expands beyond `max_values`.

    Syntax errors are left to the loader that follows (yaml.YAMLError from here too, with its mark).
    """
    sizes: list[int] = [0]  # values inside each open collection (with aliases expanded), document at the bottom
    anchors_open: list[str | None] = []
    anchored: dict[str, int] = {}  # anchor -> the size of what it names
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(anchors_open) >= max_depth:
                raise YamlShapeError(f"nested more than {max_depth} levels deep; a config needs a few", line)
            sizes.append(1)
            anchors_open.append(event.anchor)
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size = sizes.pop()
            anchor = anchors_open.pop()
            if anchor is not None:
                anchored[anchor] = size
            added = size
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchored[event.anchor] = 1
            added = 1
        elif isinstance(event, yaml.AliasEvent):
            added = anchored.get(event.anchor or "", 1)  # an unknown alias is the composer's error to report
        else:
            continue
        sizes[-1] += added
        if sizes[-1] > max_values:
            raise YamlShapeError(f"expands to more than {max_values} values (YAML aliases repeating aliases); "
                                 "a config holds a few hundred", line)
