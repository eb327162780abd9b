#!/usr/bin/env bash
# The main job end to end on built-in synthetic parts (about 5 minutes on 2 cores):
# synthetic data -> train -> INT8 export -> local broker + edge daemon -> live verdicts over
# MQTT -> summary and pictures in demo-out/. Extra arguments go to `python -m training demo`
# (e.g. --out DIR, --train-minutes M, --parts N, --rate R; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m training demo --out demo-out "$@"
