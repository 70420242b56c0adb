"""Debug HTTP server: status page, MJPEG stream, snapshot, healthz, Prometheus metrics.

Frames are annotated only when somebody is watching, at most `mjpeg_fps` times a second, so the
server costs nothing on an unattended device. It is safe to expose: optional HTTP Basic auth, at most
`max_connections` connections (one thread each) and `max_stream_clients` viewers, and a client that
sends nothing or stops reading is dropped after `client_timeout_s`.

The server knows the daemon only through `DebugView`; it runs its accept loop in a thread made by the
caller's `spawn` (the daemon's supervisor restarts it if it raises).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import html
import ipaddress
import json
import logging
import math
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Set, Tuple, Union
from urllib.parse import urlsplit

import cv2
import numpy as np

from edged.config import LineConfig, WebConfig, ZoneConfig, read_secret
from edged.types import Frame, TrackSnapshot

log = logging.getLogger("edged.web")

Spawn = Callable[[str, Callable[[], None]], Any]

_STREAM_SNDBUF = 256 * 1024  # bytes queued per viewer: a stalled one blocks (and times out) after ~1 s of video
_STOP_JOIN_S = 5.0

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>edged {device}</title>
<style>body{{font-family:sans-serif;margin:1em;background:#111;color:#eee}}img{{max-width:100%;display:block}}
pre{{background:#222;padding:.5em}}a{{color:#8cf}}</style></head><body>
<h1>edged &middot; {device}</h1><img id="v" src="stream.mjpg" alt="live view (busy or no frame yet)">
<p><a href="snapshot.jpg">snapshot</a> &middot; <a href="metrics">metrics</a> &middot; <a href="healthz">healthz</a></p>
<pre id="s"></pre><script>
async function r(){{try{{const j=await (await fetch('status.json')).json();
document.getElementById('s').textContent=JSON.stringify(j,null,2)}}catch(e){{}}}}
r();setInterval(r,2000)</script></body></html>"""


class DebugView(Protocol):
    """What the debug server needs from the daemon."""

    @property
    def device_id(self) -> str: ...

    def latest(self) -> Tuple[Optional[Frame], List[TrackSnapshot]]:
        """The newest processed frame and its confirmed tracks."""

    def stats(self) -> Dict[str, Any]:
        """The daemon's stats (the `stats` MQTT payload): shown as status.json and /metrics."""

    def health(self) -> Tuple[bool, str]:
        """(healthy, reason) for /healthz."""

    def overlays(self) -> Tuple[Sequence[ZoneConfig], Sequence[LineConfig], Sequence[str]]:
        """(zones, lines, class names) drawn over the frame."""


class WebBindError(OSError):
    """The debug server cannot listen on web.host / web.port. An OSError (errno kept) whose text names the key."""

    def __str__(self) -> str:
        return str(self.strerror)


# Saturated colours that photographs rarely have in long straight runs (the browser test finds box edges by them).
TRACK_COLORS: Tuple[Tuple[int, int, int], ...] = (  # BGR
    (0, 255, 0), (255, 255, 0), (0, 255, 255), (255, 128, 0), (128, 0, 255), (255, 0, 128),
)
_ZONE_COLOR = (0, 200, 255)
_LINE_COLOR = (255, 0, 255)


def track_color(track_id: int) -> Tuple[int, int, int]:
    return TRACK_COLORS[track_id % len(TRACK_COLORS)]


