"""Event-engine benchmark: EventEngine.process() cost per frame and events per second.

    .venv/bin/python bench/bench_events.py [--tracks 50] [--zones 5] [--lines 5] [--frames 3000] [--out FILE.json]

A synthetic but busy scene at 640x480, 10 fps: `--tracks` live confirmed tracks random-walking
(about 3 % of them replaced every frame, so enters/exits flow), a tenth of them coasting in any frame,
some jittering on a line. Zones are random convex-ish polygons, lines random segments. Measured:
median / p95 microseconds per process() call, frames per second of process() alone, events per
second produced, and the same scene with no zones/lines (lifecycle + positions only) and with
json.dumps of every record included (what the publisher adds). Repeated `--repeat` times; best run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.config import EventsConfig  # noqa: E402
from edged.events import EventEngine  # noqa: E402
from edged.types import TrackerStep, TrackSnapshot  # noqa: E402

W, H, FPS = 640, 480, 10.0


def make_config(n_zones: int, n_lines: int, rng: np.random.Generator) -> EventsConfig:
    zones, lines = [], []
    for z in range(n_zones):
        k = int(rng.integers(4, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        c = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.1, 0.3, k)
        pts = np.clip(c + np.stack([np.cos(ang) * r, np.sin(ang) * r], 1), 0, 1)
        zones.append({"name": f"zone{z}", "polygon": [tuple(p) for p in pts.tolist()]})
    for i in range(n_lines):
        a, b = rng.uniform(0.05, 0.95, 2), rng.uniform(0.05, 0.95, 2)
        lines.append({"name": f"line{i}", "points": (tuple(a.tolist()), tuple(b.tolist()))})
    return EventsConfig(zones=zones, lines=lines, include_embedding=True)


def make_steps(n_tracks: int, frames: int, rng: np.random.Generator) -> List[TrackerStep]:
    """Pre-built tracker steps so that only the engine is timed."""
    next_id = 1
    live: Dict[int, dict] = {}
    steps = []
    for f in range(frames):
        confirmed, deleted = [], []
        while len(live) < n_tracks:
            live[next_id] = {"pos": rng.uniform((0, 100), (W, H)), "vel": rng.normal(0, 6, 2),
                             "feat": rng.normal(size=128).astype(np.float32), "cls": int(rng.integers(0, 2))}
            confirmed.append(next_id)
            next_id += 1
        for tid in list(live):
            if tid not in confirmed and rng.random() < 0.03:
                t = live.pop(tid)
                deleted.append(snapshot(tid, t, tsu=3))
        tracks = []
        for tid, t in live.items():
            if rng.random() < 0.05:
                t["vel"] = rng.normal(0, 6, 2)
            t["pos"] = t["pos"] + t["vel"] + rng.normal(0, 1.5, 2)
            tsu = 0 if rng.random() > 0.1 or tid in confirmed else int(rng.integers(1, 5))
            tracks.append(snapshot(tid, t, tsu=tsu))
        steps.append(TrackerStep(tracks, confirmed, deleted))
    return steps


def snapshot(tid: int, t: dict, tsu: int) -> TrackSnapshot:
    x, y = t["pos"]
    box = np.array([x - 20, y - 90, x + 20, y], np.float64)
    return TrackSnapshot(tid, t["cls"], box, 0.8, t["vel"].copy(), 20, 20, tsu, t["feat"])


def run_once(cfg: EventsConfig, steps: List[TrackerStep], serialise: bool) -> dict:
    engine = EventEngine(cfg, device_id="bench", camera="cam0", class_names=["person", "car"],
                         frame_size=(W, H), fps=FPS)
    times = np.empty(len(steps))
    kinds: Counter = Counter()
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        events = engine.process(step, frame_index=i, timestamp=1.7e9 + i / FPS, stream_time=i / FPS)
        if serialise:
            for e in events:
                json.dumps(e, separators=(",", ":"))
        times[i] = time.perf_counter() - t0
        kinds.update(e["type"] for e in events)
    wall = time.perf_counter() - t_all
    cpu = time.process_time() - cpu_all  # less sensitive than wall time to other load on the machine
    n_events = sum(kinds.values())
    return {
        "frames": len(steps),
        "events": n_events,
        "events_by_type": dict(kinds),
        "us_per_frame_median": round(float(np.median(times)) * 1e6, 1),
        "us_per_frame_p95": round(float(np.percentile(times, 95)) * 1e6, 1),
        "frames_per_s": round(len(steps) / wall, 1),
        "events_per_s": round(n_events / wall, 1),
        "us_per_event": round(wall / max(n_events, 1) * 1e6, 2),
        "cpu_us_per_frame_mean": round(cpu / len(steps) * 1e6, 1),
        "cpu_frames_per_s": round(len(steps) / cpu, 1),
        "cpu_events_per_s": round(n_events / cpu, 1),
    }


def bench_geometry(cfg: EventsConfig, n: int, rng: np.random.Generator, reps: int = 2000) -> dict:
    """Zone + line tests for n points at once vs one point at a time (what vectorising saves)."""
    from edged import geometry

    polys = geometry.pack_polygons([z.polygon for z in cfg.zones])
    prev = np.roll(polys, 1, axis=1)
    a = np.array([ln.points[0] for ln in cfg.lines]) * (W, H)
    b = np.array([ln.points[1] for ln in cfg.lines]) * (W, H)
    p = rng.uniform(0, 1, (n, 2))
    q = p + rng.normal(0, 0.01, (n, 2))

    def vectorised() -> None:
        geometry.points_in_polygons(q, polys, prev)
        geometry.signed_distance(q * (W, H), a, b)
        geometry.segments_intersect(p * (W, H), q * (W, H), a, b)

    def per_point() -> None:
        for i in range(n):
            geometry.points_in_polygons(q[i:i + 1], polys, prev)
            geometry.signed_distance(q[i:i + 1] * (W, H), a, b)
            geometry.segments_intersect(p[i:i + 1] * (W, H), q[i:i + 1] * (W, H), a, b)

    out = {}
    for name, fn, k in (("vectorised_us", vectorised, reps), ("per_point_loop_us", per_point, max(reps // 20, 10))):
        t = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        out[name] = round(float(np.median(t)) * 1e6, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=50)
    ap.add_argument("--zones", type=int, default=5)
    ap.add_argument("--lines", type=int, default=5)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    cfg = make_config(args.zones, args.lines, rng)
    steps = make_steps(args.tracks, args.frames, rng)
    cases = {
        f"{args.tracks} tracks, {args.zones} zones, {args.lines} lines": (cfg, False),
        f"{args.tracks} tracks, no zones/lines": (EventsConfig(include_embedding=True), False),
        f"{args.tracks} tracks, {args.zones} zones, {args.lines} lines + json.dumps": (cfg, True),
    }
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "python": platform.python_version(), "numpy": np.__version__, "cases": {}}
    for name, (c, ser) in cases.items():
        runs = [run_once(c, steps, ser) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["us_per_frame_median"])
        results["cases"][name] = best
        print(f"{name}: median {best['us_per_frame_median']} us/frame (p95 {best['us_per_frame_p95']}), "
              f"{best['frames_per_s']} frames/s, {best['events_per_s']} events/s; CPU {best['cpu_us_per_frame_mean']} us/frame "
              f"= {best['cpu_frames_per_s']} frames/s, {best['cpu_events_per_s']} events/s "
              f"({best['events']} events over {best['frames']} frames: {best['events_by_type']})")
    results["geometry"] = bench_geometry(cfg, args.tracks, rng)
    g = results["geometry"]
    print(f"geometry, {args.tracks} points x {args.zones} zones + {args.lines} lines: vectorised "
          f"{g['vectorised_us']} us, per-point loop {g['per_point_loop_us']} us")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
