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
  # policy-rc.d: a package's own service (rabbitmq-server...) is not started by the install.
  local policy=/usr/sbin/policy-rc.d created=""
  if [ ! -e "$policy" ] && [ "$(id -u)" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null || rc=$?
  if [ -n "$created" ]; then rm -f "$policy"; fi
  return $rc
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
  # Broker compatibility tests start their own NATS and RabbitMQ instances (never the system service).
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
  command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}" || {
      echo "edged: please install: sudo apt-get install ${missing[*]}" >&2
      return 1
    }
  fi
}
