"""The broker fixture itself: a real mosquitto round trip, and restart on the same port."""

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def _roundtrip(port: int, topic: str, payload: bytes) -> bytes:
    got = threading.Event()
    box = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe(topic, qos=1)

    def on_subscribe(client, userdata, mid, rcs, props):
        client.publish(topic, payload, qos=1)

    def on_message(client, userdata, msg):
        box["payload"] = msg.payload
        got.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert got.wait(10), "no message came back from the broker"
    finally:
        c.loop_stop()
        c.disconnect()
    return box["payload"]


def test_broker_roundtrip_and_restart(broker):
    assert _roundtrip(broker.port, "t/a", b"hello") == b"hello"
    broker.stop()
    assert not broker.running
    broker.start()
    assert _roundtrip(broker.port, "t/b", b"again") == b"again"


def test_broker_log_is_readable(broker):
    # The broker writes its log where the test can read it (useful when a broker test fails).
    broker.stop()
    assert "New connection" in broker.log_text()  # wait_for_port connected once
