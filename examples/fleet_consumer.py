#!/usr/bin/env python3
"""A fleet backend in one file: follows every edged device of a fleet over MQTT, drops duplicate events
(delivery is at-least-once) by `event_id`, and keeps live counts per site from `enter` / `exit` events.

    python examples/fleet_consumer.py --broker central-1:1883 --broker central-2:1883 --client-id backend-1

Topics: devices with a site level (`mqtt.site`) publish under `<prefix>/<site>/<device>/...`; this script
subscribes to `<prefix>/+/+/events` and `<prefix>/+/+/state` (QoS 1). Only paho-mqtt is needed.

* **No event lost while this script is away:** it connects with a persistent session (clean_session off
  on 3.1.1; clean_start off + a session expiry on MQTT 5) under a fixed `--client-id`, so the broker keeps
  its subscriptions and queues QoS 1 events while it is disconnected or restarting. Give several
  `--broker`s (e.g. the nodes of a NATS cluster, where sessions live in replicated JetStream streams): when
  one goes away, it reconnects to the next one and resumes the same session.
* **Protocol:** `--protocol auto` (default) uses MQTT 5 and falls back to 3.1.1 when the broker refuses
  version 5 (NATS, RabbitMQ 3.x).
* **Scaling out:** `--group NAME` subscribes through MQTT 5 shared subscriptions
  (`$share/NAME/<filter>`): instances with the same group split the messages between them, each message
  to one instance (mosquitto 2, EMQX, HiveMQ, VerneMQ...). Each instance then sees a share of the events:
  de-duplicate and count in a store they share, or route by device (`$share` picks per message, so
  duplicates of one event may reach two instances). On a 3.1.1 broker there are no shared subscriptions:
  the script says so and subscribes normally (every instance gets everything).
* **Live counts:** per site and class, +1 on `enter`, -1 on `exit` (first delivery of each event only).
  They equal the sum of the devices' own retained `state` once both are delivered up to the same frame:
  `check_against_states()` compares them per device, cut at the frame of the device's last `state`.

Output: a summary line every `--interval` seconds on stderr; `--record FILE` writes one JSON line per
first-delivered event (event_id, site, device, type, seq, frame, ts, received: epoch seconds) for
latency studies; on SIGUSR1 it snapshots the newest state of every device and writes `--summary FILE`
(JSON: counts, duplicates, per-site live counts, the newest state frame of each device, the checks); on
SIGTERM/SIGINT it writes the summary and exits.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

UNSUPPORTED_PROTOCOL_VERSION = 0x84


def parse_ts(ts: str) -> float:
    """edged's `ts` ("2026-11-26T01:19:55.336Z") as epoch seconds."""
    whole, _, frac = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + (int(frac) / 1000.0 if frac else 0.0)


def _order(state: dict) -> Tuple[float, int]:
    try:
        return parse_ts(str(state.get("ts"))), int(state.get("frame", 0))
    except ValueError:
        return 0.0, int(state.get("frame", 0))


