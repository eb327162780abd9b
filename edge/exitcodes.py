"""Exit codes of the edge commands and the daemon (one definition; commands load configs with
edge.config.load_config_or_report).

systemd and install.sh act on these: 78 (EX_CONFIG, sysexits.h) means "the config or the model
package is bad: do not restart in a loop"; 1 is a runtime failure worth a restart.
"""

from __future__ import annotations

EX_OK, EX_FAILURE, EX_USAGE, EX_CONFIG = 0, 1, 2, 78

