"""Capture: real video files, the real demo scene, a real closed TCP port; no OpenCV mocks."""

from __future__ import annotations

import base64
import logging
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

from edged.capture import (
    CaptureThread,
    DemoSource,
    OpenCvSource,
    SourceSpecError,
    check_source,
    open_source,
)
from edged.config import CaptureConfig
from edged.scene import Scene, default_scene, write_video
from tests.conftest import ROOT, free_port

N_FRAMES = 24


def small_spec(n_frames: int = N_FRAMES):
    return default_scene(n_frames=n_frames, size=(160, 120), fps=10.0, seed=1)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A real encoded video of the demo scene (every frame differs: moving objects + noise)."""
    return write_video(small_spec(), tmp_path_factory.mktemp("cap") / "scene.mp4")


def read_all(cap: CaptureThread, limit: int = 10_000):
    frames = []
    for frame in cap:
        frames.append(frame)
        if len(frames) >= limit:
            break
    return frames


def test_file_delivers_every_frame_in_order_then_ends(video: Path):
    cfg = CaptureConfig(source=str(video), queue_size=2)
    source = open_source(cfg)
    assert source.kind == "file" and not source.live
    cap = CaptureThread(source, cfg).start()
    try:
        frames = read_all(cap)
    finally:
        assert cap.stop()
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert cap.ended.is_set()
    st = cap.stats()
    assert st["state"] == "ended" and st["captured"] == N_FRAMES and st["dropped"] == 0
    assert st["delivered"] == N_FRAMES
    # stream_time follows the file's frame rate, not the wall clock.
    assert [round(f.stream_time, 6) for f in frames[:3]] == [0.0, 0.1, 0.2]
    # The decoded pixels are the scene (lossy codec: close, not equal).
    rendered = Scene(small_spec()).frame(7)[0].astype(int)
    assert np.abs(frames[7].image.astype(int) - rendered).mean() < 12
    assert cap.get(timeout=0.01) is None  # after the end: None at once


def test_file_backpressure_blocks_instead_of_dropping(video: Path):
    cfg = CaptureConfig(source=str(video), queue_size=3)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        # Nobody consumes: the producer fills the buffer and then waits (no drops, no runaway reading).
        assert cap.wait_for(lambda s: s.captured >= 4, timeout=10)
        assert cap.stats()["captured"] == 4  # 3 buffered + 1 held back by the blocking put
        assert not cap.ended.is_set()
        frames = read_all(cap)
    finally:
        cap.stop()
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert cap.stats()["dropped"] == 0


def test_file_loop_keeps_going_with_increasing_index(video: Path):
    cfg = CaptureConfig(source=str(video), loop=True)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        frames = read_all(cap, limit=N_FRAMES + 5)
    finally:
        cap.stop()
    assert [f.index for f in frames] == list(range(N_FRAMES + 5))
    assert np.all(np.diff([f.stream_time for f in frames]) > 0)
    assert not cap.ended.is_set()
    # The frame after the last one is the first one again.
    assert np.abs(frames[N_FRAMES].image.astype(int) - frames[0].image.astype(int)).mean() < 1.0


def test_live_keeps_only_the_newest_frame(video: Path):
    """A 'camera' that is a looping file behind the live interface, and a consumer slower than it."""
    cfg = CaptureConfig(source=str(video), loop=True, live=True)
    source = open_source(cfg)
    assert source.live
    cap = CaptureThread(source, cfg).start()
    try:
        first = cap.get(timeout=10)
        assert first is not None
        for _ in range(3):
            seen = cap.stats_record().captured
            assert cap.wait_for(lambda s: s.captured >= seen + 5, timeout=10)  # the slow consumer dawdles
            frame = cap.get(timeout=10)
            st = cap.stats_record()
            assert frame is not None
            # The newest frame: captured after the wait, and nothing newer can be waiting behind it.
            assert frame.index >= seen + 4
            assert frame.index > first.index
            first = frame
        assert st.dropped >= 3 * 3
    finally:
        assert cap.stop()
    # Every captured frame was delivered, dropped, or still waits in the single slot: take it.
    cap.get(timeout=0)
    assert cap.get(timeout=0) is None
    st = cap.stats_record()
    assert st.captured == st.delivered + st.dropped
    assert st.state == "stopped"


def test_demo_source_every_frame_matches_the_scene():
    spec = small_spec(n_frames=6)
    cap = CaptureThread(DemoSource(spec, live=False)).start()
    try:
        frames = read_all(cap)
    finally:
        cap.stop()
    scene = Scene(spec)
    assert [f.index for f in frames] == list(range(6))
    for f in frames:
        assert f.image.tobytes() == scene.frame(f.index)[0].tobytes()
    assert cap.ended.is_set()


def test_demo_live_is_paced_and_stops_promptly():
    spec = default_scene(n_frames=40, size=(160, 120), fps=20.0)
    cap = CaptureThread(DemoSource(spec, live=True)).start()
    try:
        frame = cap.get(timeout=10)
        assert frame is not None and frame.index == 0
        assert cap.wait_for(lambda s: s.captured >= 3, timeout=10)
    finally:
        assert cap.stop(timeout=10)  # interrupts the pacing wait
    assert cap.stats()["state"] == "stopped"
    assert not cap.ended.is_set()


def test_missing_video_file_fails_once_instead_of_reconnecting_forever(tmp_path: Path, caplog):
    target = tmp_path / "missing.mp4"
    cfg = CaptureConfig(source=str(target), reconnect_min_s=0.01, reconnect_max_s=0.02)
    source = open_source(cfg)  # not opened yet: the capture thread finds out
    assert check_source(cfg) == f"capture.source: video file {target} does not exist"
    cap = CaptureThread(source, cfg)
    caplog.set_level(logging.INFO, logger="edged.capture")
    cap.start()
    try:
        assert cap.ended.wait(20)  # consumers waiting for frames are released
        assert cap.get(timeout=0.01) is None and list(cap) == []
    finally:
        assert cap.stop()
    st = cap.stats_record()
    assert st.state == "failed" and st.reconnects == 0
    assert cap.failed == st.last_error == f"capture.source: video file {target} does not exist"
    # One clear line, no traceback, no retry chatter.
    records = [r for r in caplog.records if r.name == "edged.capture"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, cap.failed)]
    assert not any(r.exc_info for r in records)


def test_undecodable_video_file_fails_once(tmp_path: Path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    cfg = CaptureConfig(source=str(junk), reconnect_min_s=0.01, reconnect_max_s=0.02)
    assert "cannot decode video file" in (check_source(cfg) or "")
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        assert cap.ended.wait(20)
    finally:
        assert cap.stop()
    assert cap.stats_record().state == "failed" and "cannot decode video file" in (cap.failed or "")


def test_check_source_finds_nothing_wrong_with_sources_that_can_deliver(video: Path, tmp_path: Path):
    assert check_source(CaptureConfig(source=str(video))) is None
    assert check_source(CaptureConfig(source="demo")) is None  # scikit-image is installed here
    # Cameras may be plugged in and streams may come back: never hopeless up front.
    assert check_source(CaptureConfig(source="/dev/video9")) is None
    assert check_source(CaptureConfig(source=f"rtsp://127.0.0.1:{free_port()}/x")) is None
    assert check_source(CaptureConfig(), source_override=str(tmp_path / "gone.avi")) == (
        f"--source: video file {tmp_path / 'gone.avi'} does not exist")


def test_unreachable_stream_is_retried_with_growing_jittered_backoff_until_it_comes(caplog):
    port = free_port()  # the camera is not there yet: connection refused
    cfg = CaptureConfig(source=f"http://127.0.0.1:{port}/stream.mjpg", reconnect_min_s=0.02,
                        reconnect_max_s=0.2, timeout_s=5.0)
    cap = CaptureThread(open_source(cfg), cfg, rng=random.Random(0))
    caplog.set_level(logging.WARNING, logger="edged.capture")
    cap.start()
    server = None
    try:
        assert cap.wait_for(lambda s: s.reconnects >= 5, timeout=30)  # the 4th attempt has been logged
        st = cap.stats_record()
        assert st.state == "reconnecting" and cap.failed is None and not cap.ended.is_set()
        # FFmpeg is silenced (it could print the URL): edged says why itself.
        assert f"connection to 127.0.0.1:{port} refused" in (st.last_error or "")
        # Each attempt is logged with its number and the growing (jittered, capped) delay.
        delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0])
                  for r in caplog.records if "retrying in" in r.getMessage()]
        assert len(delays) >= 4
        assert delays[0] <= 0.03 and max(delays) <= 0.2 and delays[3] > delays[0]
        server = _start_mjpeg_server(port)  # the camera comes up: frames flow
        assert cap.get(timeout=30) is not None
        assert cap.stats_record().state == "ok"
    finally:
        assert cap.stop()
        if server is not None:
            _stop_mjpeg_server(server)


def test_rtsp_to_a_closed_port_reports_reconnecting_without_crashing():
    port = free_port()  # nothing listens there
    cfg = CaptureConfig(source=f"rtsp://127.0.0.1:{port}/cam", reconnect_min_s=0.05, reconnect_max_s=0.1,
                        timeout_s=2.0)
    source = open_source(cfg)
    assert source.kind == "url" and source.live
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" in os.environ  # tcp by default, unless the user set it
    cap = CaptureThread(source, cfg).start()
    try:
        assert cap.wait_for(lambda s: s.reconnects >= 2, timeout=60)
        st = cap.stats()
        assert st["state"] == "reconnecting" and st["captured"] == 0
        assert cap.is_alive()
    finally:
        stopped = cap.stop(timeout=30)
    assert stopped and not cap.is_alive()
    assert cap.stats()["state"] == "stopped"


def test_source_kinds(tmp_path: Path, video: Path):
    assert open_source(CaptureConfig(source=0)).kind == "camera"
    cam = open_source(CaptureConfig(source="/dev/video2", width=320, height=240))
    assert cam.kind == "camera" and cam.target == 2 and cam.live
    assert open_source(CaptureConfig(source="demo")).kind == "demo"
    assert open_source(CaptureConfig(), source_override="http://127.0.0.1:1/x.mjpg").kind == "url"
    forced = open_source(CaptureConfig(source=str(video), live=True))
    assert forced.kind == "file" and forced.live
    # A relative file name resolves next to the config file.
    (tmp_path / "clips").mkdir()
    rel = open_source(CaptureConfig(source="clips/x.mp4"), config_path=tmp_path / "edged.yaml")
    assert isinstance(rel, OpenCvSource) and rel.target == str(tmp_path / "clips" / "x.mp4")


@pytest.mark.parametrize("bad, message", [
    ("camera-one", "not a known kind of source"),
    ("ftp://host/x.mp4", "unsupported URL scheme 'ftp'"),
    ("/dev/sda", "not /dev/videoN"),
    ("   ", "empty"),
])
def test_unknown_source_is_a_clear_error(bad: str, message: str):
    with pytest.raises(SourceSpecError, match=message) as info:
        open_source(CaptureConfig(), source_override=bad)
    assert "--source" in str(info.value)


def test_stop_before_start_and_twice():
    cap = CaptureThread(DemoSource(small_spec(n_frames=3), live=False))
    assert cap.stop()
    cap2 = CaptureThread(DemoSource(small_spec(n_frames=3), live=False)).start()
    assert cap2.stop() and cap2.stop()
    assert not cap2.is_alive()


def test_fps_cap_skips_live_frames_but_never_file_frames(video: Path):
    # A 0.01 fps cap: after the first delivered frame, every frame of the next 100 s is skipped.
    cfg = CaptureConfig(source=str(video), loop=True, live=True, fps_cap=0.01)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        assert cap.get(timeout=10) is not None
        assert cap.wait_for(lambda s: s.captured >= 10, timeout=10)
        assert cap.get(timeout=0.05) is None
        st = cap.stats_record()
        assert st.skipped >= 9 and st.dropped == 0 and st.delivered == 1
    finally:
        cap.stop()
    # Files are paced instead: every frame still arrives.
    cfg = CaptureConfig(source=str(video), fps_cap=240.0)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        assert [f.index for f in read_all(cap)] == list(range(N_FRAMES))
    finally:
        cap.stop()
    assert cap.stats()["skipped"] == 0


class _MjpegHandler(BaseHTTPRequestHandler):
    """multipart/x-mixed-replace JPEG stream, as IP cameras serve it (real JPEGs of the demo scene)."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        expected = getattr(self.server, "basic_auth", None)
        if expected is not None:
            given = self.headers.get("Authorization", "")
            self.server.auth_seen.append(given)
            if given != "Basic " + base64.b64encode(expected.encode()).decode():
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        while not self.server.halt.is_set():
            jpeg = self.server.jpegs[i % len(self.server.jpegs)]
            i += 1
            try:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                                 + jpeg + b"\r\n")
            except OSError:
                return
            self.server.halt.wait(0.02)  # ~50 fps camera


