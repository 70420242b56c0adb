"""The debug page in a real browser: Debian's Chromium, headless, against a real `edged run` on a video.

The browser is driven through the Chrome DevTools Protocol over `--remote-debugging-pipe` (fd 3: commands
in, fd 4: replies and events out, NUL-separated JSON), so no driver or download is needed. Only the CLI and
HTTP of the daemon are used.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest
import yaml

from edged import scene
from edged.web import TRACK_COLORS
from tests.conftest import ROOT, free_port, missing

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]


def _need_chromium() -> str:
    if CHROMIUM is None:
        missing("needs Debian's chromium (apt-get install chromium)")
    return CHROMIUM


class Cdp:
    """A minimal DevTools Protocol client over the browser's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc = proc
        self._out = os.fdopen(to_browser, "wb", buffering=0)
        self._in = os.fdopen(from_browser, "rb", buffering=0)
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._replies: Dict[int, "queue.Queue[dict]"] = {}
        self.handlers: Dict[str, Callable[[dict, Optional[str]], None]] = {}
        self.events: "queue.Queue[Tuple[str, dict]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._in.read(65536)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    self._replies.pop(msg["id"]).put(msg)
                else:
                    handler = self.handlers.get(msg["method"])
                    if handler is not None:  # runs on this thread: it may only post(), never call()
                        handler(msg["params"], msg.get("sessionId"))
                    self.events.put((msg["method"], msg["params"]))

    def post(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> "queue.Queue[dict]":
        with self._send_lock:
            self._next_id += 1
            reply: "queue.Queue[dict]" = queue.Queue(1)
            self._replies[self._next_id] = reply
            msg: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            self._out.write(json.dumps(msg).encode() + b"\0")
        return reply

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None, timeout: float = 60) -> dict:
        try:
            msg = self.post(method, params, session).get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply to {method} within {timeout} s") from None
        assert "error" not in msg, f"{method}: {msg['error']}"
        return msg["result"]

    def wait_event(self, method: str, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {method} event within {timeout} s"
            try:
                name, params = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if name == method and predicate(params):
                return params

    def close(self) -> None:
        for f in (self._out, self._in):
            try:
                f.close()
            except OSError:
                pass


def start_browser(profile: Path) -> Cdp:
    to_r, to_w = os.pipe()  # commands: we write, the browser reads fd 3
    from_r, from_w = os.pipe()  # replies: the browser writes fd 4, we read

    def child_fds() -> None:
        os.dup2(to_r, 3)
        os.dup2(from_w, 4)

    proc = subprocess.Popen([_need_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(3, 4), preexec_fn=child_fds)
    os.close(to_r)
    os.close(from_w)
    try:
        return Cdp(proc, to_w, from_r)
    except BaseException:
        proc.kill()
        proc.wait(timeout=20)
        raise


def stop_browser(cdp: Cdp) -> None:
    try:
        if cdp.proc.poll() is None:
            cdp.post("Browser.close")
            cdp.proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pass
    finally:
        if cdp.proc.poll() is None:
            cdp.proc.kill()
            cdp.proc.wait(timeout=20)
        cdp.close()


# ---------------------------------------------------------------------------------------------- pixels
_PALETTE = np.array(TRACK_COLORS, np.int16)


def box_edges(bgr: np.ndarray, tolerance: int = 60, run: int = 25) -> int:
    """How many track-box colours appear as both a horizontal and a vertical straight run of `run` pixels
    (the edges of a drawn box; the scene's photographs have none, see the control in the test)."""
    found = 0
    for colour in _PALETTE:
        mask = (np.abs(bgr.astype(np.int16) - colour).max(axis=2) <= tolerance).astype(np.uint8)
        horizontal = cv2.erode(mask, np.ones((1, run), np.uint8)).any()
        vertical = cv2.erode(mask, np.ones((run, 1), np.uint8)).any()
        found += bool(horizontal and vertical)
    return found


def video_frames(path: Path, step: int = 3) -> List[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames, i = [], 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return frames
            if i % step == 0:
                frames.append(frame)
            i += 1
    finally:
        cap.release()


# ---------------------------------------------------------------------------------------------- daemon
@pytest.fixture(scope="module")
def demo_video(tmp_path_factory) -> Path:
    return Path(scene.write_video(scene.default_scene(), tmp_path_factory.mktemp("scene") / "scene.mp4"))


def start_daemon(tmp_path: Path, video: Path, web: Dict[str, Any]) -> Tuple[subprocess.Popen, Path]:
    cfg = {
        "device_id": "browsercam",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": str(video), "loop": True, "name": "cam0"},
        "detector": {"classes": ["person", "cat", "cup"]},
        "mqtt": {"enabled": False},
        "web": {"enabled": True, "host": "127.0.0.1", **web},
    }
    config = tmp_path / "edged.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "daemon.log"
    with open(log, "wb") as fh:  # a file, not a pipe: a chatty daemon can never block on it
        proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(config)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, log


def wait_healthy(proc: subprocess.Popen, log: Path, port: int, timeout: float = 120) -> None:
    """/healthz (open without auth) turns 200 once frames flow."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"edged run exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the daemon never became healthy:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)


def stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


# ---------------------------------------------------------------------------------------------- the test
def _evaluate(cdp: Cdp, session: str, expression: str) -> Any:
    r = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    return r["result"].get("value")


def _screenshot(cdp: Cdp, session: str, clip: Dict[str, float]) -> np.ndarray:
    r = cdp.call("Page.captureScreenshot", {"format": "png", "clip": {**clip, "scale": 1}}, session)
    img = cv2.imdecode(np.frombuffer(base64.b64decode(r["data"]), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


@pytest.mark.parametrize("auth", [False, True], ids=["open", "basic-auth"])
def test_status_page_in_chromium_shows_a_live_stream_with_boxes(tmp_path, demo_video, auth):
    _need_chromium()
    port = free_port()
    web: Dict[str, Any] = {"port": port}
    creds = ("viewer", "b-" + base64.b32encode(os.urandom(10)).decode())
    if auth:
        (tmp_path / "web.pass").write_text(creds[1] + "\n")
        web.update(username=creds[0], password_file="web.pass")  # relative to the config file
    proc, log = start_daemon(tmp_path, demo_video, web)
    cdp: Optional[Cdp] = None
    try:
        wait_healthy(proc, log, port)
        cdp = start_browser(tmp_path / "profile")
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": 900, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session)
        cdp.call("Page.enable", {}, session)
        cdp.call("Network.enable", {}, session)
        url = f"http://127.0.0.1:{port}/"

        if auth:  # without credentials: the browser gets the challenge, and no page
            cdp.call("Page.navigate", {"url": url}, session)
            resp = cdp.wait_event("Network.responseReceived", lambda p: p["type"] == "Document")["response"]
            assert resp["status"] == 401
            assert {k.lower(): v for k, v in resp["headers"].items()}["www-authenticate"].startswith("Basic ")
            cdp.wait_event("Page.loadEventFired", lambda p: True)
            assert _evaluate(cdp, session, "document.querySelector('img') === null") is True
            assert "edged" not in _evaluate(cdp, session, "document.title")  # an error page, not ours
            # With credentials: answer the browser's auth challenges as a user typing them in would.
            challenges: List[str] = []

            def on_auth(params: dict, sid: Optional[str]) -> None:
                challenges.append(params["request"]["url"])
                cdp.post("Fetch.continueWithAuth", {"requestId": params["requestId"], "authChallengeResponse": {
                    "response": "ProvideCredentials", "username": creds[0], "password": creds[1]}}, sid)

            cdp.handlers["Fetch.authRequired"] = on_auth
            cdp.handlers["Fetch.requestPaused"] = lambda p, sid: cdp.post("Fetch.continueRequest", {"requestId": p["requestId"]}, sid)
            cdp.call("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]}, session)

        cdp.call("Page.navigate", {"url": url}, session)
        resp = cdp.wait_event("Network.responseReceived", lambda p: p["type"] == "Document" and p["response"]["status"] == 200)
        assert resp["response"]["url"] == url
        if auth:
            assert url in challenges

        # The live view: wait until the browser has decoded the first stream frame and status.json came in.
        deadline = time.monotonic() + 60
        while not _evaluate(cdp, session, "(() => { const i = document.getElementById('v');"
                                          " return i.naturalWidth > 0 && document.getElementById('s').textContent.includes('frames_processed'); })()"):
            assert time.monotonic() < deadline, "the page never showed a frame and the status"
            time.sleep(0.1)
        rect = _evaluate(cdp, session, "(() => { const r = document.getElementById('v').getBoundingClientRect();"
                                       " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")
        assert (rect["width"], rect["height"]) == (640, 480)  # the scene's size, shown 1:1

        # Objects are on screen in most of the looped scene: wait for a screenshot with boxes.
        deadline = time.monotonic() + 90
        while True:
            first = _screenshot(cdp, session, rect)
            if box_edges(first):
                break
            assert time.monotonic() < deadline, "no track box seen in 90 s of stream"
        time.sleep(1.0)  # the two screenshots are a second apart by design: that is what they compare
        second = _screenshot(cdp, session, rect)

        for shot in (first, second):
            assert shot.std() > 10, "blank image area"
        assert np.abs(first.astype(np.int16) - second.astype(np.int16)).mean() > 0.5, "the stream did not change"
        # Boxes: the same test on the video's frames (no overlays) finds none.
        control = max(box_edges(f) for f in video_frames(demo_video))
        assert control == 0
        assert box_edges(first) >= 1
        if auth:
            assert creds[1] not in log.read_text()
    finally:
        if cdp is not None:
            stop_browser(cdp)
        stop_daemon(proc)
