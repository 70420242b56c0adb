"""End-to-end pipeline benchmark: throughput, efficiency against the model bound, and frame-to-broker
latency of the real `edged run` daemon (a throwaway mosquitto on a free loopback port, default models).

* efficiency: a video file, every frame, as fast as the pipeline goes, in full-frame mode (the model on
  every whole frame, edged 0.1's way) and in the default mode (motion-gated regions). The model bound is
  the frame rate the model invocations alone would allow, 1000 / (model ms per frame); efficiency is the
  achieved frame rate over that bound (both from the daemon's final `stats`: processing_fps,
  model_ms_per_frame);
* latency: for every event and position update, broker-receive time minus the frame's capture time
  (`ts` in the payload), p50 / p95, for the demo scene as a live source paced at 10 fps (like a camera).

    python bench/bench_pipeline.py [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import report, start_mosquitto  # noqa: E402

SHARED = ROOT.parent / "shared"
# "models on 1 thread": the detector and encoder each on one core, so the other core is free for decoding,
# motion, tracking and delivery to overlap with the model (on 2 cores the default 2 model threads take both).
MODES = {"full frame": ["--set", "detector.motion.enabled=false", "--set", "encoder.mode=always"], "default": [],
         "default, models on 1 thread": ["--set", "detector.threads=1", "--set", "encoder.threads=1"]}


def parse_ts(ts: str) -> float:
    base, frac = ts.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)


class Subscriber:
    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.rows: List[tuple] = []  # (topic, recv_time, payload dict or bytes)
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(10)

    def _on(self, _c, _u, msg):
        now = time.time()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        self.rows.append((msg.topic, now, body))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def run_daemon(work: Path, port: int, source: str, classes: List[str], *extra: str) -> None:
    import yaml

    cfg = {
        "device_id": "bench",
        "state_dir": str(work / "state"),
        "capture": {"source": source},
        "detector": {"classes": classes},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 2.0, "qos_tracks": 1},
        "web": {"enabled": False},
        "logging": {"level": "warning"},
    }
    path = work / "edged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "edged", "run", "--config", str(path), *extra], check=True, cwd=ROOT)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def latencies(rows, suffix):
    return [(t - parse_ts(b["ts"])) * 1e3 for topic, t, b in rows if topic.endswith(suffix) and isinstance(b, dict)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="append the results as markdown to this file")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    eff_rows, lat_rows = [], []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        broker, port = start_mosquitto(work)
        try:
            from bench.bench_modes import _far_spec
            from edged.scene import default_scene, write_video

            sources = []
            tud = SHARED / "data" / "video" / "MOT15-TUD-Stadtmitte.mp4"
            if tud.exists():
                sources.append(("TUD-Stadtmitte 640x480, 179 frames", str(tud), ["person"]))
            sources.append(("demo scene 640x480, 200 frames", str(write_video(default_scene(), work / "scene.mp4")),
                            ["person", "cat", "cup"]))
            sources.append(("far people 1920x1080, 200 frames", str(write_video(_far_spec(), work / "far.mp4")),
                            ["person"]))
            for name, src, classes in sources:
                for mode, extra in MODES.items():
                    sub = Subscriber(port, "edged/bench/#")
                    run_daemon(work, port, src, classes, *extra)
                    time.sleep(1.0)
                    sub.close()
                    stats = [b for topic, _, b in sub.rows if topic.endswith("/stats") and isinstance(b, dict)]
                    s = stats[-1]
                    bound = 1000.0 / s["model_ms_per_frame"] if s["model_ms_per_frame"] else float("inf")
                    eff = s["processing_fps"] / bound if bound != float("inf") else float("nan")
                    lat = latencies(sub.rows, "/events") + latencies(sub.rows, "/tracks")
                    eff_rows.append("| %s | %s | %.1f | %.2f | %.1f | %.1f | %.2f | %.0f / %.0f |" % (
                        name, mode, s["processing_fps"], s["gmac_per_frame"], s["model_ms_per_frame"], bound, eff,
                        pct(lat, 50), pct(lat, 95)))
            # Latency from a live (paced, 10 fps) source, as a camera delivers it.
            for mode, extra in MODES.items():
                sub = Subscriber(port, "edged/bench/#")
                run_daemon(work, port, "demo", ["person", "cat", "cup"], *extra)
                time.sleep(1.0)
                sub.close()
                ev, pos = latencies(sub.rows, "/events"), latencies(sub.rows, "/tracks")
                lat_rows.append("| live demo scene (10 fps) | %s | %d | %.0f | %.0f | %d | %.0f | %.0f |" % (
                    mode, len(ev), pct(ev, 50), pct(ev, 95), len(pos), pct(pos, 50), pct(pos, 95)))
        finally:
            broker.terminate()
            broker.wait(10)
    out = [
        "",
        f"### Pipeline (bench/bench_pipeline.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load "
        f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end)",
        "",
        "Every frame of a file through capture, detection, encoder, tracker, events, outbox and MQTT, as fast as "
        "it goes (`edged run`, real broker). Model bound = 1000 / model ms per frame; efficiency = achieved fps / "
        "bound. Latency: broker-receive time minus the frame's capture time.",
        "",
        "| source | mode | frames/s | GMAC / frame | model ms / frame | model bound fps | efficiency | latency p50 / p95 ms |",
        "|---|---|---|---|---|---|---|---|",
        *eff_rows,
        "",
        "| source | mode | events | p50 ms | p95 ms | positions | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|",
        *lat_rows,
        "",
    ]
    report("\n".join(out), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
