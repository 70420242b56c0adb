"""The debug HTTP server over real sockets: auth, caps, timeouts, HEAD, metrics, bind errors, live reconfigure.

The server is fed by `SceneView`, a `DebugView` over the real demo scene (rendered frames, ground-truth
boxes as tracks) — the daemon's side of the interface is exercised by the browser test.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import logging
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import pytest
import yaml

from edged import scene as scene_mod
from edged.config import ConfigError, WebConfig, build_config
from edged.types import Frame, TrackSnapshot
from edged.web import DebugServer, DebugView, WebBindError
from tests.conftest import ROOT, free_port



class SceneView:
    """A DebugView over the demo scene: a new frame every call (the stream always has news)."""

    device_id = "webtest"

    def __init__(self, stats: Optional[Dict[str, Any]] = None, noise: float = 2.0):
        spec = scene_mod.default_scene(n_frames=40)
        self.scene = scene_mod.Scene(dataclasses.replace(spec, noise_sigma=noise))
        self._stats = stats if stats is not None else {"device": self.device_id, "frames_processed": 3}
        self._i = 0
        self._lock = threading.Lock()

    def latest(self) -> Tuple[Optional[Frame], List[TrackSnapshot]]:
        with self._lock:
            self._i += 1
            i = self._i
        image, boxes = self.scene.frame(10 + i % 20)
        tracks = [TrackSnapshot(b.track_id, b.class_id, np.array(b.xyxy, float), 1.0, np.zeros(2), 5, 5, 0)
                  for b in boxes]
        return Frame(image, i, float(i), i / 10.0), tracks

    def stats(self) -> Dict[str, Any]:
        return self._stats

    def health(self) -> Tuple[bool, str]:
        return False, "inference: model file vanished"

    def overlays(self):
        return (), (), ["person", "cat", "cup"]


@contextlib.contextmanager
def serving(cfg: WebConfig, view: Optional[DebugView] = None, config_path=None) -> Iterator[DebugServer]:
    server = DebugServer(cfg, view or SceneView(), config_path=config_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def request(port: int, path: str, method: str = "GET", auth: Optional[Tuple[str, str]] = None,
            port_host: str = "127.0.0.1") -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection(port_host, port, timeout=30)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def open_stream(port: int, auth: Optional[Tuple[str, str]] = None) -> Tuple[int, socket.socket, bytes]:
    """Raw GET /stream.mjpg; returns (status, socket, bytes read so far). On 200 the first part has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    hdr = ""
    if auth:
        hdr = "Authorization: Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() + "\r\n"
    sock.sendall(f"GET /stream.mjpg HTTP/1.0\r\n{hdr}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    status = int(data.split(b" ", 2)[1])
    while status != 200:  # a refusal: read it to the end
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    while status == 200 and data.count(b"--frame") < 2:  # one whole part: its boundary and the next
        chunk = sock.recv(65536)
        assert chunk, "stream ended before the first frame"
        data += chunk
    return status, sock, data


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- auth
@pytest.fixture
def auth_setup(tmp_path):
    password = "pw-" + secrets.token_hex(8)
    (tmp_path / "web.pass").write_text(password + "\n")
    config_path = tmp_path / "edged.yaml"  # password_file is relative to it
    cfg = WebConfig(port=0, username="viewer", password_file="web.pass")
    return cfg, config_path, ("viewer", password)


def test_basic_auth_guards_everything_but_healthz(auth_setup, caplog):
    cfg, config_path, creds = auth_setup
    caplog.set_level(logging.DEBUG)
    seen: List[bytes] = []
    with serving(cfg, config_path=config_path) as srv:
        for path in ("/", "/status.json", "/metrics", "/snapshot.jpg", "/stream.mjpg", "/nope"):
            status, headers, body = request(srv.port, path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith('Basic realm="edged webtest"')
            seen.append(body)
        for wrong in (("viewer", creds[1] + "x"), ("Viewer", creds[1]), ("viewer", ""), ("", creds[1])):
            status, _, body = request(srv.port, "/", auth=wrong)
            assert status == 401, wrong
        status, _, page = request(srv.port, "/", auth=creds)
        assert status == 200 and b"stream.mjpg" in page
        status, headers, jpg = request(srv.port, "/snapshot.jpg", auth=creds)
        assert status == 200 and cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR) is not None
        status, sock, first = open_stream(srv.port, auth=creds)
        sock.close()
        assert status == 200 and b"image/jpeg" in first
        # /healthz stays open for probes, but tells only authenticated clients why.
        status, _, body = request(srv.port, "/healthz")
        assert (status, body) == (503, b"unhealthy\n")
        status, _, body = request(srv.port, "/healthz", auth=creds)
        assert (status, body) == (503, b"inference: model file vanished\n")
        status, _, metrics = request(srv.port, "/metrics", auth=creds)
        assert 'edged_web_refused_total{reason="auth"} 10' in metrics.decode()
        seen += [page, metrics]
    secret = creds[1].encode()
    assert not any(secret in b for b in seen)
    assert creds[1] not in caplog.text


def test_password_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"web\.password_file: cannot read .*missing\.pass"):
        DebugServer(WebConfig(username="u", password_file=str(tmp_path / "missing.pass")), SceneView())
    (tmp_path / "empty.pass").write_text("\n")
    with pytest.raises(ConfigError, match=r"web\.password_file: .*empty\.pass is empty"):
        DebugServer(WebConfig(username="u", password_file="empty.pass"), SceneView(), config_path=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"web.*username and password_file"):
        build_config({"web": {"username": "u"}})
    with pytest.raises(ConfigError, match=r"web\.username"):
        build_config({"web": {"username": "a:b", "password_file": "x"}})
    with pytest.raises(ConfigError, match=r"max_stream_clients must be below max_connections"):
        build_config({"web": {"max_stream_clients": 8, "max_connections": 8}})


