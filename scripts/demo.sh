#!/usr/bin/env bash
# The main job in one command: set up .venv, make sure an MQTT broker is reachable (starting a
# throwaway local mosquitto when none listens), run edged on the demo scene or a camera and print the
# MQTT events live.
#   scripts/demo.sh                 # the built-in demo scene (real photos moving along known paths)
#   scripts/demo.sh 0               # the first V4L2 camera (/dev/video0); also a file or rtsp:// URL
# Extra arguments after the source go to `edged run`, e.g. scripts/demo.sh demo --set tracker.n_init=5
# Environment: EDGED_MQTT_HOST / EDGED_MQTT_PORT (broker, default 127.0.0.1:1883), EDGED_DEMO_DEVICE
# (device id, default edged-demo), EDGED_USE_CURRENT_ENV=1 (use the edged and python on PATH, no .venv).
#
# On a broker of yours the demo publishes as its own device (edged-demo, not a real device's id) and,
# when it ends, deletes the retained messages it left there (availability, state).
set -euo pipefail
if [ -n "${EDGED_USE_CURRENT_ENV:-}" ]; then
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  PY="$(command -v python3 || command -v python)"
  ensure_mosquitto_binary() {
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || {
      echo "edged: mosquitto is missing: install it with 'sudo apt-get install mosquitto'" >&2
      return 1
    }
    export PATH="$PATH:/usr/sbin"
  }
else
  source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh" "demo"
  PY=.venv/bin/python
fi
SOURCE="${1:-demo}"
shift || true
HOST="${EDGED_MQTT_HOST:-127.0.0.1}"
PORT="${EDGED_MQTT_PORT:-1883}"
DEVICE="${EDGED_DEMO_DEVICE:-edged-demo}"
WORK="$(mktemp -d)"
pids=()
users_broker=""
cleanup() {
  # Newest first: the watcher goes before the broker it watches.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$users_broker" ]; then
    # edged has stopped: delete the retained messages the demo device left on the user's broker.
    edged watch --config config/edged.yaml --host "$HOST" --port "$PORT" --device "$DEVICE" \
      --clear-retained --timeout 10 >/dev/null || echo "edged: could not clear the retained messages of $DEVICE" >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { "$PY" -c "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)" "$1" "$2" 2>/dev/null; }

if listening "$HOST" "$PORT"; then
  echo "edged: using the MQTT broker at $HOST:$PORT (device id $DEVICE; its retained messages are removed at the end)"
  users_broker=1
else
  ensure_mosquitto_binary || exit 1
  HOST=127.0.0.1
  PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  chmod 777 "$WORK"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
  mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do listening "$HOST" "$PORT" && break; sleep 0.1; done
  listening "$HOST" "$PORT" || { echo "edged: mosquitto did not start:"; cat "$WORK/mosquitto.log"; exit 1; }
  echo "edged: started a throwaway mosquitto on $HOST:$PORT (stopped when this script ends)"
fi

extra=()
# The demo scene also has a cat and a cup; the default config tracks persons only.
[ "$SOURCE" = demo ] && extra+=(--set "detector.classes=[person, cat, cup]")
edged watch --config config/edged.yaml --host "$HOST" --port "$PORT" --device "$DEVICE" &
pids+=($!)
edged run --config config/edged.yaml --source "$SOURCE" --state-dir "$WORK/state" --set device_id="$DEVICE" \
  --set mqtt.host="$HOST" --set mqtt.port="$PORT" --set web.port=0 "${extra[@]}" "$@"
sleep 1  # let the watcher print the last messages (offline, final state) before it is stopped
