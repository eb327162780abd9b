#!/usr/bin/env bash
# Idempotent setup of a fresh Debian/Ubuntu machine for development, the demo and the tests:
# the Mosquitto broker (tests and the demo start their own instance), ffmpeg (a network camera
# for the triggered-mode fault test), shellcheck (lints deploy/install.sh), a venv with the CPU
# build of torch (pinned: a plain "torch" requirement can pull a multi-GB CUDA build), chromium +
# chromium-driver (tests/ui), and this project with its train + dev + ui extras.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

# need COMMAND PACKAGE WHY: install a Debian package unless its command is already there
need() {
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$1" ] && [ ! -x "/usr/bin/$1" ]; then
    echo "== installing $2 (Debian package: $3)"
    $SUDO apt-get install -y -q "$2" >/dev/null 2>&1 || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "$2"; }
    return 0
  fi
  return 1
}

if need mosquitto mosquitto "the tests and the demo start their own broker"; then
  # the tests start their own broker; the distribution's service is not needed
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi
need ffmpeg ffmpeg "the triggered-mode fault test streams a network camera with it" || true
need shellcheck shellcheck "tests/deploy lints deploy/install.sh" || true
need chromium chromium "tests/ui drive the station page in a real headless browser" || true
need chromedriver chromium-driver "Selenium drives chromium through it (no browser download at test time)" || true

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
  .venv/bin/pip install -q -e ".[train,dev,opcua,ui]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