def test_warns_when_listening_beyond_loopback_without_auth(auth_setup, caplog):
    caplog.set_level(logging.WARNING, logger="edged.web")
    with serving(WebConfig(host="0.0.0.0", port=0)):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "without authentication" in warnings[0].getMessage() and "web.username" in warnings[0].getMessage()
    caplog.clear()
    cfg, config_path, _ = auth_setup
    with serving(cfg.model_copy(update={"host": "0.0.0.0"}), config_path=config_path):
        pass
    with serving(WebConfig(host="127.0.0.1", port=0)):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------- caps and timeouts
def test_stream_client_cap_answers_503_beyond_it():
    cfg = WebConfig(port=0, max_stream_clients=3, max_connections=8, mjpeg_fps=20)
    with serving(cfg) as srv:
        streams = [open_stream(srv.port) for _ in range(3)]
        try:
            assert [s[0] for s in streams] == [200, 200, 200]
            status, sock, data = open_stream(srv.port)
            sock.close()
            assert status == 503 and b"too many stream viewers (web.max_stream_clients=3)" in data
            # The other pages still work while the viewers watch.
            assert request(srv.port, "/status.json")[0] == 200
            # A viewer leaves: its slot is freed once the server notices (its next write fails).
            streams.pop()[1].close()
            wait_until(lambda: srv.web_stats()["stream_clients"] == 2, what="the closed viewer's slot")
            status, sock, _ = open_stream(srv.port)
            streams.append((status, sock, b""))
            assert status == 200
        finally:
            for _, sock, _ in streams:
                sock.close()


def test_idle_connections_are_bounded_and_dropped_after_the_timeout():
    cfg = WebConfig(port=0, max_connections=6, max_stream_clients=2, client_timeout_s=5.0)
    n_idle = 50
    with serving(cfg) as srv:
        baseline = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(n_idle)]
        try:
            def handled() -> int:
                stats = srv.web_stats()
                return stats["connections_total"] + stats["connections_refused"]

            wait_until(lambda: handled() == n_idle, what="the server to admit or refuse every connection")
            assert srv.web_stats()["connections"] == cfg.max_connections  # held, silent, until the timeout
            assert threading.active_count() - baseline == cfg.max_connections  # one thread each, no more
            answers = []
            for sock in idle:  # refused at once with a 503, or closed without a word after the timeout
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                answers.append(data)
            refused = [a for a in answers if a.startswith(b"HTTP/1.0 503")]
            assert len(refused) == n_idle - cfg.max_connections
            assert answers.count(b"") == cfg.max_connections
            assert b"too many connections (web.max_connections=6)" in refused[0]
            # After the timeout the server is free again.
            status, _, body = request(srv.port, "/")
            assert status == 200 and b"<img" in body
            wait_until(lambda: srv.web_stats()["connections"] == 0, what="every connection released")
        finally:
            for sock in idle:
                sock.close()


def test_a_viewer_that_stops_reading_is_dropped():
    # Noisy frames at 30 fps fill the socket buffers quickly; one stream slot makes the stall visible.
    cfg = WebConfig(port=0, max_stream_clients=1, max_connections=4, mjpeg_fps=30, jpeg_quality=95,
                    client_timeout_s=1.0)
    with serving(cfg, SceneView(noise=40.0)) as srv:
        stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        stalled.settimeout(30)
        stalled.connect(("127.0.0.1", srv.port))
        try:
            stalled.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            assert stalled.recv(12) == b"HTTP/1.0 200"
            # It reads no more: the server's send times out and it gives the slot to the next viewer.
            wait_until(lambda: srv.web_stats()["stream_clients"] == 0, what="the stalled viewer to be dropped")
            status, sock, _ = open_stream(srv.port)
            sock.close()
            assert status == 200
            # The stalled client finds its stream closed after what was already in flight.
            while stalled.recv(1 << 20):
                pass
        finally:
            stalled.close()