def annotate(image: np.ndarray, tracks, zones=(), lines=(), class_names=()) -> np.ndarray:
    """Boxes with track ids, zones and lines drawn on a copy of the frame."""
    out = image.copy()
    h, w = out.shape[:2]
    for z in zones:
        pts = (np.asarray(z.polygon, np.float32) * [w, h]).astype(np.int32)
        cv2.polylines(out, [pts], True, _ZONE_COLOR, 2)
        cv2.putText(out, z.name, tuple(int(v) for v in pts[0]), cv2.FONT_HERSHEY_SIMPLEX, 0.5, _ZONE_COLOR, 1)
    for ln in lines:
        p1 = (int(ln.points[0][0] * w), int(ln.points[0][1] * h))
        p2 = (int(ln.points[1][0] * w), int(ln.points[1][1] * h))
        cv2.arrowedLine(out, p1, p2, _LINE_COLOR, 2, tipLength=0.03)
        cv2.putText(out, ln.name, p1, cv2.FONT_HERSHEY_SIMPLEX, 0.5, _LINE_COLOR, 1)
    for t in tracks:
        x1, y1, x2, y2 = (int(v) for v in t.box)
        c = track_color(t.track_id)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 2)
        name = class_names[t.class_id] if 0 <= t.class_id < len(class_names) else str(t.class_id)
        cv2.putText(out, f"{t.track_id} {name}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 2)
    return out


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (all interfaces) or a host name: assume reachable from outside


def read_web_password(cfg: WebConfig, config_path: Union[str, Path, None] = None) -> Optional[bytes]:
    """The Basic auth password from web.password_file (relative to the config file), or None; read like
    every other password file, so it is registered and no log line can show it."""
    secret = read_secret("web", cfg.password_file, None, config_path)
    return None if secret is None else secret.encode()


def _bind_error(cfg: WebConfig, exc: OSError) -> WebBindError:
    where = f"{cfg.port} on {cfg.host or 'all interfaces'}"
    if exc.errno == errno.EADDRINUSE:
        why = f"web.port: {where} is already in use (the debug server); set web.port to a free port or web.enabled: false"
    elif exc.errno == errno.EACCES:
        why = f"web.port: {where} needs privileges (ports below 1024); set web.port to 1024 or above"
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        why = f"web.host: {cfg.host!r} is not an address of this machine (the debug server); fix web.host"
    else:
        why = f"web.host/web.port: cannot listen on {where} (the debug server): {exc.strerror or exc}"
    return WebBindError(exc.errno or 0, why)


class _Listener(ThreadingHTTPServer):
    """One bound socket. Admission (connection cap) and connection tracking live in the DebugServer."""

    daemon_threads = True
    block_on_close = False  # stop() shuts connections down and waits for them itself
    request_queue_size = 64  # a burst waits in the kernel's backlog to be admitted or refused, not SYN-retried

    def __init__(self, owner: "DebugServer", address: Tuple[str, int]):
        self.owner = owner
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which stalls start-up on a device without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request, client_address) -> None:  # to the journal, not a bare traceback on stderr
        log.warning("debug server: error serving %s", client_address[0] if client_address else "?", exc_info=True)

    def process_request(self, request, client_address):
        if not self.owner._admit(request):
            _refuse(request, f"too many connections (web.max_connections={self.owner.cfg.max_connections})\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self.owner._release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._release(request)


def _refuse(sock: socket.socket, text: str) -> None:
    """A quick 503 from the accept loop, without reading the request or starting a thread."""
    body = text.encode()
    try:
        sock.settimeout(0.2)
        sock.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 5\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.setblocking(False)
        sock.recv(65536)  # read what already arrived so closing does not reset the connection
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Listener

    def setup(self) -> None:
        self.timeout = self.server.owner.cfg.client_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()

    def log_message(self, fmt, *args):  # keep the journal quiet
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, ctype: str, body: bytes, head: bool = False, extra: Sequence[Tuple[str, str]] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server API)
        self._route(head=False)

    def do_HEAD(self):  # noqa: N802
        self._route(head=True)

    def _route(self, head: bool) -> None:
        srv = self.server.owner
        path = urlsplit(self.path).path
        authed = srv.authorized(self.headers.get("Authorization"))
        if path == "/healthz":
            # Open without auth so systemd/monitoring probes work; the reason (which may carry error
            # text) only for authenticated clients.
            ok, why = srv.view.health()
            text = why if authed else ("ok" if ok else "unhealthy")
            self._send(200 if ok else 503, "text/plain; charset=utf-8", (text + "\n").encode(), head)
            return
        if not authed:
            srv._count("auth_failures")
            self._send(401, "text/plain", b"authentication required\n", head,
                       [("WWW-Authenticate", f'Basic realm="edged {srv.view.device_id}", charset="UTF-8"')])
            return
        if path in ("/", "/index.html"):
            page = _PAGE.format(device=html.escape(srv.view.device_id))
            self._send(200, "text/html; charset=utf-8", page.encode(), head)
        elif path == "/status.json":
            self._send(200, "application/json", json.dumps(srv.view.stats(), default=str).encode(), head)
        elif path == "/metrics":
            self._send(200, "text/plain; version=0.0.4; charset=utf-8", srv.metrics_text().encode(), head)
        elif path == "/snapshot.jpg":
            jpg = srv.jpeg()
            if jpg is None:
                self._send(503, "text/plain", b"no frame yet\n", head)
            else:
                self._send(200, "image/jpeg", jpg, head)
        elif path == "/stream.mjpg":
            self._stream(head)
        else:
            self._send(404, "text/plain", b"not found\n", head)

    def _stream_headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _stream(self, head: bool) -> None:
        srv = self.server.owner
        if head:
            self._stream_headers()
            return
        if not srv._stream_slot():
            srv._count("streams_refused")
            self._send(503, "text/plain", f"too many stream viewers (web.max_stream_clients="
                       f"{srv.cfg.max_stream_clients})\n".encode(), extra=[("Retry-After", "5")])
            return
        self.close_connection = True
        try:
            try:  # a bounded send queue: a viewer that stops reading blocks soon and times out
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _STREAM_SNDBUF)
            except OSError:
                pass
            self._stream_headers()
            # Re-sent every period even when unchanged, so a vanished viewer is noticed and its slot freed.
            while not srv._stop.is_set():
                jpg = srv.jpeg()
                if jpg is not None:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
                srv._stop.wait(1.0 / srv.cfg.mjpeg_fps)
        except OSError as exc:  # gone (reset, broken pipe) or stalled (timeout)
            log.debug("stream viewer %s dropped: %s", self.address_string(), exc.__class__.__name__)
        finally:
            srv._stream_done()


