"""mqtt.protocol (auto | 5 | 3.1.1) and what changes with it, against real brokers (tests/brokers.py):
the fallback and its backoff, what 3.1.1 cannot do (PUBACK reason codes, message expiry), position
expiry, the config key itself."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import List

import pytest

from brokers import Subscriber
from _mqtt_helpers import wait_until
from edged.config import ConfigError, MqttConfig, load_config
from edged.mqtt.client import MqttPublisher
from edged.mqtt.outbox import Outbox
from edged.mqtt.topics import Topics
from test_mqtt_client import Recorder

DEVICE = "dev1"
TOPICS = Topics("edged", DEVICE)


@pytest.fixture
def outbox(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite")
    yield ob
    ob.close()


def _cfg(port: int, **kw) -> MqttConfig:
    base = dict(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5, keepalive=10)
    base.update(kw)
    return MqttConfig(**base)


def _event(seq: int) -> bytes:
    return json.dumps({"seq": seq, "event_id": f"{DEVICE}-{seq}"}).encode()


# ------------------------------------------------------------------------------------------ config
def test_protocol_key_accepts_yaml_spellings_and_names_itself(tmp_path):
    f = tmp_path / "c.yaml"
    for text, want in (("5", "5"), ("'5'", "5"), ("3.1.1", "3.1.1"), ("auto", "auto")):
        f.write_text(f"mqtt:\n  protocol: {text}\n")
        assert load_config(str(f)).mqtt.protocol == want
    assert load_config(None).mqtt.protocol == "auto"
    f.write_text("mqtt:\n  protocol: 3.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "mqtt.protocol" in str(e.value)


def test_site_key_validated_and_reserved_name_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("device_id: cam1\nmqtt:\n  site: shop-12\n")
    cfg = load_config(str(f))
    assert Topics(cfg.mqtt.topic_prefix, cfg.device_id, cfg.mqtt.site).events == "edged/shop-12/cam1/events"
    for bad in ("fleet", "a/b", "'+'"):
        f.write_text(f"mqtt:\n  site: {bad}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(f))
        assert "mqtt.site" in str(e.value)


# ------------------------------------------------------------------------------------------ fallback
def test_forced_v5_against_a_311_broker_is_refused_with_a_hint(pool, outbox, caplog):
    """mqtt.protocol: 5 means 5: NATS refuses it (CONNACK 0x84) and the log says what to set."""
    nats = pool.make("nats")
    rec = Recorder()
    pub = MqttPublisher(_cfg(nats.port, protocol="5"), device_id=DEVICE, outbox=outbox, on_status=rec)
    with caplog.at_level("WARNING", logger="edged.mqtt"):
        pub.start()
        try:
            assert rec.wait_for("connect_refused", 2, 20)
            st = pub.stats()
            assert st["protocol"] is None and not st["connected"]
            assert "0x84" in st["last_error"]
        finally:
            pub.stop(timeout=2)
    assert any("set mqtt.protocol to auto or 3.1.1" in r.getMessage() for r in caplog.records)
    nats.cleanup()


class ClosingPeer:
    """A TCP listener that reads each MQTT CONNECT, records its protocol level byte and closes the
    connection without a CONNACK (what RabbitMQ 3.x does to MQTT 5; here to every version)."""

    def __init__(self):
        self.levels: List[int] = []
        self.cond = threading.Condition()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(64)
                except OSError:
                    continue
            # fixed header (1 byte + remaining length < 128: 1 byte), then "\0\4MQTT", then the level
            if len(data) >= 9 and data[4:8] == b"MQTT":
                with self.cond:
                    self.levels.append(data[8])
                    self.cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def test_auto_alternates_with_backoff_when_no_version_gets_an_answer(outbox):
    """A peer that closes on every CONNECT: auto tries 5, then 3.1.1 at once, then keeps alternating
    with the reconnect backoff (never a busy loop); nothing is settled, nothing is lost."""
    peer = ClosingPeer()
    pub = MqttPublisher(_cfg(peer.port, reconnect_min_s=0.2, reconnect_max_s=0.4), device_id=DEVICE, outbox=outbox)
    outbox.put(TOPICS.events, _event(0))
    pub.start()
    try:
        with peer.cond:
            assert peer.cond.wait_for(lambda: len(peer.levels) >= 6, 30)
        started = time.monotonic()
        with peer.cond:
            before = len(peer.levels)
            peer.cond.wait_for(lambda: len(peer.levels) >= before + 1000, 3.0)
            attempts = len(peer.levels) - before
        assert attempts <= 3.0 / 0.2 * 2 + 2, f"{attempts} CONNECTs in {time.monotonic() - started:.1f} s: busy loop"
        levels = peer.levels[:6]
        assert levels[:2] == [5, 4], "auto starts with MQTT 5, then tries 3.1.1 at once"
        assert 5 in levels[2:] and 4 in levels[2:], "neither answered: keep trying both"
        assert pub.stats()["protocol"] is None and outbox.depth() == 1
    finally:
        pub.stop(timeout=2)
        peer.close()


# ------------------------------------------------------------------------------------------ degradations
@pytest.mark.parametrize("protocol,denial_visible", [("5", True), ("3.1.1", False)])
def test_acl_denial_visible_on_v5_only(pool, outbox, protocol, denial_visible):
    """MQTT 5: a publish outside the ACL comes back as PUBACK 0x87 (counted `denied`, row dropped).
    MQTT 3.1.1 has no reason codes: mosquitto acknowledges it as if delivered and drops it; the device
    cannot see it (documented degradation). The subscriber gets the allowed message, never the denied one."""
    broker = pool.make("mosquitto", start=False)
    acl = broker.workdir / "acl"
    acl.write_text(f"topic write edged/{DEVICE}/#\ntopic read #\n")
    acl.chmod(0o644)
    broker.extra_conf = [f"acl_file {acl}"]
    broker.start()
    sub = Subscriber(broker.port, "#", protocol=protocol)
    pub = MqttPublisher(_cfg(broker.port, protocol=protocol), device_id=DEVICE, outbox=outbox)
    try:
        assert sub.wait_subscribed()
        outbox.put("edged/someone-else/events", _event(1))
        outbox.put(TOPICS.events, _event(2))
        pub.start()
        assert wait_until(lambda: outbox.depth() == 0, 20)
        assert sub.wait(lambda: any(m.topic == TOPICS.events for m in sub.messages), 20)
        assert not any(m.topic.startswith("edged/someone-else") for m in sub.messages)
        st = pub.stats()
        assert st["protocol"] == protocol
        assert st["denied"] == (1 if denial_visible else 0)
        assert st["published"] == (1 if denial_visible else 2)
    finally:
        pub.stop(timeout=2)
        sub.close()
        broker.cleanup()


@pytest.mark.parametrize("protocol,expired_by_broker", [("5", True), ("3.1.1", False)])
def test_position_expiry_by_the_broker_on_v5_only(pool, outbox, protocol, expired_by_broker):
    """A backend that was offline (persistent session) gets position updates older than
    mqtt.position_expiry_s on 3.1.1 but not on 5, where the broker drops them (MessageExpiryInterval).
    Events never expire."""
    broker = pool.make("mosquitto")
    backend = f"backend-{protocol.replace('.', '')}"
    sub = Subscriber(broker.port, [TOPICS.tracks, TOPICS.events], protocol=protocol, persistent=True,
                     client_id=backend)
    assert sub.wait_subscribed()
    sub.close()  # offline; the broker keeps its session and queues QoS 1 messages for it
    pub = MqttPublisher(_cfg(broker.port, protocol=protocol, position_expiry_s=1.0), device_id=DEVICE, outbox=outbox)
    try:
        pub.start()
        assert pub.wait_connected(20)
        outbox.put_many([(TOPICS.tracks, _event(i), 1, False, "position", None) for i in range(3)])
        outbox.put(TOPICS.events, _event(3))  # queued after them: a marker
        assert wait_until(lambda: outbox.depth() == 0, 20)
        threading.Event().wait(2.5)  # the scenario: the backend stays away longer than the expiry
        back = Subscriber(broker.port, [TOPICS.tracks, TOPICS.events], protocol=protocol, persistent=True,
                          client_id=backend)
        try:
            assert back.wait(lambda: any(m.topic == TOPICS.events for m in back.messages), 20)
            positions = back.on("/tracks")
            assert len(positions) == (0 if expired_by_broker else 3)
        finally:
            back.close()
    finally:
        pub.stop(timeout=2)
        broker.cleanup()


def test_stale_positions_are_not_sent_after_an_outage(pool, outbox):
    """Position rows that waited in the outbox longer than mqtt.position_expiry_s are deleted unsent
    (counted `expired`), whatever the protocol; events queued with them are delivered."""
    broker = pool.make("mosquitto", start=False)
    pub = MqttPublisher(_cfg(broker.port, protocol="3.1.1", position_expiry_s=1.0), device_id=DEVICE, outbox=outbox)
    pub.start()
    sub = None
    try:
        outbox.put_many([(TOPICS.tracks, _event(i), 0, False, "position", None) for i in range(5)])
        outbox.put(TOPICS.events, _event(5))
        threading.Event().wait(1.5)  # the scenario: an outage longer than the expiry
        broker.start()
        sub = Subscriber(broker.port, [TOPICS.tracks, TOPICS.events], protocol="3.1.1")
        assert sub.wait_subscribed()
        assert wait_until(lambda: outbox.depth() == 0, 20)
        assert sub.wait(lambda: len(sub.on("/events")) == 1, 20)
        assert sub.on("/tracks") == []
        st = pub.stats()
        assert st["expired"] == 5 and st["published"] == 1
    finally:
        pub.stop(timeout=2)
        if sub is not None:
            sub.close()
        broker.cleanup()


def test_fresh_positions_carry_the_remaining_expiry_on_v5(pool, outbox):
    broker = pool.make("mosquitto")
    sub = Subscriber(broker.port, TOPICS.tracks, protocol="5")
    got = {}

    def on_message(_c, _u, msg):
        got["expiry"] = getattr(msg.properties, "MessageExpiryInterval", None)

    sub.client.on_message = on_message
    pub = MqttPublisher(_cfg(broker.port, position_expiry_s=30.0), device_id=DEVICE, outbox=outbox)
    try:
        assert sub.wait_subscribed()
        pub.start()
        outbox.put(TOPICS.tracks, _event(0), qos=0, kind="position")
        assert wait_until(lambda: "expiry" in got, 20)
        assert got["expiry"] is not None and 1 <= got["expiry"] <= 30
    finally:
        pub.stop(timeout=2)
        sub.close()
        broker.cleanup()


def test_site_and_protocol_cannot_be_set_remotely():
    """A remote overlay must not move a device's topics (mqtt.site) or its protocol: a wrong value
    could cut it off from the broker, and so from any remote fix."""
    from edged.remote_config import Rejected, parse_desired

    for key, value in (("site", "elsewhere"), ("protocol", "3.1.1")):
        with pytest.raises(Rejected) as e:
            parse_desired(json.dumps({"version": 1, "config": {"mqtt": {key: value}}}).encode(), "device")
        assert any(err.startswith(f"mqtt.{key}:") for err in e.value.errors)
    desired = parse_desired(json.dumps({"version": 2, "config": {"mqtt": {"position_expiry_s": 5}}}).encode(), "fleet")
    assert desired.overlay == {"mqtt": {"position_expiry_s": 5}}


def test_site_level_reaches_every_topic_the_device_and_tools_use(pool, tmp_path):
    """mqtt.site: the daemon's topics, Home Assistant discovery (node id and the topics it points at), the
    client id on the broker, `edged watch` and `edged config push` all use <prefix>/<site>/<device>/."""
    import subprocess
    import sys

    from conftest import ROOT
    from _replay_device import ReplayDevice

    broker = pool.make("mosquitto")
    sub = Subscriber(broker.port, "#")
    dev = ReplayDevice(tmp_path, broker.port, site="shop-7", mqtt={"homeassistant": {"enabled": True}})
    base = f"edged/shop-7/{dev.device_id}"
    try:
        assert sub.wait_subscribed()
        dev.start()
        assert dev.wait_stderr("mqtt: online", 1, 90), dev.stderr_tail()
        assert sub.wait(lambda: any(m.topic == f"{base}/events" for m in sub.messages), 60)
        watch = subprocess.run([sys.executable, "-m", "edged", "watch", "--config", str(dev.config), "--topics", "events",
                                "--count", "1", "--timeout", "30"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert watch.returncode == 0 and watch.stdout.startswith(f"{base}/events: "), watch.stderr
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text("events:\n  position_interval_s: 2.0\n")
        push = subprocess.run([sys.executable, "-m", "edged", "config", "push", "--config", str(dev.config), str(overlay),
                               "--timeout", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        assert f"on {base}/config/desired" in push.stderr
        with sub.cond:
            topics = {m.topic for m in sub.messages}
            discovery = [m for m in sub.messages if m.topic.startswith("homeassistant/")]
        device_topics = {t for t in topics if t.startswith("edged/") and not t.startswith(("edged/_push/", "edged/_watch/"))}
        assert device_topics and all(t.startswith(f"{base}/") for t in device_topics), device_topics
        assert discovery
        node = f"edged_shop-7_{dev.device_id}"
        for m in discovery:
            assert m.topic.split("/")[2] == node
            assert m.json()["availability_topic"] == f"{base}/availability"
        assert f"as edged-shop-7-{dev.device_id}" in broker.log_text()  # client ids stay unique across sites
    finally:
        sub.close()
        if dev.runs:
            dev.stop()
        broker.cleanup()