# ---------------------------------------------------------------------------------------------- HTTP
def test_head_gets_the_get_headers_without_a_body_and_unknown_methods_501():
    with serving(WebConfig(port=0)) as srv:
        for path in ("/", "/healthz", "/nope"):
            g_status, g_headers, g_body = request(srv.port, path)
            h_status, h_headers, h_body = request(srv.port, path, method="HEAD")
            assert h_status == g_status and h_body == b""
            assert h_headers["content-type"] == g_headers["content-type"]
            assert h_headers["content-length"] == g_headers["content-length"] == str(len(g_body))
        for path in ("/snapshot.jpg", "/metrics", "/status.json"):
            status, headers, body = request(srv.port, path, method="HEAD")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        status, headers, body = request(srv.port, "/stream.mjpg", method="HEAD")
        assert status == 200 and body == b"" and headers["content-type"].startswith("multipart/x-mixed-replace")
        assert srv.web_stats()["stream_clients"] == 0
        for method in ("POST", "PUT", "DELETE", "BREW"):
            assert request(srv.port, "/", method=method)[0] == 501, method


def test_port_in_use_names_the_debug_server_and_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = DebugServer(WebConfig(port=port), SceneView())
        with pytest.raises(WebBindError) as exc:
            server.start()
        msg = str(exc.value)
        assert msg == (f"web.port: {port} on 127.0.0.1 is already in use (the debug server); "
                       "set web.port to a free port or web.enabled: false")
        assert not server.running
    with pytest.raises(WebBindError, match=r"web\.host: '192\.0\.2\.7' is not an address of this machine"):
        DebugServer(WebConfig(host="192.0.2.7", port=0), SceneView()).start()


