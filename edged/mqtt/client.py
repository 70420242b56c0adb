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

Failures: the publisher loop may raise (e.g. `database is locked` from the outbox); it is written to be
called again by a supervisor (edged.supervisor) with every piece of state on the object: rows the broker
acknowledged but that could not be deleted yet are retried first, rows in flight stay tracked, and the
connection is left up (never a clean DISCONNECT on a failure: if the process gives up, the broker
publishes the last will). A silent link stall (no FIN/RST, nothing comes back) is noticed when a publish
waits, and nothing at all is acknowledged, for half the keepalive: the socket is shut down and paho
reconnects; paho's own keepalive ping covers an idle link.

A publish refused by the broker (MQTT v5 reason code >= 0x80 in PUBACK/PUBREC, e.g. 0x87 "Not
authorized" from an ACL) is logged as a warning, counted (`denied` for 0x87, `rejected` for other
codes) and its row is deleted: retrying a refused message forever would block the queue.
QoS 0 publishes get no acknowledgement, so an ACL denial of a QoS 0 message cannot be seen.
"""

from __future__ import annotations

import logging
import socket
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
        topics: Optional[Topics] = None,
    ):
        self.cfg = cfg
        self.device_id = device_id
        self.outbox = outbox
        self.topics = topics or Topics(cfg.topic_prefix, device_id)
        self.client_id = cfg.client_id or f"edged-{device_id}"
        self._password = password if password is not None else cfg.password
        self._on_status = on_status
        self._events: Deque[Tuple[Any, ...]] = deque()  # filled by paho callbacks, drained by our thread
        self._wake = threading.Event()
        self._online = threading.Event()  # connected and `online` acknowledged by the broker
        self._session_up = False  # CONNACK success seen, no disconnect since (publisher thread only)
        self._online_mid: Optional[int] = None
        self._stopped = threading.Event()
        self._started = False
        self._subscriptions: Dict[str, int] = {}  # topic filter -> QoS, subscribed at every connect
        self._stop_at: Optional[float] = None
        self._drain_on_stop = True
        self._stop_reserve = 1.0
        self._thread: Optional[threading.Thread] = None
        # mid -> (row id or None for our own availability messages, topic)
        self._inflight: Dict[int, Tuple[Optional[int], str]] = {}
        self._sent_at: Dict[int, float] = {}  # mid -> monotonic time handed to paho (stall detection)
        self._acked_pending: list = []  # row ids the broker acknowledged, not yet deleted from the outbox
        self._last_ack_at = time.monotonic()
        self._stalls = 0
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
    def start(self, spawn: Optional[Callable[[str, Callable[[], None]], Any]] = None) -> None:
        """Start connecting in the background; never blocks on, or fails because of, the broker.
        `spawn(name, body)` runs the publisher loop in a supervised thread (restarted when it raises);
        without it, a plain thread runs it once."""
        if self._thread is not None or self._started:
            raise RuntimeError("MqttPublisher already started")
        self._started = True
        log.info(
            "mqtt: connecting to %s:%d as %s (user %s, tls %s), topics under %s/",
            self.cfg.host, self.cfg.port, self.client_id, self.cfg.username or "-",
            "on" if self.cfg.tls.enabled else "off", self.topics.base,
        )
        self.outbox.add_listener(self._wake.set)
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()
        if spawn is not None:
            spawn("publisher", self.run_loop)
        else:
            self._thread = threading.Thread(target=self._run_unsupervised, name="edged-mqtt-publisher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0, drain: bool = True) -> None:
        """Stop: while connected, keep delivering queued rows (`drain`) for up to most of `timeout`,
        then publish retained `offline`, wait for its PUBACK, disconnect. Undelivered rows stay in
        the outbox for the next start."""
        if not self._started or self._stop_at is not None:
            return
        self._drain_on_stop = drain
        # time kept for `offline` and its PUBACK after draining
        self._stop_reserve = min(1.0, 0.3 * max(0.0, timeout))
        self._stop_at = time.monotonic() + max(0.0, timeout)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)
            self._thread = None
        else:
            self._stopped.wait(timeout + 5.0)
        self.outbox.remove_listener(self._wake.set)

    def subscribe(self, topic: str, on_message: Callable[[str, bytes, bool], None], qos: int = 1) -> None:
        """Follow `topic` (re-subscribed at every connect). `on_message(topic, payload, retained)` runs in
        paho's network thread under its locks: it must only hand the message on (e.g. put it in a queue)."""
        self._subscriptions[topic] = qos
        self._client.message_callback_add(topic, lambda _c, _u, msg: on_message(msg.topic, msg.payload, bool(msg.retain)))
        if self._session_up:
            self._client.subscribe(topic, qos=qos)

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """True once connected and `online` published (for tests and start-up checks)."""
        return self._online.wait(timeout)

    def oldest_undelivered_age_s(self) -> Optional[float]:
        """Age in seconds of the oldest queued row (None when the outbox is empty)."""
        oldest = self.outbox.oldest_created()
        return None if oldest is None else max(0.0, time.time() - oldest)

    def health(self, stall_s: Optional[float] = None) -> Tuple[bool, str]:
        """For the watchdog and /healthz. A broker that is down is not our failure (the outbox keeps
        everything), so only a publisher that is connected but delivers nothing counts as unhealthy."""
        if self._stop_at is not None or not self._started:
            return True, "ok"
        stall_s = stall_s if stall_s is not None else max(60.0, 3.0 * self.cfg.keepalive)
        if self.connected and self.outbox.depth() > 0:
            idle = time.monotonic() - self._last_ack_at
            if idle > stall_s:
                return False, f"mqtt: connected but nothing acknowledged for {idle:.0f} s with {self.outbox.depth()} queued"
        return True, "ok"

    def stats(self) -> Dict[str, Any]:
        with self._stats_lock:
            counts = dict(self._counts)
            inflight = sum(1 for rid, _t in self._inflight.values() if rid is not None)
            last_error = self._last_error
        outbox = self.outbox.counters()
        age = self.oldest_undelivered_age_s()
        return {
            "connected": self.connected,
            "outbox_depth": self.outbox.depth(),
            "outbox_bytes": self.outbox.bytes(),
            "oldest_undelivered_age_s": None if age is None else round(age, 1),
            "stalls": self._stalls,
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
    def run_loop(self) -> None:
        """The publisher loop: returns after a requested stop (clean DISCONNECT), raises on failure
        (the connection stays up; calling it again resumes where it failed)."""
        if self._acked_pending:
            self._delete_acked()
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
                    self._check_stall()
                    self._fill_window()
            elif self._stopping_step():
                break
        self._shutdown_client()
        self._stopped.set()

    def _run_unsupervised(self) -> None:
        try:
            self.run_loop()
        except Exception:
            log.exception("mqtt: publisher thread failed; messages stay in the outbox")
            self._stopped.set()

    def _check_stall(self) -> None:
        """Nothing acknowledged for half the keepalive while a publish has been waiting at least that long:
        the link is stalled (no FIN/RST). Shut the socket down so paho reconnects now, instead of after
        paho's own keepalive ping times out (up to twice the keepalive)."""
        if not self._sent_at:
            return
        now = time.monotonic()
        limit = max(1.0, 0.5 * self.cfg.keepalive)
        oldest = min(self._sent_at.values())
        if now - oldest < limit or now - self._last_ack_at < limit:
            return
        self._stalls += 1
        with self._stats_lock:
            self._last_error = f"link stalled: no acknowledgement for {now - oldest:.0f} s"
        log.warning("mqtt: no acknowledgement from %s:%d for %.0f s with %d in flight: link stalled, reconnecting",
                    self.cfg.host, self.cfg.port, now - oldest, len(self._sent_at))
        self._sent_at.clear()  # paho re-sends what is in flight after the reconnect
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
            self._acked_pending.extend(acked)
        if self._acked_pending:
            self._delete_acked()

    def _delete_acked(self) -> None:
        """Delete acknowledged rows; on failure they stay pending (retried, never re-sent)."""
        self.outbox.ack_many(self._acked_pending)
        self._acked_pending = []

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
        if self._sent_at.pop(mid, None) is not None:
            # Only a PUBACK/PUBCOMP proves the broker hears us (QoS 0 "acks" mean: written to the socket).
            self._last_ack_at = time.monotonic()
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
        self._last_ack_at = time.monotonic()
        self._sent_at.clear()
        # Availability first, on every (re)connect: the backlog follows once the broker acked it,
        # so `connected`/wait_connected() imply a fresh subscriber sees the retained `online`.
        info = self._client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        self._online_mid = info.mid
        self._sent_at[info.mid] = time.monotonic()
        with self._stats_lock:
            self._inflight[info.mid] = (None, self.topics.availability)
        for topic, qos in list(self._subscriptions.items()):
            self._client.subscribe(topic, qos=qos)
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
            if row.qos > 0:
                self._sent_at[info.mid] = time.monotonic()
            self._cursor = row.id
        if drop:
            self._acked_pending.extend(drop)
            self._delete_acked()

    def _status(self, event: str, info: Dict[str, Any]) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(event, info)
        except Exception:
            log.exception("mqtt: on_status callback failed for %s", event)


def tool_client(cfg: MqttConfig, config_path: Union[str, Path, None] = None) -> mqtt.Client:
    """A paho client for the command-line tools (`edged watch`, `edged config push`) with the daemon's
    own credentials and TLS set-up (same file resolution, same clear errors: MqttSetupError/ConfigError)."""
    from edged.config import read_password

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if cfg.username:
        client.username_pw_set(cfg.username, read_password(cfg, config_path))
    if cfg.tls.enabled:
        client.tls_set_context(build_tls_context(cfg, config_path))
        client.tls_insecure_set(not cfg.tls.verify_hostname)
    return client
