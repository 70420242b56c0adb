"""`edged watch`: subscribe to a device's topics and print what arrives (one line per message).

Connection trouble is always said on stderr (which broker, what went wrong) while it keeps retrying;
`--timeout` turns "never reachable" into exit status 1. Event and position payloads are shortened to
their identifying fields unless `--full` is given, and the first line on stderr says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any, List, Optional

from edged.config import ConfigError, load_config
from edged.mqtt.topics import subscription

BRIEF_FIELDS = ("seq", "type", "track_id", "class", "reason", "zone", "line", "direction")
EXIT_UNREACHABLE = 1  # the broker refused us, or did not answer within --timeout
EXIT_SETUP = 2  # the config, password or TLS files cannot be used
RETRY_MIN_S, RETRY_MAX_S = 1.0, 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file (broker, prefix and device id come from it)")
    p.add_argument("--host", help="override mqtt.host")
    p.add_argument("--port", type=int, help="override mqtt.port")
    p.add_argument("--device", default=None, help="device id to watch ('+' = all devices)")
    p.add_argument("--site", default=None, help="site of the device (default mqtt.site; '+' = all sites)")
    p.add_argument("--topics", default="#", help="sub-topic filter under the device, e.g. events (default: all)")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages (0 = never)")
    p.add_argument("--full", action="store_true",
                   help="print payloads whole (default: events and positions show only " + ", ".join(BRIEF_FIELDS) + ")")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help=f"exit with status {EXIT_UNREACHABLE} when not subscribed within SECONDS "
                        "(default: keep retrying)")
    p.add_argument("--clear-retained", action="store_true",
                   help="delete the retained messages under the topics (e.g. of a retired device: its "
                        "availability and state), print their topics and exit")


def _say(text: str) -> None:
    print(f"edged watch: {text}", file=sys.stderr, flush=True)


def shorten(payload: bytes) -> Optional[str]:
    """The brief form of an event/position payload, None for anything else (printed as is)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not (isinstance(body, dict) and "type" in body):
        return None
    return json.dumps({k: body[k] for k in BRIEF_FIELDS if k in body})


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        m = cfg.mqtt
        from edged.mqtt.client import MqttSetupError, probe_protocol, tool_client

        host, port = args.host or m.host, args.port or m.port
        try:
            client = tool_client(m, args.config, probe_protocol(m, host, port, args.config))
        except MqttSetupError as exc:
            raise ConfigError(args.config or "<defaults>", [str(exc)]) from None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SETUP
    where = f"{host}:{port}"
    topic = subscription(m.topic_prefix, args.device or cfg.device_id, args.topics, site=args.site or m.site)
    subscribed = threading.Event()
    done = threading.Event()  # --count reached, or refused by the broker
    settled = threading.Event()  # subscribed or done: what --timeout waits for
    state: dict = {"code": 0, "seen": 0, "noted": False, "lost": False}
    client.reconnect_delay_set(int(RETRY_MIN_S), int(RETRY_MAX_S))
    if args.clear_retained:
        marker = f"{m.topic_prefix}/_watch/{uuid.uuid4().hex}"
        return _clear_retained(client, host, port, topic, marker, args.timeout or 30.0)

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            _say(f"{where} refused the connection: {rc}")
            state["code"] = EXIT_UNREACHABLE
            done.set()
            settled.set()
            return
        c.subscribe(topic, qos=1)

    def on_subscribe(_c: Any, _u: Any, _mid: Any, _rcs: Any, _p: Any) -> None:
        state["lost"] = False
        _say(f"subscribed to {topic} on {where}")
        if not args.full and not state["noted"]:
            _say("event and position payloads are shortened to " + ", ".join(BRIEF_FIELDS) + "; --full prints them whole")
            state["noted"] = True
        subscribed.set()
        settled.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if subscribed.is_set() and not done.is_set():
            _say(f"connection to {where} lost: {rc}; reconnecting")
            state["lost"] = True

    def on_connect_fail(_c: Any, _u: Any) -> None:
        if state["lost"]:  # said once per outage; paho keeps retrying with backoff
            _say(f"cannot reach {where} yet; still retrying (up to every {RETRY_MAX_S:g} s)")
            state["lost"] = False

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        text = None if args.full else shorten(msg.payload)
        if text is None:
            text = msg.payload.decode("utf-8", "replace")
        print(f"{msg.topic}{' (retained)' if msg.retain else ''}: {text}", flush=True)
        state["seen"] += 1
        if args.count and state["seen"] >= args.count:
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.on_disconnect, client.on_connect_fail = on_disconnect, on_connect_fail
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    try:
        if not _connect(client, host, port, deadline):
            _say(f"gave up: {where} unreachable for {args.timeout:g} s")
            return EXIT_UNREACHABLE
        client.loop_start()
        try:
            if deadline is not None and not settled.wait(max(0.0, deadline - time.monotonic())):
                _say(f"gave up: {where} accepted the connection but did not answer within {args.timeout:g} s")
                return EXIT_UNREACHABLE
            done.wait()
        finally:
            client.disconnect()
            client.loop_stop()
    except KeyboardInterrupt:
        pass
    return state["code"]