class DebugServer:
    """Serves a `DebugView`: `start()`, `reconfigure(cfg)`, `stop()`."""

    def __init__(self, cfg: WebConfig, view: DebugView, config_path: Union[str, Path, None] = None):
        self.view = view
        self.config_path = config_path
        self.cfg = cfg
        self._auth = self._credentials(cfg)
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._conns: Set[socket.socket] = set()
        self._streams = 0
        self._counts = {"connections_total": 0, "connections_refused": 0, "streams_refused": 0, "auth_failures": 0}
        self._httpd: Optional[_Listener] = None
        self._pending: Optional[_Listener] = None  # a new listener for the serve loop to switch to
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._spawn: Optional[Spawn] = None
        self._thread: Optional[threading.Thread] = None
        self._jpeg_lock = threading.Lock()
        self._jpeg: Tuple[Any, bytes] = (None, b"")

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        httpd = self._pending or self._httpd
        return httpd.server_address[1] if httpd else 0

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def _bind(self, cfg: WebConfig) -> _Listener:
        try:
            return _Listener(self, (cfg.host, cfg.port))
        except OSError as exc:
            raise _bind_error(cfg, exc) from None

    def _announce(self, cfg: WebConfig, httpd: _Listener) -> None:
        log.info("debug view on http://%s:%d/", cfg.host, httpd.server_address[1])
        if not is_loopback(cfg.host) and self._auth is None:
            log.warning("the debug server on %s:%d is reachable beyond this machine without authentication "
                        "(anyone on the network can watch the camera): set web.username and web.password_file, "
                        "or web.host: 127.0.0.1", cfg.host, httpd.server_address[1])

    def start(self, spawn: Optional[Spawn] = None) -> None:
        """Listen (raises WebBindError) and serve in a thread made by `spawn(name, body)`; default: a
        plain daemon thread. With web.enabled false it only remembers `spawn` for a later reconfigure."""
        if self._httpd is not None:
            raise RuntimeError("DebugServer already started")
        self._spawn = spawn
        if not self.cfg.enabled:
            return
        httpd = self._bind(self.cfg)
        self._httpd = httpd
        self._stop.clear()
        self._loop_done.clear()
        self._announce(self.cfg, httpd)
        if spawn is None:
            self._thread = threading.Thread(target=self._serve, name="edged-web", daemon=True)
            self._thread.start()
        else:
            thread = spawn("web", self._serve)
            self._thread = thread if isinstance(thread, threading.Thread) else None

    def _serve(self) -> None:
        """The accept loop. Returns once stopped; may be re-entered after an exception."""
        self._loop_done.clear()
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self._pending is not None:  # switched here: only this thread selects on the socket
                        old, self._httpd, self._pending = self._httpd, self._pending, None
                        if old is not None:
                            old.server_close()
                        self._lock.notify_all()
                    httpd = self._httpd
                if httpd is None:
                    break
                httpd.timeout = 0.2  # how soon a stop or a new listener is noticed
                httpd.handle_request()
        finally:
            self._loop_done.set()

    def stop(self) -> None:
        """Stop listening, drop every connection, and wait (bounded) for the serve loop and handlers."""
        self._stop.set()
        self._loop_done.wait(_STOP_JOIN_S)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_STOP_JOIN_S)  # so a restart can spawn the stage under the same name
        self._thread = None
        with self._lock:
            for httpd in (self._httpd, self._pending):
                if httpd is not None:
                    httpd.server_close()
            self._httpd = self._pending = None
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked reading or writing
                except OSError:
                    pass
            self._lock.wait_for(lambda: not self._conns, _STOP_JOIN_S)

    def reconfigure(self, cfg: WebConfig) -> None:
        """Apply a new web section live: stream rate, quality and caps at once, auth to the next request;
        a new host/port/enabled restarts the listener. Raises WebBindError (the old listener keeps
        serving) or ConfigError (unreadable password file; nothing changes)."""
        auth = self._credentials(cfg)
        if not cfg.enabled or self._httpd is None:
            if self._httpd is not None:
                self.stop()
            self.cfg, self._auth = cfg, auth
            if cfg.enabled:
                self.start(self._spawn)
            return
        if (cfg.host, cfg.port) == (self.cfg.host, self.cfg.port):
            self.cfg, self._auth = cfg, auth
            return
        httpd = self._bind(cfg)  # before anything changes: a bad address keeps the old listener
        with self._lock:
            if self._pending is not None:
                self._pending.server_close()
            self._pending = httpd
            self.cfg, self._auth = cfg, auth
            # Return once the serve loop listens on the new socket (and has closed the old one).
            self._lock.wait_for(lambda: self._pending is not httpd or self._stop.is_set(), _STOP_JOIN_S)
        self._announce(cfg, httpd)

    # ------------------------------------------------------------------------------------ admission
    def _admit(self, conn: socket.socket) -> bool:
        with self._lock:
            if len(self._conns) >= self.cfg.max_connections or self._stop.is_set():
                self._counts["connections_refused"] += 1
                return False
            self._conns.add(conn)
            self._counts["connections_total"] += 1
            return True

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._lock.notify_all()

    def _stream_slot(self) -> bool:
        with self._lock:
            if self._streams >= self.cfg.max_stream_clients:
                return False
            self._streams += 1
            return True

    def _stream_done(self) -> None:
        with self._lock:
            self._streams -= 1

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def web_stats(self) -> Dict[str, int]:
        with self._lock:
            return {"connections": len(self._conns), "stream_clients": self._streams, **self._counts}

    # ------------------------------------------------------------------------------------ auth
    def _credentials(self, cfg: WebConfig) -> Optional[Tuple[bytes, bytes]]:
        password = read_web_password(cfg, self.config_path)
        return None if password is None else (cfg.username.encode(), password)

    def authorized(self, header: Optional[str]) -> bool:
        auth = self._auth
        if auth is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Both compared in constant time, and both always compared (no early exit on a wrong user).
        user_ok = hmac.compare_digest(user, auth[0])
        password_ok = hmac.compare_digest(password, auth[1])
        return bool(sep) and user_ok and password_ok

    # ------------------------------------------------------------------------------------ content
    def jpeg(self) -> Optional[bytes]:
        frame, tracks = self.view.latest()
        if frame is None:
            return None
        quality = self.cfg.jpeg_quality
        key = (frame.index, frame.timestamp, quality)
        with self._jpeg_lock:  # one encode per frame, however many viewers
            if self._jpeg[0] == key:
                return self._jpeg[1]
            zones, lines, names = self.view.overlays()
            img = annotate(frame.image, tracks, zones, lines, names)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                return None
            self._jpeg = (key, buf.tobytes())
            return self._jpeg[1]

    def metrics_text(self) -> str:
        """Prometheus text exposition of the daemon's stats and the server's own counters."""
        s = self.view.stats()
        cap = s.get("capture") or {}
        mqtt = s.get("mqtt") or {}
        web = self.web_stats()
        out: List[str] = []

        def metric(name: str, kind: str, help_: str, *samples: Tuple[str, Any]) -> None:
            rows = [(labels, _number(v)) for labels, v in samples]
            rows = [(labels, v) for labels, v in rows if v is not None]
            if rows:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                out.extend(f"{name}{labels} {v}" for labels, v in rows)

        def by_stage(values: Dict[str, Any]) -> List[Tuple[str, Any]]:
            return [(f'{{stage="{_label(k)}"}}', v) for k, v in sorted(values.items())]

        C, G = "counter", "gauge"
        oldest = _first(s.get("outbox_oldest_age_s"), mqtt.get("oldest_undelivered_age_s"))
        failures = {k: v.get("failures") for k, v in (s.get("stages") or {}).items() if isinstance(v, dict)}
        for name, kind, help_, value in (
            ("edged_frames_processed_total", C, "Frames through the whole pipeline.", s.get("frames_processed")),
            ("edged_events_total", C, "Events emitted (enter, exit, position, zone, line).", s.get("events")),
            ("edged_uptime_seconds", G, "Seconds since the daemon started.", s.get("uptime_s")),
            ("edged_capture_fps", G, "Frames read from the source per second.", s.get("capture_fps")),
            ("edged_inference_fps", G, "Frames detected per second.", s.get("inference_fps")),
            ("edged_capture_frames_total", C, "Frames read from the source.", cap.get("captured")),
            ("edged_capture_delivered_frames_total", C, "Frames taken by the pipeline.", cap.get("delivered")),
            ("edged_capture_dropped_frames_total", C, "Live frames replaced before being taken.", cap.get("dropped")),
            ("edged_capture_skipped_frames_total", C, "Live frames skipped by capture.fps_cap.", cap.get("skipped")),
            ("edged_capture_reconnects_total", C, "Failed opens and lost sources.", cap.get("reconnects")),
            ("edged_outbox_depth", G, "Messages waiting in the outbox.", _first(s.get("outbox_depth"), mqtt.get("outbox_depth"))),
            ("edged_outbox_bytes", G, "Bytes waiting in the outbox.", mqtt.get("outbox_bytes")),
            ("edged_outbox_oldest_age_seconds", G, "Age of the oldest undelivered message.", oldest),
            ("edged_outbox_dropped_total", C, "Messages dropped from a full outbox.", mqtt.get("dropped")),
            ("edged_mqtt_connected", G, "1 while connected to the broker.", mqtt.get("connected")),
            ("edged_mqtt_inflight", G, "Publishes waiting for the broker's acknowledgement.", mqtt.get("inflight")),
            ("edged_mqtt_published_total", C, "Messages delivered to the broker.", mqtt.get("published")),
            ("edged_mqtt_reconnects_total", C, "Broker reconnections.", mqtt.get("reconnects")),
            ("edged_cpu_temperature_celsius", G, "SoC temperature.", s.get("cpu_temperature_c")),
            ("edged_web_connections", G, "Open debug server connections.", web["connections"]),
            ("edged_web_connections_total", C, "Debug server connections admitted.", web["connections_total"]),
            ("edged_web_stream_clients", G, "Open MJPEG streams.", web["stream_clients"]),
        ):
            metric(name, kind, help_, ("", value))
        metric("edged_stage_milliseconds", G, "Moving average of each stage's time per frame.",
               *by_stage(s.get("stage_ms") or {}))
        metric("edged_stage_failures_total", C, "Failures (each followed by a restart) per supervised stage.",
               *by_stage(failures))
        metric("edged_web_refused_total", C, "Requests refused with 503 or 401.",
               ('{reason="connections"}', web["connections_refused"]), ('{reason="streams"}', web["streams_refused"]),
               ('{reason="auth"}', web["auth_failures"]))
        return "\n".join(out) + "\n"


def _number(v: Any) -> Optional[Union[int, float]]:
    """A sample value, or None for absent / non-numeric / non-finite stats."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return v
    return None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
