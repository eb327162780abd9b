#!/usr/bin/env bash
# Idempotent setup of a fresh Debian/Ubuntu machine for development, the demo and the tests:
# the Mosquitto broker (tests and the demo start their own instance), ffmpeg (a network camera
# for the triggered-mode fault test), a venv with the CPU
# build of torch (pinned: a plain "torch" requirement can pull a multi-GB CUDA build), and
# this project with its train + dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q mosquitto >/dev/null 2>&1 || { $SUDO apt-get update -q && $SUDO apt-get install -y -q mosquitto; }
  # the tests start their own broker; the distribution's service is not needed
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

if ! command -v ffmpeg >/dev/null 2>&1 && [ ! -x /usr/bin/ffmpeg ]; then
  echo "== installing ffmpeg (Debian package; the triggered-mode fault test streams a network camera with it)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q ffmpeg >/dev/null 2>&1 || { $SUDO apt-get update -q && $SUDO apt-get install -y -q ffmpeg; }
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "== installing Python packages into .venv (torch CPU build, openvino, nncf, ...)"
  .venv/bin/pip install -q --upgrade pip
  # CPU wheel of torch first; elsewhere: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[train,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
