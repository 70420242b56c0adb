"""`edged mot`: run the tracker on MOTChallenge detections and write MOTChallenge results.

Output rule of the original DeepSORT application: after each frame, every confirmed track that was
updated in this frame or missed only this frame (time_since_update <= 1) is written with its Kalman box.
The last printed line is the tracker's own time (predict + update, detections already in memory).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from edged.config import ConfigError, TrackerConfig, load_config
from edged.tracking import motio
from edged.tracking.tracker import Tracker


@dataclass
class TrackingRun:
    results: np.ndarray  # (R, 6) frame, id, x, y, w, h
    frame_seconds: np.ndarray  # (F,) predict + update wall-clock time of each frame
    frame_cpu_seconds: np.ndarray  # (F,) the same in CPU time of the tracking thread (robust to load)

    @property
    def total_seconds(self) -> float:
        return float(self.frame_seconds.sum())

    @property
    def median_ms(self) -> float:
        return float(np.median(self.frame_seconds) * 1e3) if self.frame_seconds.size else 0.0

    @property
    def total_cpu_seconds(self) -> float:
        return float(self.frame_cpu_seconds.sum())

    @property
    def median_cpu_ms(self) -> float:
        return float(np.median(self.frame_cpu_seconds) * 1e3) if self.frame_cpu_seconds.size else 0.0


def track_sequence(det_rows: np.ndarray, cfg: TrackerConfig) -> TrackingRun:
    """Track a whole sequence of MOT detection rows (see `motio.load_detections`)."""
    tracker = Tracker(cfg)
    out: List[np.ndarray] = []
    times: List[float] = []
    cpu_times: List[float] = []
    clock, cpu_clock = time.perf_counter, time.thread_time
    for frame, dets in motio.iter_frames(det_rows):
        c0 = cpu_clock()
        t0 = clock()
        step = tracker.update(dets)
        t1 = clock()
        cpu_times.append(cpu_clock() - c0)
        times.append(t1 - t0)
        shown = [t for t in step.tracks if t.time_since_update <= 1]
        if shown:
            rows = np.empty((len(shown), 6))
            rows[:, 0] = frame
            rows[:, 1] = [t.track_id for t in shown]
            rows[:, 2:] = np.stack([t.box for t in shown])
            rows[:, 4:] -= rows[:, 2:4]
            out.append(rows)
    results = np.concatenate(out) if out else np.zeros((0, 6))
    return TrackingRun(results, np.asarray(times), np.asarray(cpu_times))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--det", required=True, help="MOT det.txt, or DeepSORT-style .npy (10 MOT columns + feature)")
    parser.add_argument("--out", required=True, help="MOTChallenge result file to write")
    parser.add_argument("--config", default=None, help="edged YAML config (its tracker: section is used)")
    parser.add_argument("--no-appearance", action="store_true", help="ignore features: motion + IoU only")


def run(args: argparse.Namespace) -> int:
    try:
        cfg: TrackerConfig = load_config(args.config).tracker
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.no_appearance:
        cfg = cfg.model_copy(update={"use_appearance": False})
    try:
        det_rows = motio.load_detections(args.det)
    except motio.MotFormatError as exc:
        print(f"edged mot: {exc}", file=sys.stderr)
        return 2
    run_ = track_sequence(det_rows, cfg)
    motio.write_results(args.out, run_.results)
    n_ids = len(np.unique(run_.results[:, 1])) if run_.results.size else 0
    print(f"{args.out}: {run_.results.shape[0]} boxes, {n_ids} tracks, {run_.frame_seconds.size} frames")
    print(
        f"predict+update: {run_.total_seconds:.3f} s total, {run_.median_ms:.3f} ms/frame median "
        f"(CPU: {run_.total_cpu_seconds:.3f} s, {run_.median_cpu_ms:.3f} ms/frame)"
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # pragma: no cover - convenience entry point
    parser = argparse.ArgumentParser(prog="edged mot")
    add_arguments(parser)
    return run(parser.parse_args(argv))