# ---------------------------------------------------------------------------------------------- metrics
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_exposition(text: str) -> Dict[str, Dict[str, float]]:
    """Prometheus text format 0.0.4, strictly: every family typed once before its samples, valid names,
    no duplicate series, counters named *_total. Returns {family: {labels: value}}."""
    assert text.endswith("\n")
    types: Dict[str, str] = {}
    out: Dict[str, Dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert _NAME.match(line.split(" ")[2]), line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert _NAME.match(name) and name not in types, line
            assert kind in ("counter", "gauge"), line
            assert kind != "counter" or name.endswith("_total"), line
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            assert name in types, f"{name} has no # TYPE before its sample"
            assert labels not in out.setdefault(name, {}), f"duplicate series {line!r}"
            out[name][labels] = value
    assert set(out) == set(types), "a # TYPE without samples"
    return out


def test_metrics_export_real_capture_and_publisher_stats(tmp_path):
    from edged.capture import CaptureThread, open_source
    from edged.config import CaptureConfig, MqttConfig
    from edged.mqtt.client import MqttPublisher
    from edged.mqtt.outbox import Outbox

    spec = scene_mod.default_scene(n_frames=12)
    video = scene_mod.write_video(spec, tmp_path / "scene.mp4")
    capture = CaptureThread(open_source(CaptureConfig(source=str(video)))).start()
    taken = sum(1 for _ in capture)  # every frame of the file
    capture.stop()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.put("edged/webtest/events", b"{}", qos=1, kind="event")
    publisher = MqttPublisher(MqttConfig(), device_id="webtest", outbox=outbox)  # never started: real stats keys
    stats = {"frames_processed": taken, "events": 2, "uptime_s": 5.5, "capture": capture.stats(),
             "stage_ms": {"detect": 20.5, "track": 1.25}, "outbox_depth": 1, "mqtt": publisher.stats(),
             "outbox_oldest_age_s": 12.5, "cpu_temperature_c": None,
             "stages": {"capture": {"state": "running", "failures": 2, "last_error": "x"}}}
    with serving(WebConfig(port=0), SceneView(stats)) as srv:
        status, headers, body = request(srv.port, "/metrics")
    outbox.close()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_exposition(body.decode())
    assert taken == spec.n_frames
    assert m["edged_capture_frames_total"][""] == spec.n_frames
    assert m["edged_capture_delivered_frames_total"][""] == spec.n_frames
    assert m["edged_capture_dropped_frames_total"][""] == 0
    assert m["edged_capture_skipped_frames_total"][""] == 0
    assert m["edged_capture_reconnects_total"][""] == 0
    assert m["edged_frames_processed_total"][""] == taken
    assert m["edged_stage_milliseconds"] == {'{stage="detect"}': 20.5, '{stage="track"}': 1.25}
    assert m["edged_outbox_depth"][""] == 1
    assert m["edged_outbox_oldest_age_seconds"][""] == 12.5
    assert m["edged_mqtt_connected"][""] == 0 and m["edged_mqtt_published_total"][""] == 0
    assert m["edged_stage_failures_total"] == {'{stage="capture"}': 2}
    assert "edged_cpu_temperature_celsius" not in m  # absent (None) stats are left out, not faked
    # Absent keys everywhere: still valid, only the server's own metrics.
    with serving(WebConfig(port=0), SceneView({})) as srv:
        m = parse_exposition(request(srv.port, "/metrics")[2].decode())
    assert set(m) == {"edged_web_connections", "edged_web_connections_total", "edged_web_stream_clients",
                      "edged_web_refused_total"}


# ---------------------------------------------------------------------------------------------- lifecycle
def test_reconfigure_applies_live_and_moves_the_listener(auth_setup):
    auth_cfg, config_path, creds = auth_setup
    spawned: List[str] = []

    def spawn(name, body):  # a minimal supervisor: restarts the body while it raises
        def run():
            while True:
                try:
                    return body()
                except Exception:
                    continue
        spawned.append(name)
        t = threading.Thread(target=run, name=f"test-{name}", daemon=True)
        t.start()
        return t

    cfg = WebConfig(port=0, jpeg_quality=95, max_stream_clients=2, max_connections=6)
    srv = DebugServer(cfg, SceneView(), config_path=config_path)
    srv.start(spawn)
    try:
        assert spawned == ["web"]
        big = len(request(srv.port, "/snapshot.jpg")[2])
        srv.reconfigure(cfg.model_copy(update={"jpeg_quality": 10}))
        assert len(request(srv.port, "/snapshot.jpg")[2]) < big / 2
        # Auth switched on live, and the stream cap lowered.
        srv.reconfigure(auth_cfg.model_copy(update={"max_stream_clients": 1, "port": srv.cfg.port}))
        assert request(srv.port, "/")[0] == 401 and request(srv.port, "/", auth=creds)[0] == 200
        first = open_stream(srv.port, auth=creds)
        try:
            assert first[0] == 200 and open_stream(srv.port, auth=creds)[0] == 503
        finally:
            first[1].close()
        # A new port: the listener moves, the old port is closed.
        old_port, new_port = srv.port, free_port()
        srv.reconfigure(srv.cfg.model_copy(update={"port": new_port}))
        assert srv.port == new_port and request(new_port, "/", auth=creds)[0] == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=5).close()
        # A port that cannot be bound: clear error, the current listener keeps serving.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            with pytest.raises(WebBindError, match="web.port"):
                srv.reconfigure(srv.cfg.model_copy(update={"port": taken.getsockname()[1]}))
        assert request(new_port, "/", auth=creds)[0] == 200
        # Disabled, then enabled again (through the same spawn).
        srv.reconfigure(srv.cfg.model_copy(update={"enabled": False}))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", new_port), timeout=5).close()
        srv.reconfigure(srv.cfg.model_copy(update={"enabled": True}))
        assert spawned == ["web", "web"] and request(new_port, "/", auth=creds)[0] == 200
    finally:
        srv.stop()
    assert not [t for t in threading.enumerate() if t.name == "test-web" and t.is_alive()]


def test_stop_ends_open_streams_and_joins():
    before = {t.ident for t in threading.enumerate()}
    srv = DebugServer(WebConfig(port=0, mjpeg_fps=2), SceneView())
    srv.start()
    streams = [open_stream(srv.port) for _ in range(2)]
    try:
        srv.stop()
        stats = srv.web_stats()
        assert (stats["connections"], stats["stream_clients"]) == (0, 0)
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        assert not left, f"threads left after stop(): {[t.name for t in left]}"
        for _, sock, _ in streams:  # their connections were closed by the server
            while sock.recv(1 << 20):
                pass
    finally:
        for _, sock, _ in streams:
            sock.close()


def test_edged_run_with_the_web_port_taken_names_it(tmp_path):
    """What a new user sees when 8080 is taken: one line naming the debug server and web.port."""
    video = scene_mod.write_video(scene_mod.default_scene(n_frames=5), tmp_path / "scene.mp4")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "edged.yaml"
        config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "capture": {"source": str(video)},
                                          "mqtt": {"enabled": False}, "web": {"port": port}}))
        r = subprocess.run([sys.executable, "-m", "edged", "run", "--config", str(config)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0
    assert f"web.port: {port} on 127.0.0.1 is already in use (the debug server)" in r.stderr
    assert "Traceback" not in r.stderr
