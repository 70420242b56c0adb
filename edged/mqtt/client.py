"""MQTT delivery: drains the durable Outbox to the broker with paho-mqtt 2.x (MQTT v5).

Threads:
  - paho's network loop (`loop_start`): its callbacks run under paho's locks, so they only append
    to a queue and wake the publisher thread;
  - ONE publisher thread (this module): reads the queue, publishes outbox rows in id order while
    connected, keeps at most `window` messages unacknowledged, deletes a row only when the broker
    acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2, written to the socket for QoS 0).

Reconnects: rows in flight when the connection dropped stay queued in paho's session and are
re-sent by paho after the reconnect (duplicates are possible; consumers de-duplicate by event_id).
The outbox keeps every row until acknowledged, so a crash loses nothing either: the next process
starts at the oldest row.

A publish refused by the broker (MQTT v5 reason code >= 0x80 in PUBACK/PUBREC, e.g. 0x87 "Not
authorized" from an ACL) is logged as a warning, counted (`denied` for 0x87, `rejected` for other
codes) and its row is deleted: retrying a refused message forever would block the queue.
QoS 0 publishes get no acknowledgement, so an ACL denial of a QoS 0 message cannot be seen.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Optional, Tuple, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edged.config import MqttConfig, resolve_path
from edged.mqtt.outbox import Outbox
from edged.mqtt.topics import OFFLINE, ONLINE, Topics

log = logging.getLogger("edged.mqtt")

NOT_AUTHORIZED = 0x87
StatusCallback = Callable[[str, Dict[str, Any]], None]


class MqttSetupError(Exception):
    """The MQTT settings cannot be used (e.g. an unreadable TLS file); names the config key."""


def _rc_value(rc: Any) -> int:
    return int(rc.value) if isinstance(rc, ReasonCode) else int(rc)


def _rc_text(rc: Any) -> str:
    return f"{rc} (0x{_rc_value(rc):02x})"


def build_tls_context(cfg: MqttConfig, config_path: Union[str, Path, None] = None) -> ssl.SSLContext:
    """SSL context from mqtt.tls: CA file (else the system CAs), optional client cert/key."""
    tls = cfg.tls
    ca = str(resolve_path(tls.ca_file, config_path)) if tls.ca_file else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise MqttSetupError(f"mqtt.tls.ca_file: cannot load {ca}: {exc}") from None
    if tls.cert_file and tls.key_file:
        cert = str(resolve_path(tls.cert_file, config_path))
        key = str(resolve_path(tls.key_file, config_path))
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise MqttSetupError(f"mqtt.tls.cert_file/key_file: cannot load {cert} / {key}: {exc}") from None
    ctx.check_hostname = bool(tls.verify_hostname)
    return ctx


class MqttPublisher:
    """Publishes the outbox to the broker; see the module docstring for the guarantees.

    `on_status(event, info)` is called from the publisher thread with event one of
    "connected", "disconnected", "connect_refused", "connect_failed", "denied", "rejected".
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        device_id: str,
        outbox: Outbox,
        password: Optional[str] = None,
        on_status: Optional[StatusCallback] = None,
        config_path: Union[str, Path, None] = None,
    ):
        self.cfg = cfg
        self.device_id = device_id
        self.outbox = outbox
        self.topics = Topics(cfg.topic_prefix, device_id)
        self.client_id = cfg.client_id or f"edged-{device_id}"
        self._password = password if password is not None else cfg.password
        self._on_status = on_status
        self._events: Deque[Tuple[Any, ...]] = deque()  # filled by paho callbacks, drained by our thread
        self._wake = threading.Event()
        self._online = threading.Event()  # connected and `online` acknowledged by the broker
        self._session_up = False  # CONNACK success seen, no disconnect since (publisher thread only)
        self._online_mid: Optional[int] = None
        self._stopped = threading.Event()
        self._stop_at: Optional[float] = None
        self._drain_on_stop = True
        self._stop_reserve = 1.0
        self._thread: Optional[threading.Thread] = None
        # mid -> (row id or None for our own availability messages, topic)
        self._inflight: Dict[int, Tuple[Optional[int], str]] = {}
        self._cursor = 0  # highest outbox row id handed to paho
        self._window = cfg.max_inflight
        # token bucket for mqtt.max_rate (publishes per second; 0 = unlimited)
        self._rate = float(getattr(cfg, "max_rate", 0.0) or 0.0)
        self._tokens = float(max(1.0, min(self._rate, cfg.max_inflight)))
        self._tokens_at = time.monotonic()
        self._next_token_in: Optional[float] = None
        self._offline_mid: Optional[int] = None
        self._offline_acked = False
        self._counts: Counter = Counter()
        self._last_error: Optional[str] = None
        self._refused_pending = False
        self._stats_lock = threading.Lock()
        self._client = self._make_client(config_path)

    # ------------------------------------------------------------------------------------ setup
    def _make_client(self, config_path: Union[str, Path, None]) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(self.cfg.max_inflight)
        c.max_queued_messages_set(0)  # our window bounds paho's queue; the outbox is the real queue
        c.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        if self.cfg.username is not None:
            c.username_pw_set(self.cfg.username, self._password)
        elif self._password:
            log.warning("mqtt: a password is set but no username; the password is not sent")
        if self.cfg.tls.enabled:
            c.tls_set_context(build_tls_context(self.cfg, config_path))
            c.tls_insecure_set(not self.cfg.tls.verify_hostname)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_publish = self._cb_publish
        c.on_connect_fail = self._cb_connect_fail
        return c

    # ------------------------------------------------------------------------------------ paho callbacks
    # Run in paho's thread under its locks: only enqueue and wake the publisher thread.
    def _post(self, *event: Any) -> None:
        self._events.append(event)
        self._wake.set()

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._post("connect", reason_code, properties)

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._post("disconnect", reason_code)

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._post("ack", mid, reason_code)

    def _cb_connect_fail(self, client, userdata) -> None:
        self._post("connect_fail")

    # ------------------------------------------------------------------------------------ public API
    def start(self) -> None:
        """Start connecting in the background; never blocks on, or fails because of, the broker."""
        if self._thread is not None:
            raise RuntimeError("MqttPublisher already started")
        log.info(
            "mqtt: connecting to %s:%d as %s (user %s, tls %s), topics under %s/",
            self.cfg.host, self.cfg.port, self.client_id, self.cfg.username or "-",
            "on" if self.cfg.tls.enabled else "off", self.topics.base,
        )
        self.outbox.add_listener(self._wake.set)
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="edged-mqtt-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0, drain: bool = True) -> None:
        """Stop: while connected, keep delivering queued rows (`drain`) for up to most of `timeout`,
        then publish retained `offline`, wait for its PUBACK, disconnect. Undelivered rows stay in
        the outbox for the next start."""
        if self._thread is None:
            return
        self._drain_on_stop = drain
        # time kept for `offline` and its PUBACK after draining
        self._stop_reserve = min(1.0, 0.3 * max(0.0, timeout))
        self._stop_at = time.monotonic() + max(0.0, timeout)
        self._wake.set()
        self._thread.join(timeout + 5.0)
        self.outbox.remove_listener(self._wake.set)
        self._thread = None

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """True once connected and `online` published (for tests and start-up checks)."""
        return self._online.wait(timeout)

    def stats(self) -> Dict[str, Any]:
        with self._stats_lock:
            counts = dict(self._counts)
            inflight = sum(1 for rid, _t in self._inflight.values() if rid is not None)
            last_error = self._last_error
        outbox = self.outbox.counters()
        return {
            "connected": self.connected,
            "outbox_depth": self.outbox.depth(),
            "outbox_bytes": self.outbox.bytes(),
            "inflight": inflight,
            "published": counts.get("published", 0),
            "denied": counts.get("denied", 0),
            "rejected": counts.get("rejected", 0),
            "connects": counts.get("connects", 0),
            "reconnects": max(0, counts.get("connects", 0) - 1),
            "disconnects": counts.get("disconnects", 0),
            "connect_refused": counts.get("connect_refused", 0),
            "connect_failed": counts.get("connect_failed", 0),
            "dropped": outbox["dropped"],
            "coalesced": outbox["coalesced"],
            "last_error": last_error,
        }

    # ------------------------------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        try:
            while True:
                timeout = 0.5
                if self._next_token_in is not None:
                    timeout = min(timeout, self._next_token_in)
                if self._stop_at is not None:
                    timeout = max(0.0, min(timeout, self._stop_at - time.monotonic()))
                self._wake.wait(timeout)
                self._wake.clear()
                self._handle_events()
                if self._stop_at is None:
                    if self._online.is_set():
                        self._fill_window()
                elif self._stopping_step():
                    break
        except Exception:  # never let the thread die silently: the outbox still holds everything
            log.exception("mqtt: publisher thread failed; messages stay in the outbox")
        finally:
            self._shutdown_client()
            self._stopped.set()

    def _stopping_step(self) -> bool:
        """One step of the shutdown sequence; True when done."""
        assert self._stop_at is not None
        now = time.monotonic()
        online = self._session_up
        if self._offline_mid is None:
            has_rows = any(rid is not None for rid, _t in self._inflight.values()) or bool(
                self.outbox.peek(1, after_id=self._cursor)
            )
            if self._online.is_set() and self._drain_on_stop and has_rows and now < self._stop_at - self._stop_reserve:
                self._fill_window()
                return False
            if not online:
                return True
            info = self._client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
            self._offline_mid = info.mid
            with self._stats_lock:
                self._inflight[info.mid] = (None, self.topics.availability)
            return False
        return self._offline_acked or not online or now >= self._stop_at

    def _shutdown_client(self) -> None:
        try:
            self._client.disconnect()
        except Exception:  # already disconnected
            pass
        self._client.loop_stop()
        self._session_up = False
        self._online.clear()

    def _handle_events(self) -> None:
        acked = []
        while self._events:
            ev = self._events.popleft()
            kind = ev[0]
            if kind == "ack":
                self._handle_ack(ev[1], ev[2], acked)
            elif kind == "connect":
                self._handle_connect(ev[1], ev[2])
            elif kind == "disconnect":
                self._handle_disconnect(ev[1])
            elif kind == "connect_fail":
                self._connect_failed("unreachable (TCP or TLS handshake failed)")
        if acked:
            self.outbox.ack_many(acked)

    def _connect_failed(self, why: str) -> None:
        with self._stats_lock:
            self._counts["connect_failed"] += 1
            self._last_error = f"connect failed: {why}"
            n = self._counts["connect_failed"]
        if n == 1 or n % 20 == 0:
            log.warning("mqtt: broker %s:%d %s; retrying (%d attempts)", self.cfg.host, self.cfg.port, why, n)
        self._status("connect_failed", {"attempts": n, "reason": why})

    def _handle_ack(self, mid: int, rc: Any, acked: list) -> None:
        with self._stats_lock:
            entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        row_id, topic = entry
        if row_id is None:  # our availability message
            if mid == self._offline_mid:
                self._offline_acked = True
            elif mid == self._online_mid and self._session_up:
                if _rc_value(rc) >= 0x80:
                    log.warning("mqtt: broker refused `online` on %s: %s (check the ACL)", topic, _rc_text(rc))
                log.info("mqtt: online (window %d, %d queued)", self._window, self.outbox.depth())
                self._online.set()
                self._status("connected", {"reconnects": self._counts["connects"] - 1})
            return
        acked.append(row_id)
        code = _rc_value(rc)
        if code < 0x80:
            with self._stats_lock:
                self._counts["published"] += 1
            return
        what = "denied" if code == NOT_AUTHORIZED else "rejected"
        with self._stats_lock:
            self._counts[what] += 1
            self._last_error = f"publish to {topic} {what}: {_rc_text(rc)}"
        log.warning("mqtt: broker %s the publish to %s: %s; message dropped (row %d)",
                    what, topic, _rc_text(rc), row_id)
        self._status(what, {"topic": topic, "reason": str(rc), "code": code, "row_id": row_id})

    def _handle_connect(self, rc: Any, properties: Any) -> None:
        code = _rc_value(rc)
        if code >= 0x80:
            with self._stats_lock:
                self._counts["connect_refused"] += 1
                self._last_error = f"connection refused: {_rc_text(rc)}"
            n = self._counts["connect_refused"]
            if n == 1 or n % 20 == 0:
                log.warning("mqtt: %s:%d refused the connection: %s (user %s; %d times)",
                            self.cfg.host, self.cfg.port, _rc_text(rc), self.cfg.username or "-", n)
            self._status("connect_refused", {"reason": str(rc), "code": code})
            self._refused_pending = True
            return
        server_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        self._window = min(self.cfg.max_inflight, int(server_max)) if server_max else self.cfg.max_inflight
        with self._stats_lock:
            self._counts["connects"] += 1
        self._session_up = True
        # Availability first, on every (re)connect: the backlog follows once the broker acked it,
        # so `connected`/wait_connected() imply a fresh subscriber sees the retained `online`.
        info = self._client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        self._online_mid = info.mid
        with self._stats_lock:
            self._inflight[info.mid] = (None, self.topics.availability)
        log.debug("mqtt: connected to %s:%d, publishing online", self.cfg.host, self.cfg.port)

    def _handle_disconnect(self, rc: Any) -> None:
        was_online = self._session_up
        self._session_up = False
        self._online.clear()
        if not was_online:
            # Dropped before CONNACK (e.g. TLS client certificate rejected after the handshake);
            # a refused CONNACK was already reported as connect_refused.
            if not self._refused_pending:
                self._connect_failed(f"connection closed before CONNACK: {_rc_text(rc)}")
            self._refused_pending = False
            return
        with self._stats_lock:
            self._counts["disconnects"] += 1
            if _rc_value(rc) != 0:
                self._last_error = f"disconnected: {_rc_text(rc)}"
        log.warning("mqtt: disconnected from %s:%d: %s; %d queued, reconnecting",
                    self.cfg.host, self.cfg.port, _rc_text(rc), self.outbox.depth())
        self._status("disconnected", {"reason": str(rc)})

    def _rate_room(self) -> int:
        """Publishes the rate limit allows now; sets when to look again if none."""
        self._next_token_in = None
        if self._rate <= 0:
            return 1 << 30
        now = time.monotonic()
        burst = max(1.0, min(self._rate, float(self._window)))
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            self._next_token_in = (1.0 - self._tokens) / self._rate
            return 0
        return int(self._tokens)

    def _fill_window(self) -> None:
        room = min(self._window - len(self._inflight), self._rate_room())
        if room <= 0:
            return
        drop = []
        rows = self.outbox.peek(room, after_id=self._cursor)
        if self._rate > 0:
            self._tokens -= len(rows)
            if rows and self._tokens < 1.0:
                self._next_token_in = (1.0 - self._tokens) / self._rate
        for row in rows:
            try:
                info = self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            except ValueError as exc:  # paho refuses the topic/payload itself: it can never succeed
                log.warning("mqtt: cannot publish row %d to %s: %s; dropped", row.id, row.topic, exc)
                with self._stats_lock:
                    self._counts["rejected"] += 1
                drop.append(row.id)
                self._cursor = row.id
                continue
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("mqtt: paho did not queue row %d: %s", row.id, mqtt.error_string(info.rc))
                break
            # NO_CONN: paho keeps it in its session and sends it after the reconnect.
            with self._stats_lock:
                self._inflight[info.mid] = (row.id, row.topic)
            self._cursor = row.id
        if drop:
            self.outbox.ack_many(drop)

    def _status(self, event: str, info: Dict[str, Any]) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(event, info)
        except Exception:
            log.exception("mqtt: on_status callback failed for %s", event)
