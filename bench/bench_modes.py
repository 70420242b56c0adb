"""Compute budget (issue 10): for each detection mode, the multiply-accumulates the detector and the
encoder actually executed per frame, x86 milliseconds per frame, and the tracking quality, on real video
and on generated scenes with exact ground truth.

The daemon's own parts run synchronously through edged.pipeline (one thread, no MQTT): the capture is
the video file (or the scene renderer), the detector part is what `detector.motion` selects, the encoder
runs as `encoder.mode` says, the tracker and the events engine are the real ones. MOT output is scored
with edged.tracking.evaluate against the ground truth; `enter` events are counted.

    python bench/bench_modes.py                       # every scenario and mode
    python bench/bench_modes.py --scenarios tud demo --modes full default
    python bench/bench_modes.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import report  # noqa: E402
from edged.config import EdgedConfig, deep_merge, load_config  # noqa: E402

SHARED = ROOT.parent / "shared"

# Modes: config overlays on the defaults. "full" is edged 0.1: the model on every whole frame and the
# encoder on every detection.
MODES: Dict[str, dict] = {
    "full": {"detector": {"motion": {"enabled": False}}, "encoder": {"mode": "always"}},
    "full, lazy encoder": {"detector": {"motion": {"enabled": False}}, "encoder": {"mode": "ambiguous"}},
    "motion, every frame": {"detector": {"motion": {"track_interval_s": 0.0}}, "encoder": {"mode": "always"}},
    "motion": {"encoder": {"mode": "always"}},
    "default": {},  # motion gating, moving tracks every track_interval_s, lazy encoder
    "full, 320 model": {"detector": {"model": "models/yolov3-tiny-320-int8.tflite", "motion": {"enabled": False}},
                        "encoder": {"mode": "always"}},
    "default, 320 model": {"detector": {"model": "models/yolov3-tiny-320-int8.tflite"}},
}


# ---------------------------------------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    name: str
    fps: float
    frames: Callable[[], Iterator[Tuple[int, np.ndarray]]]  # (0-based index, BGR image)
    gt: np.ndarray  # MOT rows frame (1-based), id, x, y, w, h of the objects to track
    classes: List[str]


def _video(path: Path) -> Callable[[], Iterator[Tuple[int, np.ndarray]]]:
    import cv2

    def frames():
        cap = cv2.VideoCapture(str(path))
        i = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            yield i, img
            i += 1
        cap.release()

    return frames


def _scene(spec) -> Scenario:
    from edged.scene import Scene

    scene = Scene(spec)
    rows = [[i + 1, g.track_id, g.x, g.y, g.w, g.h] for i, boxes in scene.gt() for g in boxes if g.visibility > 0.3]

    def frames():
        for i in range(spec.n_frames):
            yield i, scene.frame(i)[0]

    classes = sorted({o.class_name for o in spec.objects})
    return Scenario("", spec.fps, frames, np.array(rows, float).reshape(-1, 6), classes)


def _far_spec():
    """1080p, small far-away people (40-70 px tall) crossing at different depths."""
    from edged.scene import SceneObject, SceneSpec, Waypoint

    objs = (
        SceneObject(1, "astronaut", 60, (Waypoint(0, -40, 420), Waypoint(199, 1960, 420))),
        SceneObject(2, "cameraman", 45, (Waypoint(20, 1960, 300), Waypoint(199, -40, 300)), flip=True),
        SceneObject(3, "astronaut", 70, (Waypoint(40, 600, 1120), Waypoint(199, 900, 520))),
        SceneObject(4, "cameraman", 40, (Waypoint(0, 1500, 250), Waypoint(199, 1700, 250))),
    )
    return SceneSpec(1920, 1080, 10.0, 200, 5, objs)


def scenarios() -> Dict[str, Callable[[], Scenario]]:
    from edged.scene import SceneObject, SceneSpec, Waypoint, default_scene

    def tud() -> Scenario:
        from edged.tracking.evaluate import load_gt

        gt = load_gt(SHARED / "data" / "mot15" / "TUD-Stadtmitte" / "gt" / "gt.txt")
        return Scenario("TUD-Stadtmitte (real video, 640x480, 25 fps)", 25.0,
                        _video(SHARED / "data" / "video" / "MOT15-TUD-Stadtmitte.mp4"), gt, ["person"])

    def demo() -> Scenario:
        s = _scene(default_scene())
        s.name = "demo scene (640x480, 10 fps)"
        return s

    def still() -> Scenario:
        # A still minute: two people standing (they must stay tracked), nothing moving.
        objs = (SceneObject(1, "astronaut", 220, (Waypoint(0, 180, 280), Waypoint(599, 180, 280))),
                SceneObject(2, "cameraman", 190, (Waypoint(0, 470, 170), Waypoint(599, 470, 170))))
        s = _scene(SceneSpec(640, 480, 10.0, 600, 3, objs))
        s.name = "still minute, two people standing (640x480, 10 fps, 600 frames)"
        return s

    def stand() -> Scenario:
        # One person walks in (10 s), stands still for 30 s, walks out (10 s); 60 s in all.
        path = (Waypoint(0, -80, 260), Waypoint(100, 320, 260), Waypoint(400, 320, 260), Waypoint(500, 720, 260),
                Waypoint(599, 720, 260))
        objs = (SceneObject(1, "astronaut", 220, path),)
        s = _scene(SceneSpec(640, 480, 10.0, 600, 4, objs))
        s.name = "walk in, stand 30 s, walk out (640x480, 10 fps, 600 frames)"
        return s

    def far() -> Scenario:
        s = _scene(_far_spec())
        s.name = "far people, 1080p (40-70 px tall, 10 fps, 200 frames)"
        return s

    return {"tud": tud, "demo": demo, "still": still, "stand": stand, "far": far}


# ---------------------------------------------------------------------------------------------- run
@dataclass
class Result:
    mode: str
    frames: int
    gmac_per_frame: float
    ms_per_frame: float
    calls: int
    encoded: int
    mota: float
    idf1: float
    id_switches: int
    enters: int
    exits: int
    recall: float  # detections (IoU >= 0.5) per ground-truth box, over the frames the model ran on


def _cfg(mode: str, classes: List[str]) -> EdgedConfig:
    overlay = deep_merge(MODES[mode], {"detector": {"classes": classes}, "mqtt": {"enabled": False},
                                       "web": {"enabled": False}})
    return load_config(None, overlay=overlay)


def run_mode(scenario: Scenario, mode: str) -> Result:
    from edged.bench import run_configured
    from edged.tracking.evaluate import score

    run = run_configured(_cfg(mode, scenario.classes), scenario.frames(), scenario.fps)
    s = score([("x", scenario.gt, np.array(run.mot_rows, float).reshape(-1, 6))])[0]
    c = run.counters
    return Result(mode, run.frames, run.gmac_per_frame["total"], run.ms_per_frame, c.detector_calls, c.encoded,
                  s.mota, s.idf1, s.id_switches, sum(1 for e in run.events if e["type"] == "enter"),
                  sum(1 for e in run.events if e["type"] == "exit"), _recall(scenario.gt, run.detections))


def _recall(gt: np.ndarray, det_rows: Dict[int, np.ndarray]) -> float:
    from edged.tracking.matching import iou_matrix

    found = total = 0
    for f in np.unique(gt[:, 0]).astype(int):
        if f - 1 not in det_rows:
            continue  # no model call on this frame
        g = gt[gt[:, 0] == f][:, 2:6].copy()
        g[:, 2:] += g[:, :2]
        d = det_rows.get(f - 1, np.zeros((0, 4)))
        total += len(g)
        if len(d):
            found += int((iou_matrix(g, d.astype(np.float64)) >= 0.5).any(axis=1).sum())
    return found / max(1, total)


def table(name: str, results: List[Result]) -> str:
    full = next((r for r in results if r.mode == "full"), None)
    lines = [f"\n#### {name}\n",
             "| mode | GMAC / frame | x fewer than full | x86 ms / frame | model calls | encoded crops | MOTA | IDF1 | ID switches | `enter` / `exit` events | detection recall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{full.gmac_per_frame / r.gmac_per_frame:.1f}" if full and r.gmac_per_frame > 0 else ("inf" if full else "-")
        lines.append(f"| {r.mode} | {r.gmac_per_frame:.3f} | {ratio} | {r.ms_per_frame:.1f} | {r.calls} / {r.frames} | "
                     f"{r.encoded} | {r.mota:.3f} | {r.idf1:.3f} | {r.id_switches} | {r.enters} / {r.exits} | {r.recall:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="*", default=list(scenarios()))
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--out", help="append the markdown tables to this file")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    header = (f"\n### Compute budget (bench/bench_modes.py, {time.strftime('%Y-%m-%d')}, load {load:.1f} at start, "
              f"{os.cpu_count()} cores)\n\nOne thread, frames through the pipeline synchronously; GMAC = detector "
              "invocations x model MACs + encoded crops x encoder MACs, counted as executed.\n")
    text = header
    for key in args.scenarios:
        sc = scenarios()[key]()
        results = [run_mode(sc, m) for m in args.modes]
        block = table(sc.name, results)
        print(block, flush=True)
        text += block
    report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
