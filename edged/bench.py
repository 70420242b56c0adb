"""`edged bench NAME [args]`: run one of the benchmark scripts in bench/ (results go to docs/), or the
built-in `compute` benchmark (works in any install): the configured detector and encoder on real frames,
ms per frame beside GMAC per frame, the device-independent cost."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from edged.config import PROJECT_ROOT

BENCH_DIR = PROJECT_ROOT / "bench"


# ---------------------------------------------------------------------------------------------- compute
@dataclass
class ComputeRun:
    """Frames through the daemon's own parts, built from a config as `edged run` builds them (detector
    part with or without motion gating, lazy or eager encoder, tracker, events engine), on one thread."""

    counters: Any  # edged.pipeline.PipelineCounters
    frames: int
    cpu_s: float  # process CPU time of the frames
    detector_macs: int  # of one call at the model's full input size
    encoder_macs: int  # per crop
    events: List[dict] = field(default_factory=list)
    mot_rows: List[List[float]] = field(default_factory=list)  # frame (1-based), id, x, y, w, h
    detections: Dict[int, np.ndarray] = field(default_factory=dict)  # frame index -> boxes, where the model ran

    @property
    def gmac_per_frame(self) -> Dict[str, float]:
        n = max(self.frames, 1)
        encoder = self.counters.encoded * self.encoder_macs / 1e9 / n
        total = self.counters.macs / 1e9 / n
        return {"detector": total - encoder, "encoder": encoder, "total": total}

    @property
    def ms_per_frame(self) -> float:
        return self.cpu_s * 1e3 / max(self.frames, 1)


def run_configured(cfg: Any, frames: Iterable[Tuple[int, np.ndarray]], fps: float,
                   config_path: Optional[str] = None) -> ComputeRun:
    """Run (index, BGR image) frames through the parts `cfg` selects; see ComputeRun."""
    from edged.events import EventEngine
    from edged.inference.yolo import YoloDetector
    from edged.pipeline import Pipeline
    from edged.service import frame_detector
    from edged.tracking.tracker import Tracker
    from edged.types import Detections, Frame, TrackerStep

    model = YoloDetector.from_config(cfg.detector, config_path)
    encoder = None
    if cfg.encoder.enabled and cfg.tracker.use_appearance:
        from edged.inference.encoder import AppearanceEncoder

        encoder = AppearanceEncoder.from_config(cfg.encoder, config_path)
    tracker = Tracker(cfg.tracker.resolved(getattr(encoder, "suggested_max_cosine_distance", None)))
    run = ComputeRun(None, 0, 0.0, model.macs, int(getattr(encoder, "macs", 0) or 0))

    class Sink:
        def emit(self, evs: List[dict], state: Optional[dict]) -> None:
            run.events.extend(evs)

    def observe(frame: Frame, step: TrackerStep, dets: Detections) -> None:
        if getattr(p.detector, "last_calls", 1):
            run.detections[frame.index] = dets.boxes.copy()
        for t in step.tracks:
            if t.time_since_update == 0:
                x1, y1, x2, y2 = (float(v) for v in t.box)
                run.mot_rows.append([frame.index + 1, t.track_id, x1, y1, x2 - x1, y2 - y1])

    def make_engine(frame: Frame, source_fps: Optional[float]) -> EventEngine:
        return EventEngine(cfg.events, device_id="bench", camera=cfg.capture.name, class_names=model.class_names,
                           frame_size=frame.size, fps=source_fps, track_classes=list(cfg.detector.classes))

    p = Pipeline(source=None, detector=frame_detector(model, cfg, lambda: p.track_view()), encoder=encoder,
                 encode_lazily=cfg.encoder.mode == "ambiguous", tracker=tracker, make_engine=make_engine,
                 sink=Sink(), source_fps=lambda: fps, observers=[observe])
    for i, image in frames:
        frame = Frame(image=image, index=i, timestamp=1_800_000_000.0 + i / fps, stream_time=i / fps)
        t0 = time.process_time()
        p.process(frame)
        run.cpu_s += time.process_time() - t0
        run.frames += 1
    p.finish()
    run.counters = p.counters
    return run


def _frames(source: str, limit: int) -> Iterator[Tuple[int, np.ndarray]]:
    if source == "demo":
        from edged.scene import Scene, default_scene

        for i, image, _ in Scene(default_scene(n_frames=limit)).frames():
            yield i, image
        return
    import cv2

    cap = cv2.VideoCapture(source)
    try:
        for i in range(limit):
            ok, frame = cap.read()
            if not ok:
                break
            yield i, frame
    finally:
        cap.release()


def _compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="edged config file (default: the built-in defaults)")
    p.add_argument("--source", default="demo", help="a video file, or 'demo' (the built-in demo scene; default)")
    p.add_argument("--frames", type=int, default=200, help="frames to run (default 200)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the source (default: the file's, 10 for demo)")
    p.add_argument("--model", help="detector model instead of detector.model (e.g. models/yolov3-tiny-320-int8.tflite)")
    p.add_argument("--no-encoder", action="store_true", help="detector only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set detector.motion.enabled=false")
    p.add_argument("--json", help="also write the results here as JSON")


def _compute(args: argparse.Namespace) -> int:
    from edged.config import ConfigError, deep_merge, load_config, parse_assignment

    if args.frames < 1:
        print("edged bench compute: --frames must be >= 1", file=sys.stderr)
        return 2
    try:
        overlay: Dict[str, Any] = {"mqtt": {"enabled": False}, "web": {"enabled": False}}
        if args.model:
            overlay = deep_merge(overlay, {"detector": {"model": args.model}})
        if args.no_encoder:
            overlay = deep_merge(overlay, {"encoder": {"enabled": False}})
        for item in args.set:
            overlay = deep_merge(overlay, parse_assignment(item))
        cfg = load_config(args.config, overlay)
    except ConfigError as exc:
        print(f"edged bench compute: {exc}", file=sys.stderr)
        return 78
    if args.source != "demo" and not Path(args.source).is_file():
        print(f"edged bench compute: --source {args.source}: no such video file", file=sys.stderr)
        return 66
    fps = args.fps or (10.0 if args.source == "demo" else _file_fps(args.source))
    run = run_configured(cfg, _frames(args.source, args.frames), fps, args.config)
    if not run.frames:
        print(f"edged bench compute: --source {args.source}: no frame could be read", file=sys.stderr)
        return 66
    c = run.counters
    gmac = run.gmac_per_frame
    motion = "motion-gated regions" if cfg.detector.motion.enabled else "every whole frame"
    result = {
        "source": args.source, "frames": run.frames, "detector_model": cfg.detector.model, "detection": motion,
        "threads": cfg.detector.threads, "backend": cfg.detector.backend, "encoder_mode": cfg.encoder.mode,
        "detector_calls": c.detector_calls, "encoder_crops": c.encoded,
        "ms_per_frame": {"total": run.ms_per_frame, "model": c.model_ms / run.frames},
        "gmac_per_frame": gmac, "load_average": list(os.getloadavg()),
    }
    print(f"{run.frames} frames of {args.source}, detector {Path(cfg.detector.model).name} ({motion}, "
          f"{cfg.detector.backend}, {cfg.detector.threads} threads), encoder "
          f"{'off' if not run.encoder_macs else cfg.encoder.mode}; one thread; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':10s} {'ms/frame':>9s} {'GMAC/frame':>11s}  count")
    print(f"{'detector':10s} {'':9s} {gmac['detector']:11.3f}  {c.detector_calls} calls "
          f"(at most {run.detector_macs / 1e9:.3f} GMAC each)")
    if run.encoder_macs:
        print(f"{'encoder':10s} {'':9s} {gmac['encoder']:11.3f}  {c.encoded} crops x {run.encoder_macs / 1e9:.4f} GMAC")
    print(f"{'models':10s} {c.model_ms / run.frames:9.1f}")
    print(f"{'total':10s} {run.ms_per_frame:9.1f} {gmac['total']:11.3f}  (whole pipeline CPU time per frame)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _file_fps(path: str) -> float:
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    return float(fps) if fps and 0 < fps < 1000 else 25.0


# name -> (add_arguments, run, help): benchmarks that ship with the package (bench/ is not installed).
BUILTIN = {"compute": (_compute_args, _compute,
                       "the configured detection and encoder on real frames: ms and GMAC per frame")}


# ---------------------------------------------------------------------------------------------- runner
def available() -> list:
    scripts = [p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py")]
    return sorted(set(scripts) | set(BUILTIN))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args: argparse.Namespace) -> int:
    names = available()
    if not args.name:
        print("benchmarks: " + ", ".join(names))
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.name in BUILTIN:
        add, fn, help_text = BUILTIN[args.name]
        parser = argparse.ArgumentParser(prog=f"edged bench {args.name}", description=help_text)
        add(parser)
        return fn(parser.parse_args(list(args.args)))
    script = BENCH_DIR / f"bench_{args.name}.py"
    sys.argv = [str(script)] + list(args.args)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
