"""Test helpers for the MQTT delivery tests: a real subscriber, a credential "gate" on a real broker.

The gate: the broker requires passwords; closing the gate gives the device user a password the
device does not know, so the device is refused while the test's own subscriber connects and
subscribes; opening the gate restores it and SIGHUPs mosquitto (which reloads password_file).
Without it, a publisher that reconnects before the test's subscriber has re-subscribed after a
broker restart would deliver into the void and the test could not tell loss from a race.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edged.config import MqttConfig

DEVICE_USER, DEVICE_PASSWORD = "device1", "device-secret-1"
SUB_USER, SUB_PASSWORD = "watcher", "watcher-secret"


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll a condition that has no event to wait on (e.g. a row count in SQLite)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def world_readable_dir(prefix: str = "edged-mqtt-") -> Path:
    """A directory mosquitto can read after dropping privileges to user 'mosquitto'.

    pytest's tmp_path lives under /tmp/pytest-of-<user>/ (mode 0700), which that user cannot
    traverse, so password/ACL/certificate files go here instead (removed at interpreter exit)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    atexit.register(shutil.rmtree, d, True)
    return d


def mosquitto_passwd_file(path: Path, users: List[Tuple[str, str]]) -> None:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("")
    for user, password in users:
        subprocess.run([exe, "-b", str(path), user, password], check=True, capture_output=True)
    os.chmod(path, 0o644)  # mosquitto drops privileges to user 'mosquitto' and reads it again on SIGHUP


class Gate:
    """Password-file gate on a broker (see module docstring)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "passwd"
        self._open = workdir / "passwd.open"
        self._closed = workdir / "passwd.closed"
        mosquitto_passwd_file(self._open, [(DEVICE_USER, DEVICE_PASSWORD), (SUB_USER, SUB_PASSWORD)])
        mosquitto_passwd_file(self._closed, [(DEVICE_USER, "not-the-device-password"), (SUB_USER, SUB_PASSWORD)])
        self.path.write_bytes(self._open.read_bytes())
        os.chmod(self.path, 0o644)
        self.broker = None

    def conf(self, port: int) -> List[str]:
        # max_queued_messages 0: mosquitto queues at most 1000 messages per subscriber by default and
        # silently drops the rest; a backlog drained after a long outage would overflow our Python
        # subscriber's queue, a loss between broker and subscriber that is not the device's.
        return [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {self.path}",
                "max_queued_messages 0"]

    def close(self) -> None:
        self.path.write_bytes(self._closed.read_bytes())
        self._reload()

    def open(self) -> None:
        self.path.write_bytes(self._open.read_bytes())
        self._reload()

    def _reload(self) -> None:
        if self.broker is not None and self.broker.running:
            self.broker.proc.send_signal(signal.SIGHUP)


def gated_broker(broker_factory, tmp_path: Path, start: bool = True):
    from conftest import free_port

    port = free_port()
    gate = Gate(world_readable_dir())
    b = broker_factory(extra_conf=gate.conf(port), port=port, start=start)
    gate.broker = b
    return b, gate


def device_cfg(port: int, **kw) -> MqttConfig:
    base = dict(
        host="127.0.0.1", port=port, username=DEVICE_USER, reconnect_min_s=0.05, reconnect_max_s=0.3,
        keepalive=10, topic_prefix="edged",
    )
    base.update(kw)
    return MqttConfig(**base)


class Collector:
    """A real subscriber that records every message; re-subscribes after each reconnect."""

    def __init__(self, port: int, topic: str, *, username: Optional[str] = SUB_USER,
                 password: Optional[str] = SUB_PASSWORD, tls_ctx=None, qos: int = 1):
        self.topic = topic
        self.qos = qos
        self.messages: List[mqtt.MQTTMessage] = []
        self.seq_list: List[int] = []  # "seq" of JSON payloads, parsed once on arrival
        self.seq_set: set = set()
        self.cond = threading.Condition()
        self.subscribed_count = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.05, 0.2)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ctx is not None:
            self.client.tls_set_context(tls_ctx)
        self.client.on_connect = lambda c, u, f, rc, p: (not rc.is_failure) and c.subscribe(topic, qos=qos)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:
        with self.cond:
            self.subscribed_count += 1
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        seq = None
        try:
            body = json.loads(msg.payload)
            seq = body.get("seq") if isinstance(body, dict) else None
        except ValueError:
            pass
        with self.cond:
            self.messages.append(msg)
            if isinstance(seq, int):
                self.seq_list.append(seq)
                self.seq_set.add(seq)
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def wait_subscribed(self, times: int = 1, timeout: float = 10.0) -> bool:
        return self.wait(lambda: self.subscribed_count >= times, timeout)

    def payloads(self) -> List[bytes]:
        with self.cond:
            return [m.payload for m in self.messages]

    def seqs(self) -> List[int]:
        with self.cond:
            return list(self.seq_list)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_value(port: int, topic: str, timeout: float = 10.0, **kw) -> Optional[bytes]:
    """What a fresh subscriber receives as the retained message on `topic`."""
    c = Collector(port, topic, **kw)
    try:
        c.wait(lambda: len(c.messages) > 0, timeout)
        with c.cond:
            retained = [m for m in c.messages if m.retain]
        return retained[0].payload if retained else None
    finally:
        c.close()
