#!/usr/bin/env bash
# Run the whole test suite: creates .venv, installs edged with its dev and convert extras, makes sure
# mosquitto (the tests start their own brokers on free loopback ports), systemd-analyze and Chromium
# are installed, runs pytest.
# Extra arguments go to pytest, e.g.  scripts/test.sh -m "not slow"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh" "dev,convert"
ensure_test_packages
exec .venv/bin/python -m pytest "$@"
