"""Debug HTTP server: status page, MJPEG stream, snapshot, healthz, Prometheus metrics.

Frames are annotated only when somebody is watching, at most `mjpeg_fps` times a second, so the
server costs nothing on an unattended device.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from edged.config import WebConfig

log = logging.getLogger("edged.web")

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>edged {device}</title>
<style>body{{font-family:sans-serif;margin:1em;background:#111;color:#eee}}img{{max-width:100%}}
pre{{background:#222;padding:.5em}}</style></head><body>
<h1>edged &middot; {device}</h1><img src="stream.mjpg" alt="live view">
<pre id="s"></pre><script>
async function r(){{try{{const j=await (await fetch('status.json')).json();
document.getElementById('s').textContent=JSON.stringify(j,null,2)}}catch(e){{}}}}
r();setInterval(r,2000)</script></body></html>"""


def _color(track_id: int) -> Tuple[int, int, int]:
    rng = (track_id * 2654435761) & 0xFFFFFF
    return (rng & 0xFF, (rng >> 8) & 0xFF, (rng >> 16) & 0xFF)


def annotate(image: np.ndarray, tracks, zones=(), lines=(), class_names=()) -> np.ndarray:
    """Boxes with track ids, zones and lines drawn on a copy of the frame."""
    out = image.copy()
    h, w = out.shape[:2]
    for z in zones:
        pts = (np.asarray(z.polygon, np.float32) * [w, h]).astype(np.int32)
        cv2.polylines(out, [pts], True, (0, 200, 255), 2)
        cv2.putText(out, z.name, tuple(int(v) for v in pts[0]), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 255), 1)
    for ln in lines:
        p1 = (int(ln.points[0][0] * w), int(ln.points[0][1] * h))
        p2 = (int(ln.points[1][0] * w), int(ln.points[1][1] * h))
        cv2.arrowedLine(out, p1, p2, (255, 0, 255), 2, tipLength=0.03)
        cv2.putText(out, ln.name, p1, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 0, 255), 1)
    for t in tracks:
        x1, y1, x2, y2 = (int(v) for v in t.box)
        c = _color(t.track_id)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 2)
        name = class_names[t.class_id] if 0 <= t.class_id < len(class_names) else str(t.class_id)
        cv2.putText(out, f"{t.track_id} {name}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 2)
    return out


class DebugServer:
    """Serves the daemon's newest frame and status. `daemon` needs `.latest`, `.stats()`, `.cfg`,
    `.last_frame_at` (monotonic) and optionally `.detector.class_names`."""

    def __init__(self, daemon: Any, cfg: WebConfig):
        self.daemon = daemon
        self.cfg = cfg
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._jpeg_lock = threading.Lock()
        self._jpeg: Tuple[int, bytes] = (-1, b"")

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else 0

    def healthy(self) -> Tuple[bool, str]:
        last = getattr(self.daemon, "last_frame_at", 0.0)
        if getattr(self.daemon, "errors", None):
            return False, "; ".join(self.daemon.errors)
        if not last:
            return False, "no frame processed yet"
        age = time.monotonic() - last
        if age > 30:
            return False, f"no frame for {age:.0f} s"
        return True, "ok"

    def jpeg(self) -> Optional[bytes]:
        latest: Dict[str, Any] = self.daemon.latest
        frame = latest.get("frame")
        if frame is None:
            return None
        with self._jpeg_lock:
            if self._jpeg[0] == frame.index:
                return self._jpeg[1]
            names = getattr(getattr(self.daemon, "detector", None), "class_names", ())
            ev = self.daemon.cfg.events
            img = annotate(frame.image, latest.get("tracks", ()), ev.zones, ev.lines, names)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
            if not ok:
                return None
            self._jpeg = (frame.index, buf.tobytes())
            return self._jpeg[1]

    def metrics_text(self) -> str:
        s = self.daemon.stats()
        lines = [
            "# TYPE edged_frames_processed_total counter",
            f"edged_frames_processed_total {s.get('frames_processed', 0)}",
            "# TYPE edged_events_total counter",
            f"edged_events_total {s.get('events', 0)}",
            "# TYPE edged_outbox_depth gauge",
            f"edged_outbox_depth {s.get('outbox_depth', 0)}",
            "# TYPE edged_uptime_seconds gauge",
            f"edged_uptime_seconds {s.get('uptime_s', 0)}",
            "# TYPE edged_stage_milliseconds gauge",
        ]
        for stage, ms in s.get("stage_ms", {}).items():
            lines.append(f'edged_stage_milliseconds{{stage="{stage}"}} {ms}')
        cap = s.get("capture") or {}
        for key in ("frames", "dropped", "reconnects"):
            if key in cap:
                lines.append(f"# TYPE edged_capture_{key}_total counter")
                lines.append(f"edged_capture_{key}_total {cap[key]}")
        if s.get("cpu_temperature_c") is not None:
            lines.append("# TYPE edged_cpu_temperature_celsius gauge")
            lines.append(f"edged_cpu_temperature_celsius {s['cpu_temperature_c']}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # keep the journal quiet
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", _PAGE.format(device=server.daemon.cfg.device_id).encode())
                elif path == "/healthz":
                    ok, why = server.healthy()
                    self._send(200 if ok else 503, "text/plain", (why + "\n").encode())
                elif path == "/status.json":
                    self._send(200, "application/json", json.dumps(server.daemon.stats(), default=str).encode())
                elif path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4", server.metrics_text().encode())
                elif path == "/snapshot.jpg":
                    jpg = server.jpeg()
                    if jpg is None:
                        self._send(503, "text/plain", b"no frame yet\n")
                    else:
                        self._send(200, "image/jpeg", jpg)
                elif path == "/stream.mjpg":
                    self._stream()
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                period = 1.0 / server.cfg.mjpeg_fps
                stop = server.daemon.stop_event
                try:
                    while not stop.is_set():
                        jpg = server.jpeg()
                        if jpg is not None:
                            self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                             + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
                            self.wfile.flush()
                        stop.wait(period)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = ThreadingHTTPServer((self.cfg.host, self.cfg.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edged-web", daemon=True)
        self._thread.start()
        log.info("debug view on http://%s:%d/", self.cfg.host, self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
