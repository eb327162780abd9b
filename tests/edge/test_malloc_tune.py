"""The daemon fixes glibc's mmap threshold and arena count, unless the environment already did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CODE = "import json; from edge.malloc_tune import tune_malloc; print(json.dumps(tune_malloc()))"


def applied(env: dict[str, str]) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return dict(json.loads(out.stdout))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_settings_apply_and_the_environment_wins() -> None:
    clean = {k: "" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")}
    assert applied(clean) == {"MALLOC_MMAP_THRESHOLD_": 1 << 20, "MALLOC_ARENA_MAX": 4}
    assert applied({**clean, "MALLOC_ARENA_MAX": "2"}) == {"MALLOC_MMAP_THRESHOLD_": 1 << 20}
