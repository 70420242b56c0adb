"""`edged watch`: subscribe to a device's topics and print what arrives (one line per message)."""

from __future__ import annotations

import argparse
import json
import sys
import threading

from edged.config import ConfigError, load_config, read_password


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (broker, prefix and device id come from it)")
    p.add_argument("--host", help="override mqtt.host")
    p.add_argument("--port", type=int, help="override mqtt.port")
    p.add_argument("--device", default=None, help="device id to watch ('+' = all devices)")
    p.add_argument("--topics", default="#", help="sub-topic filter under the device, e.g. events (default: all)")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages (0 = never)")


def run(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    m = cfg.mqtt
    device = args.device or cfg.device_id
    topic = f"{m.topic_prefix}/{device}/{args.topics}"
    done = threading.Event()
    seen = [0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if m.username:
        client.username_pw_set(m.username, read_password(m, args.config))
    if m.tls.enabled:
        # The daemon's own TLS set-up: same file resolution (next to the config) and clear errors.
        from edged.mqtt.client import build_tls_context

        client.tls_set_context(build_tls_context(m, args.config))
        client.tls_insecure_set(not m.tls.verify_hostname)

    def on_connect(c, _u, _f, rc, _p):
        if rc.is_failure:
            print(f"edged watch: connection refused: {rc}", file=sys.stderr)
            done.set()
            return
        c.subscribe(topic, qos=1)
        print(f"edged watch: subscribed to {topic} on {args.host or m.host}:{args.port or m.port}", file=sys.stderr, flush=True)

    def on_message(_c, _u, msg):
        text = msg.payload.decode("utf-8", "replace")
        try:
            body = json.loads(text)
            if isinstance(body, dict) and "type" in body:
                brief = {k: body[k] for k in ("seq", "type", "track_id", "class", "reason", "zone", "line", "direction") if k in body}
                text = json.dumps(brief)
        except ValueError:
            pass
        print(f"{msg.topic}{' (retained)' if msg.retain else ''}: {text}", flush=True)
        seen[0] += 1
        if args.count and seen[0] >= args.count:
            done.set()

    client.on_connect, client.on_message = on_connect, on_message
    client.connect_async(args.host or m.host, args.port or m.port, keepalive=30)
    client.loop_start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
