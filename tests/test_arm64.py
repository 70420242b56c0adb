"""What must hold on a Raspberry Pi (arm64) as on x86: run on both (scripts/check-arm64.sh runs this file
inside an emulated Raspberry Pi OS; on a real Pi: `pytest -m arm64`).

The image preprocessing must give the same bytes on every platform, or the int8 detector and the encoder
see other inputs there (OpenCV's INTER_LINEAR and 8-bit HSV round differently in their ARM code). The
hashes below were computed on x86; the same code must reproduce them on any machine.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from edged.inference.encoder import bgr_to_hsv, crop_resized
from edged.inference.yolo import letterbox
from tests.conftest import ROOT, shared_path
from tests.mqttutil import Collector

pytestmark = pytest.mark.arm64


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _pattern(h: int, w: int) -> np.ndarray:
    """A deterministic full-range texture (integer hash of x, y, channel): every rounding path is hit."""
    y, x, c = np.meshgrid(np.arange(h, dtype=np.uint64), np.arange(w, dtype=np.uint64), np.arange(3, dtype=np.uint64), indexing="ij")
    v = (x * np.uint64(2654435761) + y * np.uint64(40503) + c * np.uint64(977)) & np.uint64(0xFFFFFFFF)
    v ^= v >> np.uint64(13)
    v = (v * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)
    v ^= v >> np.uint64(16)
    return (v & np.uint64(255)).astype(np.uint8)


# 640x480 and 333x517 are sizes where cv2.INTER_LINEAR gives other bytes on ARM than on x86.
LETTERBOX_SHA256 = {
    (480, 640): "47216bb9793113e2e28f7be18f7bdac50b9dc03a2e725a8f520227e6de71f441",
    (517, 333): "e3172e0baf1d40308c42e28a90a469f766706882f4946a8603e4e0d5360fd732",
    (1080, 1920): "fd149fc4fcb69438e3bbb4e1190362f2adbc3c039943bc1c592caefba62d69a4",
}
MOT17_05_LETTERBOX_SHA256 = "55dbea160ef81b807c385dddceeced4e4846b0b5fdfe887d19cadb2dc246305f"
CROPS_SHA256 = "9bee7a52508e140cfdc0d06be2464d5657f74336732b5f57a2daeb3a0c0fd123"
HSV_CUBE_SHA256 = "cc4c8f3a2064ffaed3776170c4dfa02c90011b02dbc7ece07b7fced54069ad55"


@pytest.mark.parametrize("shape", sorted(LETTERBOX_SHA256))
def test_letterbox_gives_the_same_bytes_on_every_platform(shape):
    canvas, _ = letterbox(_pattern(*shape), 416, 416)
    assert _sha(canvas) == LETTERBOX_SHA256[shape], f"letterbox of a {shape[1]}x{shape[0]} frame differs from x86"


def test_letterbox_of_a_real_640x480_frame():
    image = cv2.imread(str(shared_path("data", "MOT17-mini", "MOT17-05-FRCNN", "img1", "000001.jpg")))
    assert image is not None and image.shape == (480, 640, 3)
    canvas, _ = letterbox(image, 416, 416)
    assert _sha(canvas) == MOT17_05_LETTERBOX_SHA256


def test_encoder_crops_give_the_same_bytes_on_every_platform():
    image = _pattern(480, 640)
    boxes = np.array([[10.2, 20.7, 61.0, 170.4], [300, 100, 333.3, 190], [500.5, 0, 640, 480], [0, 0, 17, 9]], np.float32)
    crops = np.concatenate([crop_resized(image, boxes, 64, 128).reshape(-1), crop_resized(image, boxes, 32, 64).reshape(-1)])
    assert _sha(crops) == CROPS_SHA256


def test_hsv_is_the_same_on_every_platform_for_every_colour():
    cube = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij"), -1).astype(np.uint8)
    hsv = bgr_to_hsv(cube.reshape(4096, 4096, 3))
    assert _sha(hsv) == HSV_CUBE_SHA256
    # The case OpenCV's ARM code rounds down: BGR (1, 1, 2) has S = 255 * 1/2 = 127.5 -> 128.
    assert bgr_to_hsv(np.array([[[1, 1, 2]]], np.uint8)).tolist() == [[[0, 128, 2]]]


def test_daemon_on_a_short_real_clip_publishes_to_a_local_broker(tmp_path, broker):
    """The real `edged run` on the first frames of a real video, against a real mosquitto."""
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    frames = 12
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(yaml.safe_dump({
        "device_id": "pi",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": str(video)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "web": {"enabled": False},
    }))
    sub = Collector(broker.port, "edged/pi/#")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "edged", "run", "--config", str(cfg), "--max-frames", str(frames), "--mot-out", str(tmp_path / "mot.txt")],
            capture_output=True, text=True, cwd=ROOT, timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert sub.wait_for(lambda ms: any(m.topic == "edged/pi/availability" and m.payload == b"offline" for m in ms), 60)
        availability = [m.payload for m in sub.on("/availability")]
        assert availability[0] == b"online" and availability[-1] == b"offline"
        events = sub.payloads("/events")
        enters = [e for e in events if e["type"] == "enter"]
        # TUD-Stadtmitte opens with 6+ people in view: several are confirmed within 12 frames.
        assert len(enters) >= 3 and all(e["class"] == "person" for e in enters)
        exits = {e["track_id"] for e in events if e["type"] == "exit"}
        assert exits == {e["track_id"] for e in enters}, "every track entered must exit when the clip ends"
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        rows = np.loadtxt(tmp_path / "mot.txt", delimiter=",", ndmin=2)
        assert rows.shape[1] == 10 and 1 <= rows[:, 0].min() and rows[:, 0].max() <= frames
        state = sub.last("/state")
        assert state is not None and json.loads(state.payload)
    finally:
        sub.close()
