#!/usr/bin/env bash
# The test suite (about 10-15 minutes on a 2-core machine). Extra arguments go to pytest,
# e.g. scripts/test.sh -m slow   for the long runs (real-data training, long fault runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
