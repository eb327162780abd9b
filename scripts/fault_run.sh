#!/usr/bin/env bash
# The long fault run: the whole fault suite (tests/faults) with its slow profile included - 10 broker
# SIGKILLs, 5 network cut + black-hole cycles, 25 daemon SIGKILLs at random points, thousands of parts -
# plus the short cases (disk full, corrupt package, garbage files, camera stall, ACL, triggered parts over
# an ffmpeg network camera with resends, a link cut and a daemon SIGKILL) against the real
# daemon, a real Mosquitto and a real subscriber. About 8 minutes on 2 cores. Needs root for the tmpfs
# disk-full cases (skipped otherwise). The report (parts generated/delivered/missing/duplicates, recovery times) is
# printed at the end and written to $FAULT_REPORT (default fault-run/report.json).
# Extra arguments go to pytest, e.g.  scripts/fault_run.sh -k daemon_sigkill
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FAULT_REPORT="${FAULT_REPORT:-$PWD/fault-run/report.json}"
mkdir -p "$(dirname "$FAULT_REPORT")"
exec .venv/bin/python -m pytest tests/faults -p no:cacheprovider -ra "$@"
