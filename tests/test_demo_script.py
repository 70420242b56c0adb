"""scripts/demo.sh against "the user's broker" (a real mosquitto it finds listening): it publishes as a
device of its own and leaves no retained message behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import ROOT, missing, retained_topics
from mqttutil import Collector

pytestmark = pytest.mark.slow


def test_retained_topics_helper_sees_retained_messages(broker):
    """The check below must be able to fail: it does find retained messages when there are some."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish("edged/edged-demo/availability", b"offline", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert retained_topics(broker.port, "edged/edged-demo/#") == ["edged/edged-demo/availability"]


def test_demo_on_an_existing_broker_leaves_no_retained_message(broker, tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "edged").exists():
        missing(f"needs the edged command next to {sys.executable} (pip install -e .)")
    seen = Collector(broker.port, "edged/#")
    env = dict(os.environ, EDGED_USE_CURRENT_ENV="1", EDGED_MQTT_HOST="127.0.0.1", EDGED_MQTT_PORT=str(broker.port),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "demo", "--max-frames", "20"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert f"using the MQTT broker at 127.0.0.1:{broker.port}" in r.stdout
        # It did publish retained messages as its own device while it ran ...
        assert seen.wait_for(lambda ms: any(m.topic == "edged/edged-demo/availability" and m.payload == b"offline"
                                            for m in ms), 30)
        assert any(m.topic == "edged/edged-demo/state" for m in seen.messages)
        # ... never as the default device id of a real installation ...
        assert not [m.topic for m in seen.messages if m.topic.startswith("edged/edged/")]
    finally:
        seen.close()
    # ... and left none of them behind.
    assert retained_topics(broker.port, "edged/#") == []