def _connect(client: Any, host: str, port: int, deadline: Optional[float]) -> bool:
    """Connect (TCP, TLS, MQTT CONNECT sent), saying every failure; False once the deadline passed."""
    delay = RETRY_MIN_S
    while True:
        try:
            client.connect(host, port, keepalive=30)
            return True
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError)
            reason = exc.strerror or str(exc) or type(exc).__name__
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            _say(f"cannot connect to {host}:{port}: {reason}")
            return False
        wait = delay if remaining is None else min(delay, remaining)
        _say(f"cannot connect to {host}:{port}: {reason}; retrying in {wait:.1f} s")
        time.sleep(wait)
        delay = min(delay * 2, RETRY_MAX_S)


def _clear_retained(client: Any, host: str, port: int, topic: str, marker: str, timeout: float) -> int:
    """Publish an empty retained payload (MQTT's way to delete) to every topic under `topic` that holds
    a retained message.

    Which topics hold one is learnt by subscribing to `topic` and to a private `marker` topic in one
    SUBSCRIBE, then publishing to the marker: the broker queues the retained messages when it handles
    the SUBSCRIBE, so once the marker comes back every retained message has arrived before it."""
    retained: List[str] = []
    marker_back = threading.Event()
    refused: List[str] = []

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            refused.append(str(rc))
            marker_back.set()
        else:
            c.subscribe([(topic, 1), (marker, 1)])

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == marker:
            marker_back.set()
        elif msg.retain and msg.payload and msg.topic not in retained:
            retained.append(msg.topic)

    client.on_connect, client.on_message = on_connect, on_message
    client.on_subscribe = lambda c, _u, _mid, _rcs, _p: c.publish(marker, b"marker", qos=1)
    deadline = time.monotonic() + timeout
    if not _connect(client, host, port, deadline):
        return EXIT_UNREACHABLE
    client.loop_start()
    try:
        if not marker_back.wait(max(0.0, deadline - time.monotonic())):
            _say(f"gave up: {host}:{port} did not answer within {timeout:g} s")
            return EXIT_UNREACHABLE
        if refused:
            _say(f"{host}:{port} refused the connection: {refused[0]}")
            return EXIT_UNREACHABLE
        for name in retained:
            info = client.publish(name, b"", qos=1, retain=True)
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                _say(f"gave up: {host}:{port} did not acknowledge clearing {name}")
                return EXIT_UNREACHABLE
            print(f"cleared retained {name}", flush=True)
        _say(f"{len(retained)} retained message(s) cleared under {topic}")
        return 0
    finally:
        client.disconnect()
        client.loop_stop()
