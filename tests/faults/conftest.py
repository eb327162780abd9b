"""The fault report: every case adds one entry (parts generated, delivered, missing, duplicates,
time to recover); entries are printed, shown in the terminal summary, and written as JSON to
<pytest basetemp>/fault_report.json and, when set, to $FAULT_REPORT (scripts/fault_run.sh)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_ENTRIES: list[dict[str, Any]] = []
_PATHS: list[Path] = []


def _write() -> None:
    text = json.dumps(_ENTRIES, indent=2, default=str)
    for p in _PATHS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.fixture
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], None]:
    if not _PATHS:
        _PATHS.append(tmp_path_factory.getbasetemp() / "fault_report.json")
        if os.environ.get("FAULT_REPORT"):
            _PATHS.append(Path(os.environ["FAULT_REPORT"]))

    def add(entry: dict[str, Any]) -> None:
        entry = {"test": request.node.name, **entry}
        _ENTRIES.append(entry)
        print("FAULT-REPORT " + json.dumps(entry, default=str))
        _write()

    return add


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ENTRIES:
        return
    tr = terminalreporter
    tr.section("fault report")
    keys = ("generated", "delivered", "missing", "duplicates", "duplicates_with_other_event_id")
    for e in _ENTRIES:
        rest = {k: v for k, v in e.items() if k not in (*keys, "test", "case", "missing_ids", "messages",
                                                          "unexpected")}
        tr.write_line(f"{e.get('case', e['test'])}: " + " ".join(f"{k}={_fmt(e[k])}" for k in keys if k in e)
                      + ("  " + " ".join(f"{k}={_fmt(v)}" for k, v in rest.items()) if rest else ""))
    if _PATHS:
        tr.write_line(f"report: {', '.join(str(p) for p in _PATHS)}")
