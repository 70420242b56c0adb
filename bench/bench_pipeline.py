"""End-to-end pipeline benchmark: frame-to-broker latency and throughput of `edged run`.

Starts a throwaway mosquitto on a free loopback port, runs the real daemon (default models) as a
subprocess and subscribes to its topics:

* latency: the demo scene as a *live* source (paced at 10 fps, like a camera); for every event and
  position update, broker-receive time minus the frame's capture time (`ts` in the payload);
* throughput: the demo scene (and TUD-Stadtmitte when ../shared is present) as a *file*, every frame,
  as fast as the pipeline goes: frames per second, events per second, per-stage ms from the final stats.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, start_mosquitto  # noqa: E402
SHARED = ROOT.parent / "shared"


def parse_ts(ts: str) -> float:
    base, frac = ts.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)


class Subscriber:
    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.rows = []  # (topic, recv_time, payload dict or bytes)
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


def run_daemon(work: Path, port: int, source: str, *extra: str) -> float:
    cfg = {
        "device_id": "bench",
        "state_dir": str(work / "state"),
        "capture": {"source": source},
        "detector": {"classes": ["person", "cat", "cup"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 2.0},
        "web": {"enabled": False},
        "logging": {"level": "warning"},
    }
    path = work / "edged.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edged", "run", "--config", str(path), *extra], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="append the results as markdown to this file")
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(tmp)
        broker, port = start_mosquitto(work)
        try:
            # 1. latency with a live (paced) source
            sub = Subscriber(port, "edged/bench/#")
            run_daemon(work, port, "demo")
            time.sleep(1.0)
            sub.close()
            lat_ev = [(t - parse_ts(b["ts"])) * 1e3 for topic, t, b in sub.rows
                      if topic.endswith("/events") and isinstance(b, dict)]
            lat_pos = [(t - parse_ts(b["ts"])) * 1e3 for topic, t, b in sub.rows
                       if topic.endswith("/tracks") and isinstance(b, dict)]
            lines.append("| live demo scene (10 fps) | events | %d | %.0f | %.0f |" % (len(lat_ev), pct(lat_ev, 50), pct(lat_ev, 95)))
            lines.append("| live demo scene (10 fps) | position | %d | %.0f | %.0f |" % (len(lat_pos), pct(lat_pos, 50), pct(lat_pos, 95)))
            # 2. throughput with files (every frame, as fast as it goes)
            from edged.scene import default_scene, write_video

            video = write_video(default_scene(), work / "scene.mp4")
            sources = [("demo scene file 640x480", str(video), 200)]
            tud = SHARED / "data" / "video" / "MOT15-TUD-Stadtmitte.mp4"
            if tud.exists():
                sources.append(("TUD-Stadtmitte 640x480", str(tud), 179))
            tput = []
            for name, src, n in sources:
                sub = Subscriber(port, "edged/bench/#")
                seconds = run_daemon(work, port, src)
                time.sleep(1.0)
                sub.close()
                n_events = sum(1 for topic, _, _ in sub.rows if topic.endswith(("/events", "/tracks")))
                stats = [b for topic, _, b in sub.rows if topic.endswith("/stats") and isinstance(b, dict)]
                stage = stats[-1]["stage_ms"] if stats else {}
                tput.append("| %s | %d | %.1f | %.1f | %d | %s |" % (
                    name, n, seconds, n / seconds, n_events,
                    ", ".join(f"{k} {v:.1f}" for k, v in sorted(stage.items()))))
        finally:
            broker.terminate()
            broker.wait(10)
    out = [
        "",
        f"### Pipeline (bench/bench_pipeline.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})",
        "",
        "Frame-to-broker latency: broker-receive time minus the frame's capture time.",
        "",
        "| source | messages | n | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
        *lines,
        "",
        "Throughput, every frame of a file through detect + encode + track + events + MQTT (process start included):",
        "",
        "| source | frames | wall s | frames/s | messages | mean stage ms |",
        "|---|---|---|---|---|---|",
        *tput,
        "",
    ]
    report("\n".join(out), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