def _start_mjpeg_server(port: int = 0, basic_auth: Optional[str] = None) -> ThreadingHTTPServer:
    """`basic_auth` "user:password": the camera answers 401 without exactly these credentials."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _MjpegHandler)
    server.daemon_threads = True
    server.basic_auth, server.auth_seen = basic_auth, []
    server.halt = threading.Event()
    scene = Scene(small_spec(n_frames=8))
    server.jpegs = [cv2.imencode(".jpg", scene.frame(i)[0])[1].tobytes() for i in range(8)]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop_mjpeg_server(server: ThreadingHTTPServer) -> None:
    server.halt.set()  # handlers return: the camera's connection closes mid-stream
    server.shutdown()
    server.server_close()


def test_http_stream_that_goes_away_mid_stream_is_reopened():
    server = _start_mjpeg_server()
    port = server.server_address[1]
    cfg = CaptureConfig(source=f"http://127.0.0.1:{port}/stream.mjpg", reconnect_min_s=0.05, reconnect_max_s=0.2,
                        timeout_s=5.0)
    source = open_source(cfg)
    assert source.kind == "url" and source.live
    cap = CaptureThread(source, cfg).start()
    try:
        first = cap.get(timeout=20)
        assert first is not None and first.image.shape == (120, 160, 3)
        _stop_mjpeg_server(server)  # the camera disappears
        assert cap.wait_for(lambda s: s.state == "reconnecting" and s.reconnects >= 2, timeout=30)
        assert cap.is_alive()
        seen = cap.stats_record().last_index
        server = _start_mjpeg_server(port)  # and comes back on the same address
        assert cap.wait_for(lambda s: s.state == "ok" and s.captured >= 3 and s.last_index > seen, timeout=30)
        frame = cap.get(timeout=20)
        assert frame is not None and frame.index > first.index  # indices keep increasing across reconnects
        assert frame.stream_time > first.stream_time
    finally:
        assert cap.stop()
        _stop_mjpeg_server(server)


def test_stream_credentials_from_a_file_reach_the_camera_url_encoded_and_are_never_shown(tmp_path: Path, caplog):
    password = "p@ss:w/rd S3cret"  # characters that must be percent-encoded in a URL
    secret_file = tmp_path / "camera.pass"
    secret_file.write_text(password + "\n")
    server = _start_mjpeg_server(basic_auth=f"ad min:{password}")
    port = server.server_address[1]
    cfg = CaptureConfig(source=f"http://127.0.0.1:{port}/stream.mjpg", username="ad min",
                        password_file=str(secret_file), reconnect_min_s=0.05, reconnect_max_s=0.2, timeout_s=5.0)
    caplog.set_level(logging.DEBUG)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        assert cap.get(timeout=30) is not None  # the camera accepted the credentials: frames flow
        st = cap.stats()
    finally:
        assert cap.stop()
        _stop_mjpeg_server(server)
    assert st["state"] == "ok" and st["source"] == f"url http://ad%20min:***@127.0.0.1:{port}/stream.mjpg"
    shown = [repr(cap.source), cap.source.description, str(cap.source.target), repr(st)]
    shown += [r.getMessage() for r in caplog.records]
    assert not [text for text in shown if "S3cret" in text or "w%2Frd" in text]


def test_wrong_stream_password_keeps_retrying_and_says_why_without_the_password(tmp_path: Path, caplog, monkeypatch):
    server = _start_mjpeg_server(basic_auth="admin:right-one")
    port = server.server_address[1]
    monkeypatch.setenv("EDGED_TEST_CAMERA_PASSWORD", "Wr0ngS3cret")
    cfg = CaptureConfig(source=f"http://admin:Inl1neS3cret@127.0.0.1:{port}/stream.mjpg?token=T0kenS3cret",
                        password_env="EDGED_TEST_CAMERA_PASSWORD", reconnect_min_s=0.05, reconnect_max_s=0.1,
                        timeout_s=5.0)
    caplog.set_level(logging.DEBUG)
    cap = CaptureThread(open_source(cfg), cfg).start()
    try:
        assert cap.wait_for(lambda s: s.reconnects >= 2, timeout=60)
        st = cap.stats()
    finally:
        assert cap.stop()
        _stop_mjpeg_server(server)
    # password_env took the place of the password written in the URL, and reached the camera.
    sent = {base64.b64decode(a.split()[1]).decode() for a in server.auth_seen if a.startswith("Basic ")}
    assert sent == {"admin:Wr0ngS3cret"}
    assert st["state"] == "reconnecting" and cap.failed is None
    assert st["source"] == f"url http://admin:***@127.0.0.1:{port}/stream.mjpg?token=***"
    assert f"127.0.0.1:{port} answers; check the path, the credentials" in st["last_error"]
    shown = [repr(st)] + [r.getMessage() for r in caplog.records]
    assert not [text for text in shown if "S3cret" in text]


def test_unreadable_stream_password_is_a_config_error_naming_the_key(tmp_path: Path, monkeypatch):
    from edged.config import ConfigError

    monkeypatch.delenv("EDGED_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="capture.password_env: environment variable EDGED_TEST_UNSET is not set"):
        open_source(CaptureConfig(source="rtsp://cam/x", username="u", password_env="EDGED_TEST_UNSET"))
    with pytest.raises(ConfigError, match=r"capture.password_file: cannot read .*nope.pass"):
        open_source(CaptureConfig(source="rtsp://cam/x", username="u", password_file=str(tmp_path / "nope.pass")))


_WITHOUT_SKIMAGE = """
import sys

class BlockSkimage:  # as if scikit-image were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "skimage" or name.startswith("skimage."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockSkimage())
from edged.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_demo_without_scikit_image_fails_once_with_how_to_fix_it(tmp_path: Path):
    """Before: a traceback every second, forever. Now: one line and exit code NO_INPUT."""
    from edged.exitcodes import NO_INPUT

    cfg = tmp_path / "edged.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ncapture:\n  source: demo\n  reconnect_min_s: 0.05\n"
                   "mqtt:\n  enabled: false\nweb:\n  enabled: false\n")
    r = subprocess.run([sys.executable, "-c", _WITHOUT_SKIMAGE, "run", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    message = "'demo' needs scikit-image: pip install 'edged[demo]'"
    assert r.returncode == NO_INPUT, r.stderr[-3000:]
    assert r.stderr.count(message) == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "capture.source" in errors[0] and errors[0].endswith(message)
    assert "Traceback" not in r.stderr and "retrying" not in r.stderr
