#!/usr/bin/env bash
# The test suite (about 10-15 minutes on a 2-core machine). Extra arguments go to pytest,
# e.g. scripts/test.sh -m slow   for the long runs (real-data training, long fault runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the long runs stay out unless a marker expression is given: "scripts/test.sh -q" must not
# start a 20-minute training run
case " $* " in
  *" -m "*|*" -m"[!\ ]*) ;;
  *) set -- -m "not slow" "$@" ;;
esac
exec .venv/bin/python -m pytest "$@"
