"""`edged config push --config FILE OVERLAY.yaml [--fleet]`: publish a desired overlay with the next
version, wait for the device's report, print it; exit 0 only when it was applied.

The next version is one more than the highest of the retained desired message of the scope and the
version the device reports as applied. Which retained messages exist is learnt with the marker trick of
`edged watch --clear-retained`: subscribe to them and a private marker topic in one SUBSCRIBE, then
publish to the marker; once it comes back, every retained message has arrived before it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

from edged.config import ConfigError, load_config

EXIT_APPLIED, EXIT_NOT_APPLIED, EXIT_SETUP, EXIT_NO_ANSWER = 0, 1, 2, 3


def add_arguments(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    p.add_argument("overlay", metavar="OVERLAY", help="YAML or JSON file: the whole desired overlay of the scope "
                   "(keys left out go back to the config file's values; use --merge to change only these keys)")
    p.add_argument("--fleet", action="store_true", help="publish on <prefix>/fleet/config/desired (every device)")
    p.add_argument("--merge", action="store_true", help="merge into the scope's current overlay instead of replacing it")
    p.add_argument("--version", type=int, default=None, help="use this version instead of the next one")
    p.add_argument("--device", default=None, help="the device whose report to wait for (default: device_id of --config)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the report (default 60)")
    p.add_argument("--host", help="override mqtt.host")
    p.add_argument("--port", type=int, help="override mqtt.port")


def _say(text: str) -> None:
    print(f"edged config push: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from edged.cli_config_show import read_overlay
    from edged.mqtt.client import MqttSetupError, probe_protocol, tool_client
    from edged.mqtt.topics import Topics
    from edged.remote_config import read_hmac_secret, signed_envelope

    config_path = getattr(args, "config", None)
    try:
        cfg = load_config(config_path)
        overlay = read_overlay(args.overlay)
        secret = read_hmac_secret(cfg, config_path)
        m = cfg.mqtt
        host, port = args.host or m.host, args.port or m.port
        client = tool_client(m, config_path, probe_protocol(m, host, port, config_path))
    except (ConfigError, MqttSetupError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_SETUP
    device = args.device or cfg.device_id
    topics = Topics(m.topic_prefix, device, m.site)
    scope = "fleet" if args.fleet else "device"
    desired_topic = topics.fleet_config_desired if args.fleet else topics.config_desired
    marker = f"{m.topic_prefix}/_push/{uuid.uuid4().hex}"

    retained: Dict[str, Any] = {}
    reports: List[dict] = []
    cond = threading.Condition()
    flags = {"marker": False, "refused": None}

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            with cond:
                flags["refused"] = str(rc)
                cond.notify_all()
            return
        c.subscribe([(topics.config_reported, 1), (desired_topic, 1), (marker, 1)])

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with cond:
            if msg.topic == marker:
                flags["marker"] = True
            else:
                try:
                    body = json.loads(msg.payload)
                except ValueError:
                    body = None
                if not flags["marker"] and msg.retain:
                    retained[msg.topic] = body
                elif msg.topic == topics.config_reported and isinstance(body, dict):
                    reports.append(body)
            cond.notify_all()

    client.on_connect, client.on_message = on_connect, on_message
    client.on_subscribe = lambda c, _u, _mid, _rcs, _p: c.publish(marker, b"marker", qos=1)
    deadline = time.monotonic() + args.timeout
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        _say(f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        return EXIT_NO_ANSWER
    client.loop_start()
    try:
        with cond:
            if not cond.wait_for(lambda: flags["marker"] or flags["refused"], max(0.0, deadline - time.monotonic())):
                _say(f"{host}:{port} did not answer within {args.timeout:g} s")
                return EXIT_NO_ANSWER
        if flags["refused"]:
            _say(f"{host}:{port} refused the connection: {flags['refused']}")
            return EXIT_SETUP
        version = args.version or _next_version(retained.get(desired_topic), retained.get(topics.config_reported), scope)
        body = json.dumps({"version": version, "config": overlay, **({"merge": True} if args.merge else {})}).encode()
        payload = signed_envelope(body, secret) if secret else body
        client.publish(desired_topic, payload, qos=1, retain=True).wait_for_publish(max(0.1, deadline - time.monotonic()))
        _say(f"published version {version} on {desired_topic}{' (signed)' if secret else ''}; waiting for {device}")

        def answered() -> Optional[dict]:
            return next((r for r in reports if r.get("version") == version and r.get("scope") == scope), None)

        with cond:
            cond.wait_for(lambda: answered() is not None, max(0.0, deadline - time.monotonic()))
            report = answered()
    finally:
        client.loop_stop()
        client.disconnect()
    if report is None:
        _say(f"no report from {device} within {args.timeout:g} s (is it online and following {desired_topic}?)")
        return EXIT_NO_ANSWER
    print(json.dumps(report, indent=2))
    return EXIT_APPLIED if report.get("status") == "applied" else EXIT_NOT_APPLIED


def _next_version(desired: Any, reported: Any, scope: str) -> int:
    """One more than anything seen for the scope: the retained desired message and the applied version."""
    seen = [0]
    if isinstance(desired, dict) and isinstance(desired.get("version"), int):
        seen.append(desired["version"])
    elif isinstance(desired, dict) and isinstance(desired.get("body"), str):  # a signed envelope
        try:
            inner = json.loads(desired["body"])
            if isinstance(inner.get("version"), int):
                seen.append(inner["version"])
        except (ValueError, AttributeError):
            pass
    if isinstance(reported, dict) and isinstance(reported.get("applied"), dict):
        applied = reported["applied"].get(scope)
        if isinstance(applied, int):
            seen.append(applied)
    return max(seen) + 1
