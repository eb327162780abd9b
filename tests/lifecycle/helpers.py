"""Helpers of the lifecycle tests: the model store's links and the golden set through the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge.__main__ import main


def reset_links(store: Path) -> Path:
    """current -> versions/v1, no previous; returns the `current` link."""
    for name in ("current", "previous"):
        if os.path.lexists(store / name):
            (store / name).unlink()
    (store / "current").symlink_to("versions/v1")
    return store / "current"


def add_set(cfg: Path, images: dict[str, Path]) -> None:
    for name, path in images.items():
        assert main(["golden", "add", "--config", str(cfg), str(path), "--expect",
                     "fail" if name.startswith("defect") else "pass", "--note", name]) == 0


def assert_every_part_once(events: list[dict[str, Any]]) -> None:
    """Synthetic part ids count up from 1 (ok-000001, ng-000002, ...): a gap is a lost part."""
    indices = sorted(int(e["part_id"][3:]) for e in events)
    assert indices == list(range(1, len(events) + 1)), "a part was lost or duplicated"
