#!/usr/bin/env bash
# Shared set-up for the quick-start scripts: a virtualenv in .venv with edged installed.
# Usage: source scripts/setup-env.sh [extras]   (extras default: none, e.g. "dev,convert")
set -euo pipefail
EDGED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$EDGED_ROOT"
extras="${1:-}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "edged: please install: $* (no apt-get on this system)" >&2
    return 1
  fi
  echo "edged: installing $* with apt-get" >&2
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv python3-pip
fi
if [ ! -x .venv/bin/python ]; then
  echo "edged: creating virtualenv .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.edged-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "edged: installing edged${extras:+[$extras]} into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$EDGED_ROOT/.venv/bin:$PATH"

ensure_mosquitto_binary() {
  if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto mosquitto-clients || {
      echo "edged: mosquitto is missing: install it with 'sudo apt-get install mosquitto'" >&2
      return 1
    }
  fi
  export PATH="$PATH:/usr/sbin"
}

# Debian packages the test suite needs besides mosquitto: systemd-analyze (tests/test_systemd_unit.py
# checks the unit offline; systemd is never started) and Chromium (the browser test of the debug page).
ensure_test_packages() {
  ensure_mosquitto_binary
  local missing=()
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}" || {
      echo "edged: please install: sudo apt-get install ${missing[*]}" >&2
      return 1
    }
  fi
}
