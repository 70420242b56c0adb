"""The MQTT contract against the brokers people run: mosquitto 2 (MQTT 5 and 3.1.1), NATS server (JetStream
+ MQTT listener, 3.1.1 only) and RabbitMQ (rabbitmq_mqtt, 3.1.1 only).

Each broker is an instance of its own on free loopback ports (tests/brokers.py), started once per module
and always stopped. The device is a real `edged replay` process with `mqtt.protocol` as a user would set
it (auto against NATS and RabbitMQ: it must find 3.1.1 by itself); what is checked is what a subscriber
sees. docs/mqtt.md's compatibility table names these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from brokers import BrokerInstance, Subscriber, retained
from _mqtt_helpers import wait_until
from conftest import ROOT
from _replay_device import ReplayDevice



@dataclass
class Target:
    broker: BrokerInstance
    device_protocol: str  # what the device is configured with
    negotiated: str  # what it must end up speaking
    subscriber_protocol: str

    @property
    def port(self) -> int:
        return self.broker.port


# (broker, mqtt.protocol on the device, the protocol it must negotiate)
PROFILES = [
    ("mosquitto", "auto", "5"),
    ("mosquitto", "3.1.1", "3.1.1"),
    ("nats", "auto", "3.1.1"),
    ("rabbitmq", "auto", "3.1.1"),
]


@pytest.fixture(scope="module", params=PROFILES, ids=[f"{b}-{p}" for b, p, _n in PROFILES])
def target(request, pool) -> Target:
    kind, protocol, negotiated = request.param
    broker = pool.make(kind)
    try:
        yield Target(broker, protocol, negotiated, "5" if negotiated == "5" else "3.1.1")
    finally:
        broker.cleanup()


def _device(target: Target, tmp_path, **kw) -> ReplayDevice:
    return ReplayDevice(tmp_path, target.port, protocol=target.device_protocol, **kw)


def _first_occurrences(ids):
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def test_availability_last_will_and_protocol(target, tmp_path):
    """`online` retained while running; the broker publishes the retained `offline` will when the device
    dies (SIGKILL); stats say which protocol is in use."""
    dev = _device(target, tmp_path).start()
    live = None
    try:
        assert dev.wait_stderr("mqtt: online", 1, 90), dev.stderr_tail()
        base = f"edged/{dev.device_id}"
        live = Subscriber(target.port, [f"{base}/availability", f"{base}/stats"], protocol=target.subscriber_protocol)
        assert live.wait_subscribed()
        assert retained(target.port, f"{base}/availability", protocol=target.subscriber_protocol) == b"online"
        assert live.wait(lambda: any(m.topic.endswith("/stats") for m in live.messages), 30)
        stats = live.on("/stats")[-1].json()
        assert stats["mqtt"]["protocol"] == target.negotiated
        assert stats["mqtt"]["connected"] is True
        if target.device_protocol == "auto" and target.negotiated == "3.1.1":
            assert dev.count_stderr("using MQTT 3.1.1") + dev.count_stderr("trying MQTT 3.1.1") >= 1
        dev.kill9()  # no DISCONNECT: the broker must publish the will
        assert live.wait(lambda: any(m.payload == b"offline" for m in live.on("/availability")), 60)
        assert retained(target.port, f"{base}/availability", protocol=target.subscriber_protocol,
                        expect=b"offline") == b"offline"
    finally:
        if live is not None:
            live.close()
        dev.stop()


def test_qos1_events_in_order_and_retained_state(target, tmp_path):
    """Every committed event arrives, first deliveries in the device's order; a fresh subscriber gets the
    newest `state` retained; a clean stop leaves `offline` retained."""
    dev = _device(target, tmp_path, loop=False, fast=True)
    base = f"edged/{dev.device_id}"
    sub = Subscriber(target.port, [f"{base}/events", f"{base}/state"], protocol=target.subscriber_protocol,
                     persistent=True)
    try:
        assert sub.wait_subscribed()
        dev.start()
        assert dev.out.wait_exit(180) == 0, dev.stderr_tail()
        printed = dev.event_ids()
        assert len(printed) >= 20
        assert sub.wait(lambda: set(printed) <= set(sub.event_ids()), 60), \
            f"lost {len(set(printed) - set(sub.event_ids()))} of {len(printed)}"
        assert _first_occurrences(sub.event_ids()) == printed
        seqs = [m.json()["seq"] for m in sub.on("/events")]
        assert _first_occurrences(seqs) == sorted(set(seqs))
        last_state = sub.on("/state")[-1].payload
        assert json.loads(last_state)["total"] == 0  # every track exited at the end of the file
        assert retained(target.port, f"{base}/state", protocol=target.subscriber_protocol) == last_state
        assert retained(target.port, f"{base}/availability", protocol=target.subscriber_protocol) == b"offline"
    finally:
        sub.close()
        if dev.runs:
            dev.stop()


def test_reconnect_after_broker_restart_loses_nothing(target, tmp_path):
    """The broker restarts while the device keeps producing: the device reconnects by itself and a
    backend with a persistent session receives every committed event (duplicates allowed, in order)."""
    dev = _device(target, tmp_path)
    base = f"edged/{dev.device_id}"
    sub = Subscriber(target.port, f"{base}/events", protocol=target.subscriber_protocol, persistent=True)
    try:
        assert sub.wait_subscribed()
        dev.start()
        assert dev.wait_stderr("mqtt: online", 1, 90), dev.stderr_tail()
        assert sub.wait(lambda: len(sub.messages) >= 3, 60)
        target.broker.stop()
        assert dev.wait_stderr("mqtt: disconnected", 1, 60), dev.stderr_tail()
        during = len(dev.event_ids())
        assert dev.wait_events(during + 5, 60), "the device must keep producing during the outage"
        target.broker.start()
        assert dev.wait_stderr("mqtt: online", 2, 120), dev.stderr_tail()
        assert dev.wait_events(len(dev.event_ids()) + 3, 60)
        assert dev.stop() == 0, dev.stderr_tail()
        printed = dev.event_ids()
        assert sub.wait(lambda: set(printed) <= set(sub.event_ids()), 120), \
            f"lost {sorted(set(printed) - set(sub.event_ids()))[:10]} of {len(printed)}"
        assert _first_occurrences(sub.event_ids()) == printed
        assert retained(target.port, f"{base}/availability", protocol=target.subscriber_protocol) == b"offline"
        if target.device_protocol == "auto":  # found once, kept for the reconnects of the run
            assert dev.count_stderr("trying MQTT") == (1 if target.negotiated == "3.1.1" else 0)
    finally:
        sub.close()
        if dev.runs:
            dev.stop()
        if not target.broker.running:
            target.broker.start()


def test_qos2_events(target, tmp_path):
    """mqtt.qos_events: 2. mosquitto delivers; RabbitMQ delivers (as QoS 1); NATS 2.9 closes the
    connection on a QoS 2 publish (its log: "publish QoS=2 not supported"), so nothing is delivered,
    and nothing is lost either: the rows stay in the outbox. Keep QoS at 0/1 (the defaults) on NATS."""
    from edged.config import MqttConfig
    from edged.mqtt.client import MqttPublisher
    from edged.mqtt.outbox import Outbox
    from edged.mqtt.topics import Topics
    from test_mqtt_client import Recorder

    topics = Topics("edged", "qos2dev")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sub = Subscriber(target.port, topics.events, protocol=target.subscriber_protocol, qos=2)
    rec = Recorder()
    cfg = MqttConfig(host="127.0.0.1", port=target.port, protocol=target.device_protocol, qos_events=2,
                     reconnect_min_s=0.1, reconnect_max_s=0.5)
    pub = MqttPublisher(cfg, device_id="qos2dev", outbox=outbox, on_status=rec)
    try:
        assert sub.wait_subscribed()
        outbox.put_many([(topics.events, json.dumps({"seq": i, "event_id": f"q{i}"}).encode(), 2, False, "event", None)
                         for i in range(20)])
        pub.start()
        if target.broker.kind == "nats":
            assert rec.wait_for("disconnected", 3, 60)
            assert pub.stats()["published"] == 0 and outbox.depth() == 20
            assert "QoS=2 not supported" in target.broker.log_text()
        else:
            assert sub.wait(lambda: len(set(sub.event_ids())) == 20, 60)
            assert _first_occurrences(sub.event_ids()) == [f"q{i}" for i in range(20)]
            assert wait_until(lambda: pub.stats()["published"] == 20 and outbox.depth() == 0, 20)
    finally:
        pub.stop(timeout=2)
        sub.close()
        outbox.close()


def test_remote_config_round_trip(target, tmp_path):
    """`edged config push` (retained desired) -> the running device applies it -> `config/reported` says
    applied and `config/effective` shows the value."""
    dev = _device(target, tmp_path).start()
    try:
        assert dev.wait_stderr("mqtt: online", 1, 90), dev.stderr_tail()
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text("detector:\n  score_threshold: 0.42\n")
        r = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(dev.config),
                            str(overlay), "--timeout", "90"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr + r.stdout
        report = json.loads(r.stdout)
        assert report["status"] == "applied" and report["version"] == 1
        effective = retained(target.port, f"edged/{dev.device_id}/config/effective",
                             protocol=target.subscriber_protocol)
        assert effective is not None and json.loads(effective)["detector"]["score_threshold"] == 0.42
    finally:
        assert dev.stop() == 0, dev.stderr_tail()


def test_compatibility_table_rows_name_existing_tests():
    """Every row of docs/mqtt.md's compatibility table names the tests behind it, and they exist."""
    import re

    doc = (ROOT / "docs" / "mqtt.md").read_text()
    table = doc.split("## Broker compatibility", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| |")]
    assert len(rows) >= 9
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row.split("|")[1])
        assert named, f"row without a test: {row[:60]}"
        assert set(named) <= defined, f"unknown test in: {row[:60]}"
