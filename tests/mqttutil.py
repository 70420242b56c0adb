"""Test helper: a real MQTT subscriber that records what arrives and lets tests await conditions."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool

    def json(self):
        return json.loads(self.payload)


class Collector:
    """Subscribes to `topic` (wildcards allowed) on a broker and records every message."""

    def __init__(self, port: int, topic: str = "#", host: str = "127.0.0.1", **tls_auth):
        self.messages: List[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if tls_auth.get("username"):
            self.client.username_pw_set(tls_auth["username"], tls_auth.get("password"))
        if tls_auth.get("ca_file"):
            self.client.tls_set(ca_certs=tls_auth["ca_file"])
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: self._subscribed.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect_async(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"could not subscribe to {topic} on {host}:{port}")

    def wait_subscribed(self, timeout: float = 30.0) -> bool:
        """After a broker restart paho reconnects by itself; this waits until it has re-subscribed."""
        return self._subscribed.wait(timeout)

    def _on_message(self, _c, _u, msg) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, msg.payload, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[List[Message]], bool], timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def on(self, suffix: str) -> List[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def payloads(self, suffix: str) -> list:
        return [m.json() for m in self.on(suffix)]

    def last(self, suffix: str) -> Optional[Message]:
        got = self.on(suffix)
        return got[-1] if got else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
