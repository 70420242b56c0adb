"""`edged replay`: the real daemon (tracker, events, outbox, MQTT) fed from recorded detections."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import ROOT, shared_path
from tests.mqttutil import Collector

# Runs edged with OpenCV and the TFLite runtimes made unimportable: a replay must not need them.
_WITHOUT_CAMERA_AND_MODELS = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cv2", "ai_edge_litert", "tflite_runtime", "tensorflow"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from edged.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_replay_runs_the_real_tracker_and_publishes_without_camera_or_models(tmp_path, broker):
    det = shared_path("data", "mot15", "TUD-Stadtmitte", "det", "det.txt")
    cfg = tmp_path / "device.yaml"
    cfg.write_text(yaml.safe_dump({
        "device_id": "replayed", "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "qos_tracks": 1}, "web": {"enabled": False},
    }))
    sub = Collector(broker.port, "edged/replayed/#")
    try:
        r = subprocess.run([sys.executable, "-c", _WITHOUT_CAMERA_AND_MODELS, "replay", "--config", str(cfg),
                            "--detections", str(det), "--as-fast-as-possible", "--print-events",
                            "--mot-out", str(tmp_path / "replay.txt")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        printed = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        enters = [e for e in printed if e["type"] == "enter"]
        assert enters and len([e for e in printed if e["type"] == "exit"]) == len(enters)
        assert sub.wait_for(lambda ms: {e["event_id"] for e in printed} <= {m.json()["event_id"] for m in ms
                                                                            if m.topic.endswith(("/events", "/tracks"))}, 60)
        assert "replay det.txt (179 frames, 640x480 @ 25 fps)" in r.stderr
    finally:
        sub.close()
    # The same tracker as `edged mot`: every box the daemon wrote is one `edged mot` writes (which also
    # writes tracks missed only in that frame, the original DeepSORT rule).
    subprocess.run([sys.executable, "-m", "edged", "mot", "--det", str(det), "--out", str(tmp_path / "mot.txt"),
                    "--config", str(cfg)], check=True, capture_output=True, cwd=ROOT, timeout=300)
    ours = set((tmp_path / "replay.txt").read_text().splitlines())
    reference = set((tmp_path / "mot.txt").read_text().splitlines())
    assert ours and ours <= reference and len(ours) >= 0.95 * len(reference)
