#!/usr/bin/env bash
# The main job in one command: set up .venv, make sure an MQTT broker is reachable (starting a
# throwaway local mosquitto when none listens), run edged on the demo scene or a camera and print the
# MQTT events live.
#   scripts/demo.sh                 # the built-in demo scene (real photos moving along known paths)
#   scripts/demo.sh 0               # the first V4L2 camera (/dev/video0); also a file or rtsp:// URL
# Extra arguments after the source go to `edged run`, e.g. scripts/demo.sh demo --set tracker.n_init=5
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh" "demo"
SOURCE="${1:-demo}"
shift || true
HOST="${EDGED_MQTT_HOST:-127.0.0.1}"
PORT="${EDGED_MQTT_PORT:-1883}"
WORK="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

listening() { .venv/bin/python -c "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)" "$1" "$2" 2>/dev/null; }

if listening "$HOST" "$PORT"; then
  echo "edged: using the MQTT broker at $HOST:$PORT"
else
  ensure_mosquitto_binary || exit 1
  HOST=127.0.0.1
  PORT=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
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
edged watch --config config/edged.yaml --host "$HOST" --port "$PORT" &
pids+=($!)
edged run --config config/edged.yaml --source "$SOURCE" --state-dir "$WORK/state" \
  --set mqtt.host="$HOST" --set mqtt.port="$PORT" --set web.port=0 "${extra[@]}" "$@"
sleep 1  # let the watcher print the last messages (offline, final state) before it is stopped
