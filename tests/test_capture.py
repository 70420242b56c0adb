"""Capture: real video files, the real demo scene, a real closed TCP port; no OpenCV mocks."""

from __future__ import annotations

import logging
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from edged.capture import (
    CaptureThread,
    DemoSource,
    OpenCvSource,
    SourceSpecError,
    open_source,
)
from edged.config import CaptureConfig
from edged.scene import Scene, default_scene, write_video
from tests.conftest import free_port

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


def test_missing_file_is_retried_with_backoff_until_it_appears(tmp_path: Path, caplog):
    target = tmp_path / "later.mp4"
    cfg = CaptureConfig(source=str(target), reconnect_min_s=0.02, reconnect_max_s=0.2)
    source = open_source(cfg)  # not opened yet: a missing file is not a configuration error
    cap = CaptureThread(source, cfg, rng=random.Random(0))

    caplog.set_level(logging.WARNING, logger="edged.capture")
    cap.start()
    try:
        assert cap.wait_for(lambda s: s.reconnects >= 4, timeout=20)
        st = cap.stats_record()
        assert st.state == "reconnecting" and "does not exist" in (st.last_error or "")
        assert cap.get(timeout=0.05) is None
        # Each attempt is logged with its number and the growing (jittered, capped) delay.
        delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0])
                  for r in caplog.records if "retrying in" in r.getMessage()]
        assert len(delays) >= 4
        assert delays[0] <= 0.03 and max(delays) <= 0.2 and delays[3] > delays[0]
        # The file appears (atomically, as a camera recorder would publish it): frames flow.
        tmp = write_video(small_spec(n_frames=5), tmp_path / "writing.mp4")
        os.replace(tmp, target)
        frames = read_all(cap)
    finally:
        assert cap.stop()
    assert [f.index for f in frames] == list(range(5))
    assert cap.stats()["state"] == "ended"


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


def _start_mjpeg_server(port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _MjpegHandler)
    server.daemon_threads = True
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
