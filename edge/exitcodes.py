"""Exit codes of the edge commands and the daemon, and the one way a command loads its station config.

systemd and install.sh act on these: 78 (EX_CONFIG, sysexits.h) means "the config or the model
package is bad: do not restart in a loop"; 1 is a runtime failure worth a restart.
"""

from __future__ import annotations

import sys
from typing import Any

EX_OK, EX_FAILURE, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


def load_or_report(path: str) -> Any:
    """The station config, or None after printing every problem (the caller exits EX_CONFIG)."""
    from edge.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{path}: invalid config:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return None
