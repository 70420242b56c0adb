"""`edged watch` against real brokers: says when it cannot connect or is refused, says it shortens
payloads (and prints them whole with --full), says when the connection drops and resumes."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from typing import List

import paho.mqtt.publish as publish

from conftest import ROOT, free_port, retained_topics

EVENT = {"seq": 7, "type": "enter", "track_id": 3, "class": "person", "event_id": "testcam-7",
         "box": [0.1, 0.2, 0.3, 0.4], "camera": "cam0", "ts": "2024-01-01T00:00:00Z"}


def _watch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", "watch", "--host", "127.0.0.1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _publish_retained(port: int, topic: str, payload: str) -> None:
    publish.single(topic, payload, qos=1, retain=True, hostname="127.0.0.1", port=port)


def test_unreachable_broker_is_said_and_timeout_exits_nonzero():
    port = free_port()  # nothing listens there
    r = _watch("--port", str(port), "--timeout", "2")
    assert r.returncode == 1
    assert f"edged watch: cannot connect to 127.0.0.1:{port}: Connection refused; retrying in" in r.stderr
    assert f"gave up: 127.0.0.1:{port} unreachable for 2 s" in r.stderr
    assert r.stdout == ""


def test_refused_by_the_broker_is_said_and_exits_nonzero(broker_factory, tmp_path):
    from _mqtt_helpers import gated_broker

    broker, _ = gated_broker(broker_factory, tmp_path)  # passwords required; we bring none
    r = _watch("--port", str(broker.port))
    assert r.returncode == 1
    assert f"edged watch: 127.0.0.1:{broker.port} refused the connection: Not authorized" in r.stderr


def test_payloads_are_shortened_and_said_so_full_prints_them_whole(broker):
    payload = json.dumps(EVENT)
    _publish_retained(broker.port, "edged/testcam/events", payload)
    r = _watch("--port", str(broker.port), "--device", "testcam", "--count", "1", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    brief = {k: EVENT[k] for k in ("seq", "type", "track_id", "class")}
    assert r.stdout == f"edged/testcam/events (retained): {json.dumps(brief)}\n"
    assert "payloads are shortened to seq, type, track_id" in r.stderr and "--full prints them whole" in r.stderr
    r = _watch("--port", str(broker.port), "--device", "testcam", "--count", "1", "--full")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"edged/testcam/events (retained): {payload}\n"
    assert "shortened" not in r.stderr


def test_lost_connection_is_said_and_watching_resumes(broker):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "watch", "--host", "127.0.0.1", "--port", str(broker.port),
         "--device", "testcam", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    seen: List[str] = []

    def next_line_with(text: str) -> str:
        while True:
            line = lines.get(timeout=30)
            seen.append(line)
            if text in line:
                return line

    try:
        next_line_with(f"subscribed to edged/testcam/# on 127.0.0.1:{broker.port}")
        broker.stop()
        assert f"connection to 127.0.0.1:{broker.port} lost" in next_line_with("lost")
        broker.start()
        next_line_with("subscribed to edged/testcam/#")
        publish.single("edged/testcam/events", json.dumps(EVENT), qos=1, hostname="127.0.0.1", port=broker.port)
        assert proc.wait(timeout=30) == 0, "".join(seen)
        assert proc.stdout.read().startswith('edged/testcam/events: {"seq": 7, "type": "enter"')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()


def test_clear_retained_deletes_one_devices_retained_messages_only(broker):
    _publish_retained(broker.port, "edged/old-cam/availability", "offline")
    _publish_retained(broker.port, "edged/old-cam/state", json.dumps({"tracks": 0}))
    _publish_retained(broker.port, "edged/door/availability", "online")
    r = _watch("--port", str(broker.port), "--device", "old-cam", "--clear-retained", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["cleared retained edged/old-cam/availability",
                                            "cleared retained edged/old-cam/state"]
    assert retained_topics(broker.port, "edged/#") == ["edged/door/availability"]
