"""MQTT delivery: drains the durable Outbox to the broker with paho-mqtt 2.x (MQTT 5 or 3.1.1).

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

Protocol (`mqtt.protocol`): `5`, `3.1.1`, or `auto`: MQTT 5 first; a broker that refuses version 5 (CONNACK
0x84 "Unsupported protocol version", as NATS answers, or the connection closed before any CONNACK, as
RabbitMQ 3.x does) gets MQTT 3.1.1 from then on, for every reconnect of this run. paho fixes the protocol
when a client is made, so switching means a new paho client (its callbacks carry a generation number; late
callbacks of the old one are ignored). On 3.1.1 there are no PUBACK reason codes (a denied publish looks
delivered), no Receive Maximum, no message expiry; the event contract is the same.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Optional, Tuple, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.config import MqttConfig, default_client_id, resolve_path
from edged.mqtt.outbox import Outbox
from edged.mqtt.topics import OFFLINE, ONLINE, Topics

log = logging.getLogger("edged.mqtt")

NOT_AUTHORIZED = 0x87
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # paho reports a 3.1.1 CONNACK "unacceptable protocol version" as this too
PAHO_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
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
        self.topics = topics or Topics(cfg.topic_prefix, device_id, cfg.site)
        self.client_id = cfg.client_id or default_client_id(device_id, self.topics.site)
        self._config_path = config_path
        self._password = password if password is not None else cfg.password
        # The protocol being used (or tried); settled once a broker answered a CONNECT with a CONNACK
        # in it (auto mode keeps it for every reconnect of this run).
        self._protocol = "5" if cfg.protocol in ("auto", "5") else "3.1.1"
        self._protocol_settled = cfg.protocol != "auto"
        self._negotiated: Optional[str] = None  # the protocol of the last accepted connection
        self._generation = 0  # of the paho client; events of an older one are ignored
        self._switches = 0  # protocol switches after a connection closed without CONNACK (auto mode)
        self._start_due: Optional[float] = None  # when to start a client made by a protocol switch
        self._on_status = on_status
        self._events: Deque[Tuple[Any, ...]] = deque()  # filled by paho callbacks, drained by our thread
        self._wake = threading.Event()
        self._online = threading.Event()  # connected and `online` acknowledged by the broker
        self._session_up = False  # CONNACK success seen, no disconnect since (publisher thread only)
        self._online_mid: Optional[int] = None
        self._stopped = threading.Event()
        self._started = False
        # topic filter -> (QoS, on_message), subscribed at every connect
        self._subscriptions: Dict[str, Tuple[int, Callable[[str, bytes, bool], None]]] = {}
        self._stop_at: Optional[float] = None
        self._drain_on_stop = True
        self._stop_reserve = 1.0
        self._thread: Optional[threading.Thread] = None
        # mid -> (row id or None for our own availability messages, topic)
        self._inflight: Dict[int, Tuple[Optional[int], str]] = {}
        self._sent_at: Dict[int, float] = {}  # mid -> monotonic time handed to paho (stall detection)
        # mids of QoS 0 rows handed to paho and not yet written to the socket (paho's "ack" for QoS 0).
        # paho drops unwritten packets when it reconnects and never reports them: see _handle_disconnect.
        self._qos0: set = set()
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
        self._client = self._make_client()

    # ------------------------------------------------------------------------------------ setup
    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=PAHO_PROTOCOLS[self._protocol])
        c.reconnect_delay_set(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(self.cfg.max_inflight)
        c.max_queued_messages_set(0)  # our window bounds paho's queue; the outbox is the real queue
        c.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        if self.cfg.username is not None:
            c.username_pw_set(self.cfg.username, self._password)
        elif self._password:
            log.warning("mqtt: a password is set but no username; the password is not sent")
        if self.cfg.tls.enabled:
            c.tls_set_context(build_tls_context(self.cfg, self._config_path))
            c.tls_insecure_set(not self.cfg.tls.verify_hostname)
        # Run in paho's thread under its locks: only enqueue (tagged with this client's generation) and
        # wake the publisher thread.
        gen = self._generation
        c.on_connect = lambda _c, _u, _f, rc, props: self._post(gen, "connect", rc, props)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self._post(gen, "disconnect", rc)
        c.on_publish = lambda _c, _u, mid, rc, _p: self._post(gen, "ack", mid, rc)
        c.on_connect_fail = lambda _c, _u: self._post(gen, "connect_fail")
        for topic, (_qos, on_message) in self._subscriptions.items():
            self._add_message_callback(c, topic, on_message)
        return c

    @staticmethod
    def _add_message_callback(c: mqtt.Client, topic: str, on_message: Callable[[str, bytes, bool], None]) -> None:
        c.message_callback_add(topic, lambda _c, _u, msg: on_message(msg.topic, msg.payload, bool(msg.retain)))

    def _post(self, generation: int, *event: Any) -> None:
        self._events.append((generation, *event))
        self._wake.set()

    def _switch_protocol(self, protocol: str, why: str, delay: float = 0.0) -> None:
        """Auto mode: try `protocol` with a new paho client (paho fixes the protocol per client), after
        `delay` seconds (the run loop starts it)."""
        old = self._client
        self._protocol = protocol
        self._generation += 1
        try:
            old.disconnect()
        except Exception:  # not connected
            pass
        old.loop_stop()  # returns at once: the old client is between attempts (disconnect() ends its wait)
        if self._inflight or self._sent_at:  # never before a first connection; kept safe anyway
            self._inflight.clear()
            self._sent_at.clear()
            self._qos0.clear()
            self._cursor = 0  # unacknowledged rows are still in the outbox: send them again
        self._refused_pending = False
        log.info("mqtt: %s:%d %s; trying MQTT %s%s", self.cfg.host, self.cfg.port, why, protocol,
                 f" in {delay:.1f} s" if delay > 0 else "")
        self._client = self._make_client()
        self._start_due = time.monotonic() + delay
        self._start_client_when_due()

    def _start_client_when_due(self) -> None:
        if self._start_due is not None and time.monotonic() >= self._start_due:
            self._start_due = None
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
            self._client.loop_start()

    # ------------------------------------------------------------------------------------ public API
    def start(self, spawn: Optional[Callable[[str, Callable[[], None]], Any]] = None) -> None:
        """Start connecting in the background; never blocks on, or fails because of, the broker.
        `spawn(name, body)` runs the publisher loop in a supervised thread (restarted when it raises);
        without it, a plain thread runs it once."""
        if self._thread is not None or self._started:
            raise RuntimeError("MqttPublisher already started")
        self._started = True
        log.info(
            "mqtt: connecting to %s:%d as %s (MQTT %s, user %s, tls %s), topics under %s/",
            self.cfg.host, self.cfg.port, self.client_id, self.cfg.protocol, self.cfg.username or "-",
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
        self._subscriptions[topic] = (qos, on_message)
        self._add_message_callback(self._client, topic, on_message)
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
            # MQTT version of the current (or last) connection: "5" or "3.1.1"; None before the first one.
            "protocol": self._negotiated,
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
            "expired": counts.get("expired", 0),
            "qos0_unsent": counts.get("qos0_unsent", 0),
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
            elif self._start_due is not None:
                timeout = max(0.0, min(timeout, self._start_due - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            self._handle_events()
            if self._stop_at is None:
                self._start_client_when_due()
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
            generation, *ev = self._events.popleft()
            if generation != self._generation:
                continue  # from a paho client replaced by a protocol switch
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
        self._qos0.discard(mid)
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
                log.info("mqtt: online (MQTT %s, window %d, %d queued)", self._protocol, self._window, self.outbox.depth())
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
        if code == UNSUPPORTED_PROTOCOL_VERSION and self._protocol == "5" and not self._protocol_settled:
            self._protocol_settled = True  # the broker said so: 3.1.1 for the rest of this run
            log.warning("mqtt: %s:%d does not speak MQTT 5 (%s); using MQTT 3.1.1 from now on: no PUBACK reason "
                        "codes (a denied publish is not seen), no message expiry", self.cfg.host, self.cfg.port,
                        _rc_text(rc))
            self._switch_protocol("3.1.1", "refused MQTT 5")
            return
        if not self._protocol_settled:
            self._protocol_settled = True  # a CONNACK in this protocol: the broker speaks it
            log.info("mqtt: %s:%d speaks MQTT %s; keeping it for this run", self.cfg.host, self.cfg.port, self._protocol)
        if code >= 0x80:
            with self._stats_lock:
                self._counts["connect_refused"] += 1
                self._last_error = f"connection refused: {_rc_text(rc)}"
            n = self._counts["connect_refused"]
            hint = ("; it does not speak MQTT 5: set mqtt.protocol to auto or 3.1.1"
                    if code == UNSUPPORTED_PROTOCOL_VERSION and self._protocol == "5" else "")
            if n == 1 or n % 20 == 0:
                log.warning("mqtt: %s:%d refused the connection: %s (user %s; %d times)%s",
                            self.cfg.host, self.cfg.port, _rc_text(rc), self.cfg.username or "-", n, hint)
            self._status("connect_refused", {"reason": str(rc), "code": code})
            self._refused_pending = True
            return
        server_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        self._window = min(self.cfg.max_inflight, int(server_max)) if server_max else self.cfg.max_inflight
        with self._stats_lock:
            self._counts["connects"] += 1
            self._negotiated = self._protocol
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
        for topic, (qos, _on_message) in list(self._subscriptions.items()):
            self._client.subscribe(topic, qos=qos)
        log.debug("mqtt: connected to %s:%d, publishing online", self.cfg.host, self.cfg.port)

    def _handle_disconnect(self, rc: Any) -> None:
        was_online = self._session_up
        self._session_up = False
        self._online.clear()
        if not was_online:
            # Dropped before CONNACK (e.g. TLS client certificate rejected after the handshake, or a
            # broker that closes on a protocol version it does not know); a refused CONNACK was already
            # reported as connect_refused.
            if not self._refused_pending:
                self._connect_failed(f"connection closed before CONNACK: {_rc_text(rc)}")
                if not self._protocol_settled and self._stop_at is None:
                    # No answer in this protocol: try the other one (RabbitMQ 3.x closes on a v5 CONNECT).
                    # At once the first time; with backoff when neither got an answer (then the protocol
                    # is not the problem, and alternating must not become a busy loop).
                    other = "3.1.1" if self._protocol == "5" else "5"
                    delay = 0.0 if self._switches == 0 else min(
                        self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2 ** (self._switches - 1))
                    self._switches += 1
                    self._switch_protocol(other, f"closed the connection on an MQTT {self._protocol} CONNECT", delay)
                    return
            self._refused_pending = False
            return
        self._forget_unwritten_qos0()
        with self._stats_lock:
            self._counts["disconnects"] += 1
            if _rc_value(rc) != 0:
                self._last_error = f"disconnected: {_rc_text(rc)}"
        log.warning("mqtt: disconnected from %s:%d: %s; %d queued, reconnecting",
                    self.cfg.host, self.cfg.port, _rc_text(rc), self.outbox.depth())
        self._status("disconnected", {"reason": str(rc)})

    def _forget_unwritten_qos0(self) -> None:
        """QoS 0 rows paho had not written to the socket when the connection went (a full send buffer on a
        dead link): paho drops them at the reconnect without a callback. Left in flight, each would hold
        a window slot for good (enough of them stop delivery). At most once: they are deleted, counted
        `qos0_unsent` (position updates and stats; events are QoS 1 by default)."""
        if not self._qos0:
            return
        rows = []
        with self._stats_lock:
            for mid in self._qos0:
                entry = self._inflight.pop(mid, None)
                if entry is not None and entry[0] is not None:
                    rows.append(entry[0])
            self._counts["qos0_unsent"] += len(rows)
        self._qos0.clear()
        if rows:
            log.info("mqtt: %d QoS 0 messages were not written before the connection was lost; dropped", len(rows))
            self._acked_pending.extend(rows)

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
        expiry = float(self.cfg.position_expiry_s)
        now = time.time()
        for row in rows:
            properties = None
            if expiry > 0 and row.kind == "position":
                left = expiry - (now - row.created)
                if left <= 0:  # stale (queued through an outage): not worth sending
                    with self._stats_lock:
                        self._counts["expired"] += 1
                    drop.append(row.id)
                    self._cursor = row.id
                    continue
                if self._protocol == "5":  # the broker drops it for subscribers that get it too late
                    properties = Properties(PacketTypes.PUBLISH)
                    properties.MessageExpiryInterval = max(1, math.ceil(left))
            try:
                info = self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain,
                                            properties=properties)
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
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and row.qos == 0:
                break  # paho does not keep QoS 0 without a connection: send it after the reconnect
            # NO_CONN (QoS 1/2): paho keeps it in its session and sends it after the reconnect.
            with self._stats_lock:
                self._inflight[info.mid] = (row.id, row.topic)
            if row.qos > 0:
                self._sent_at[info.mid] = time.monotonic()
            else:
                self._qos0.add(info.mid)
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


def tool_client(cfg: MqttConfig, config_path: Union[str, Path, None] = None,
                protocol: Optional[str] = None) -> mqtt.Client:
    """A paho client for the command-line tools (`edged watch`, `edged config push`) with the daemon's
    own credentials and TLS set-up (same file resolution, same clear errors: MqttSetupError/ConfigError).
    `protocol` ("5" or "3.1.1", e.g. from `probe_protocol`) defaults to mqtt.protocol (auto: 5)."""
    from edged.config import read_password

    protocol = protocol or ("5" if cfg.protocol == "auto" else cfg.protocol)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=PAHO_PROTOCOLS[protocol])
    if cfg.username:
        client.username_pw_set(cfg.username, read_password(cfg, config_path))
    if cfg.tls.enabled:
        client.tls_set_context(build_tls_context(cfg, config_path))
        client.tls_insecure_set(not cfg.tls.verify_hostname)
    return client


def probe_protocol(cfg: MqttConfig, host: str, port: int, config_path: Union[str, Path, None] = None,
                   timeout: float = 10.0) -> str:
    """The protocol a tool should use: mqtt.protocol, or with `auto` what the broker answers to an MQTT 5
    CONNECT: "3.1.1" when it refuses the version (CONNACK 0x84) or closes without a CONNACK, else "5"
    (also when it cannot be reached: the tool then reports that itself)."""
    if cfg.protocol != "auto":
        return cfg.protocol
    client = tool_client(cfg, config_path, "5")
    answer: Dict[str, Any] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        answer["code"] = _rc_value(rc)
        done.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        answer.setdefault("closed", True)
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(host, port, keepalive=max(5, int(timeout)))
    except (OSError, ValueError):
        return "5"
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        try:
            client.disconnect()
        finally:
            client.loop_stop()
    if answer.get("code") == UNSUPPORTED_PROTOCOL_VERSION or ("code" not in answer and answer.get("closed")):
        return "3.1.1"
    return "5"