class FleetCounts:
    """De-duplication and live counts; no MQTT in here (easy to test, easy to move into a service).

    A device's `frame` numbering restarts with its process while `seq` keeps increasing: a first-delivered
    event with a lower frame than the device's previous one starts a new run of that device, and the
    tracks of the old run are gone (a crashed process never sends their `exit`), so its counts restart
    at zero. Its `state` messages are followed the same way."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.received = 0  # event messages, duplicates included
        self.duplicates = 0
        self.restarts = 0  # device runs that ended without exits for their tracks (counts reset)
        self.live: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))  # site -> class -> n
        self.device_live: Dict[Tuple[str, str], Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.last_frame: Dict[Tuple[str, str], int] = {}
        self.deltas: Dict[Tuple[str, str], List[Tuple[int, int]]] = defaultdict(list)  # current run: (frame, +-1)
        self.states: Dict[Tuple[str, str], dict] = {}  # newest state per device (current run, highest frame)
        self.snapshot: Optional[Dict[Tuple[str, str], dict]] = None

    def event(self, site: str, device: str, body: dict) -> bool:
        """True for the first delivery of an event, False for a duplicate."""
        self.received += 1
        if body["event_id"] in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(body["event_id"])
        key, frame = (site, device), int(body.get("frame", 0))
        if frame < self.last_frame.get(key, -1):  # the device's process restarted
            for cls, n in self.device_live.pop(key, {}).items():
                self.live[site][cls] -= n
            self.deltas.pop(key, None)
            self.restarts += 1
        self.last_frame[key] = frame
        delta = {"enter": 1, "exit": -1}.get(body.get("type", ""), 0)
        if delta:
            cls = body.get("class", "?")
            self.live[site][cls] += delta
            self.device_live[key][cls] += delta
            self.deltas[key].append((frame, delta))
        return True

    def state(self, site: str, device: str, body: dict) -> None:
        """Keep the newest state of a device, by (ts, frame): a late duplicate of an older one, or the
        retained one delivered at subscription, never replaces a newer one."""
        key = (site, device)
        old = self.states.get(key)
        if old is None or _order(body) >= _order(old):
            self.states[key] = body

    def take_snapshot(self) -> None:
        self.snapshot = dict(self.states)

    def per_site(self) -> Dict[str, int]:
        return {site: sum(classes.values()) for site, classes in sorted(self.live.items())}

    def check_against_states(self, states: Optional[Dict[Tuple[str, str], dict]] = None) -> Dict[str, Dict[str, int]]:
        """Per site: the live count from events up to each device's state frame, and the sum of those
        states' totals. Equal when nothing was lost or counted twice (call once the events up to those
        frames are delivered)."""
        states = self.states if states is None else states
        out: Dict[str, Dict[str, int]] = defaultdict(lambda: {"from_events": 0, "from_states": 0, "devices": 0})
        for (site, device), st in states.items():
            cut = int(st.get("frame", 0))
            out[site]["from_events"] += sum(d for f, d in self.deltas.get((site, device), ()) if f <= cut)
            out[site]["from_states"] += int(st.get("total", 0))
            out[site]["devices"] += 1
        return {k: dict(v) for k, v in sorted(out.items())}


class Consumer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.brokers = [(h, int(p)) for h, _, p in (b.rpartition(":") for b in args.broker)]
        self.counts = FleetCounts()
        self.protocol = "5" if args.protocol in ("auto", "5") else "3.1.1"
        self.settled = args.protocol != "auto"
        self.client: Optional[mqtt.Client] = None
        self.connected = False
        self.switched = False  # the protocol was just changed: reconnect to the same broker at once
        self.broker_index = 0
        self.record = open(args.record, "a", buffering=1) if args.record else None
        self.stop = False
        self.snapshot_asked = False
        self.connects = 0

    # ----------------------------------------------------------------------------------------- mqtt
    def _filters(self) -> List[str]:
        p = self.args.prefix
        filters = [f"{p}/+/+/events", f"{p}/+/+/state"]
        if self.args.group:
            if self.protocol == "5":
                return [f"$share/{self.args.group}/{f}" for f in filters]
            self.say(f"MQTT {self.protocol}: no shared subscriptions; --group ignored (this instance gets everything)")
        return filters

    def _new_client(self) -> mqtt.Client:
        kw: Dict[str, Any] = {"clean_session": False} if self.protocol == "3.1.1" else {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.args.client_id,
                        protocol=mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311, **kw)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _connect(self) -> bool:
        host, port = self.brokers[self.broker_index % len(self.brokers)]
        self.client = self._new_client()
        props, kw = None, {}
        if self.protocol == "5":  # keep the session (and queued events) for an hour while away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kw["clean_start"] = False
        try:
            self.client.connect(host, port, keepalive=15, properties=props, **kw)
            return True
        except OSError as exc:
            self.say(f"cannot connect to {host}:{port}: {exc}")
            self.broker_index += 1
            return False

    def _on_connect(self, client, _u, flags, rc, _p) -> None:
        if rc.value == UNSUPPORTED_PROTOCOL_VERSION and not self.settled:
            self.say("broker refused MQTT 5; using 3.1.1")
            self.protocol, self.settled, self.switched = "3.1.1", True, True
            return  # the loop reconnects (same broker) with a new client
        if rc.is_failure:
            self.say(f"connection refused: {rc}")
            return
        self.settled = True
        self.connected = True
        self.connects += 1
        host, port = self.brokers[self.broker_index % len(self.brokers)]
        self.say(f"connected to {host}:{port} (MQTT {self.protocol}, session present: {flags.session_present})")
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_disconnect(self, _c, _u, _f, rc, _p) -> None:
        if self.connected:
            self.say(f"disconnected: {rc}")
        elif not self.settled and self.protocol == "5":  # closed on an MQTT 5 CONNECT (RabbitMQ 3.x)
            self.say("broker closed the connection on an MQTT 5 CONNECT; using 3.1.1")
            self.protocol, self.settled, self.switched = "3.1.1", True, True
        self.connected = False

    def _on_message(self, _c, _u, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or not msg.payload:
            return
        site, device, kind = parts[-3], parts[-2], parts[-1]
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if kind == "state":
            self.counts.state(site, device, body)
        elif kind == "events" and isinstance(body, dict) and "event_id" in body:
            if self.counts.event(site, device, body) and self.record is not None:
                self.record.write(json.dumps({
                    "event_id": body["event_id"], "site": site, "device": device, "type": body.get("type"),
                    "seq": body.get("seq"), "frame": body.get("frame"), "ts": body.get("ts"),
                    "received": round(time.time(), 4)}) + "\n")

    # ----------------------------------------------------------------------------------------- run
    def say(self, text: str) -> None:
        print(f"fleet_consumer: {text}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        c = self.counts
        out = {"protocol": self.protocol, "connects": self.connects, "received": c.received,
               "unique": len(c.seen), "duplicates": c.duplicates, "device_restarts": c.restarts,
               "live_per_site": c.per_site(),
               "live_per_site_class": {s: dict(v) for s, v in sorted(c.live.items())},
               "devices_with_state": len(c.states),
               "newest_state_frames": {f"{s}/{d}": int(st.get("frame", 0)) for (s, d), st in sorted(c.states.items())},
               "check_newest_states": c.check_against_states()}
        if c.snapshot is not None:
            out["check_snapshot"] = c.check_against_states(c.snapshot)
        return out

    def write_summary(self) -> None:
        if self.args.summary:  # whole or not at all: a reader never sees half a file
            tmp = f"{self.args.summary}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self.summary(), fh, indent=1)
            os.replace(tmp, self.args.summary)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "snapshot_asked", True))
        backoff, next_print = 0.5, time.monotonic() + self.args.interval
        while not self.stop:
            if self.client is None and not self._connect():
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            assert self.client is not None
            if self.client.loop(0.5) != mqtt.MQTT_ERR_SUCCESS:  # refused, closed or lost
                lost, switched = self.connected, self.switched
                self.connected = self.switched = False
                self.client = None
                if switched:
                    continue  # the same broker again, in the protocol it speaks
                if lost or self.settled:
                    self.broker_index += 1  # the next broker of the list (a cluster node that is up)
                time.sleep(0 if lost else backoff)
                backoff = 0.5 if lost else min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            if self.snapshot_asked:
                self.snapshot_asked = False
                self.counts.take_snapshot()
                self.write_summary()
                self.say(f"snapshot of {len(self.counts.snapshot or {})} device states")
            if time.monotonic() >= next_print:
                next_print += self.args.interval
                c = self.counts
                self.say(f"events {len(c.seen)} (+{c.duplicates} duplicates), live per site {c.per_site()}")
        if self.client is not None:
            self.client.disconnect()
        if self.args.summary:
            self.write_summary()
        else:
            print(json.dumps(self.summary(), indent=1))
        if self.record is not None:
            self.record.close()
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", action="append", default=[], metavar="HOST:PORT",
                    help="broker to use; repeat for fail-over (default localhost:1883)")
    ap.add_argument("--prefix", default="edged", help="mqtt.topic_prefix of the devices (default edged)")
    ap.add_argument("--client-id", default=None, help="fixed client id: the broker keeps this session while away")
    ap.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="auto")
    ap.add_argument("--group", default=None, help="MQTT 5 shared-subscription group ($share/GROUP/...)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between summary lines")
    ap.add_argument("--record", metavar="FILE", help="append one JSON line per first-delivered event")
    ap.add_argument("--summary", metavar="FILE", help="write the final summary (JSON) here on exit")
    args = ap.parse_args(argv)
    args.broker = args.broker or ["localhost:1883"]
    args.client_id = args.client_id or f"fleet-consumer-{uuid.uuid4().hex[:8]}"
    return Consumer(args).run()


if __name__ == "__main__":
    sys.exit(main())
