"""Memory over time: `edged run` on the looping demo scene (every frame, as fast as it goes) with a
real broker, resident set size sampled once a second from /proc. A leak shows as a steady climb.

    python bench/bench_memory.py [--frames 1500] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, start_mosquitto  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--out", help="append the results as markdown to this file")
    args = ap.parse_args()
    from edged.scene import default_scene, write_video

    with tempfile.TemporaryDirectory(prefix="edged-mem-") as tmp:
        work = Path(tmp)
        broker, port = start_mosquitto(work)
        try:
            video = write_video(default_scene(), work / "scene.mp4")
            cfg = {
                "device_id": "bench", "state_dir": str(work / "state"),
                "capture": {"source": str(video), "loop": True},
                "detector": {"classes": ["person", "cat", "cup"]},
                "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 5.0},
                "web": {"enabled": False}, "logging": {"level": "warning"},
            }
            (work / "edged.yaml").write_text(yaml.safe_dump(cfg))
            proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(work / "edged.yaml"),
                                     "--max-frames", str(args.frames)], cwd=ROOT)
            samples = []
            t0 = time.monotonic()
            while proc.poll() is None:
                try:
                    samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
                except OSError:
                    break
                time.sleep(1.0)
            proc.wait()
        finally:
            broker.terminate()
            broker.wait(10)
    warm = [m for t, m in samples if t >= 10.0] or [m for _, m in samples]
    third = max(1, len(warm) // 3)
    first, last = warm[:third], warm[-third:]
    lines = [
        "",
        f"### Memory (bench/bench_memory.py, {time.strftime('%Y-%m-%d')}, {args.frames} frames of the looping demo scene, "
        f"{samples[-1][0]:.0f} s)" if samples else "### Memory: no samples",
        "",
        "| RSS after 10 s warm-up | MB |",
        "|---|---|",
        f"| mean of the first third | {sum(first) / len(first):.1f} |",
        f"| mean of the last third | {sum(last) / len(last):.1f} |",
        f"| maximum | {max(warm):.1f} |",
        "",
    ]
    report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
