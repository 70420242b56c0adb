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
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from edged.config import PROJECT_ROOT

BENCH_DIR = PROJECT_ROOT / "bench"


# ---------------------------------------------------------------------------------------------- compute
@dataclass
class ComputeTally:
    """Multiply-accumulates executed, frame by frame: detector calls x detector MACs + encoder crops x
    encoder MACs per crop (`YoloDetector.macs`, `AppearanceEncoder.macs`)."""

    frames: int = 0
    detector_calls: int = 0
    encoder_crops: int = 0
    detector_macs: int = 0
    encoder_macs: int = 0
    per_frame_gmac: List[float] = field(default_factory=list)

    def add_frame(self, detector_calls: int, detector_macs: int, crops: int, encoder_macs: int) -> None:
        self.frames += 1
        self.detector_calls += detector_calls
        self.encoder_crops += crops
        d, e = detector_calls * detector_macs, crops * encoder_macs
        self.detector_macs += d
        self.encoder_macs += e
        self.per_frame_gmac.append((d + e) / 1e9)

    def gmac_per_frame(self) -> Dict[str, float]:
        n = max(self.frames, 1)
        return {"detector": self.detector_macs / 1e9 / n, "encoder": self.encoder_macs / 1e9 / n,
                "total": (self.detector_macs + self.encoder_macs) / 1e9 / n}


def _frames(source: str, limit: int) -> Iterator[np.ndarray]:
    if source == "demo":
        from edged.scene import Scene, default_scene

        for _, image, _ in Scene(default_scene(n_frames=limit)).frames():
            yield image
        return
    import cv2

    cap = cv2.VideoCapture(source)
    try:
        for _ in range(limit):
            ok, frame = cap.read()
            if not ok:
                break
            yield frame
    finally:
        cap.release()


def _compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="edged config file (default: the built-in defaults)")
    p.add_argument("--source", default="demo", help="a video file, or 'demo' (the built-in demo scene; default)")
    p.add_argument("--frames", type=int, default=200, help="frames to run (default 200)")
    p.add_argument("--model", help="detector model instead of detector.model (e.g. models/yolov3-tiny-320-int8.tflite)")
    p.add_argument("--no-encoder", action="store_true", help="detector only")
    p.add_argument("--json", help="also write the results here as JSON")


def _compute(args: argparse.Namespace) -> int:
    from edged.config import ConfigError, load_config
    from edged.inference.yolo import YoloDetector

    if args.frames < 1:
        print("edged bench compute: --frames must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, {"detector": {"model": args.model}} if args.model else None)
    except ConfigError as exc:
        print(f"edged bench compute: {exc}", file=sys.stderr)
        return 78
    detector = YoloDetector.from_config(cfg.detector, args.config)
    encoder: Optional[Any] = None
    if not args.no_encoder and cfg.encoder.enabled and cfg.tracker.use_appearance:
        from edged.inference.encoder import AppearanceEncoder

        encoder = AppearanceEncoder.from_config(cfg.encoder, args.config)
    if args.source != "demo" and not Path(args.source).is_file():
        print(f"edged bench compute: --source {args.source}: no such video file", file=sys.stderr)
        return 66
    tally = ComputeTally()
    detect_ms: List[float] = []
    encode_ms: List[float] = []
    for frame in _frames(args.source, args.frames):
        t0 = time.perf_counter()
        dets = detector.detect(frame)
        t1 = time.perf_counter()
        crops = 0
        if encoder is not None and len(dets):
            encoder.encode(frame, dets.boxes)
            crops = len(dets)
        t2 = time.perf_counter()
        detect_ms.append((t1 - t0) * 1e3)
        encode_ms.append((t2 - t1) * 1e3)
        tally.add_frame(1, detector.macs, crops, encoder.macs if encoder is not None else 0)
    if not tally.frames:
        print(f"edged bench compute: --source {args.source}: no frame could be read", file=sys.stderr)
        return 66
    gmac = tally.gmac_per_frame()
    ms = {"detector": float(np.mean(detect_ms)), "encoder": float(np.mean(encode_ms))}
    ms["total"] = ms["detector"] + ms["encoder"]
    result = {
        "source": args.source, "frames": tally.frames, "detector_model": str(detector.model_path),
        "threads": cfg.detector.threads, "backend": cfg.detector.backend,
        "detector_calls": tally.detector_calls, "encoder_crops": tally.encoder_crops,
        "ms_per_frame": ms, "gmac_per_frame": gmac, "load_average": list(os.getloadavg()),
    }
    print(f"{tally.frames} frames of {args.source}, detector {detector.model_path.name} "
          f"({detector.net_w}x{detector.net_h}, {cfg.detector.backend}, {cfg.detector.threads} threads), "
          f"encoder {'off' if encoder is None else Path(encoder.model_path).name}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':10s} {'ms/frame':>9s} {'GMAC/frame':>11s}  count")
    print(f"{'detector':10s} {ms['detector']:9.1f} {gmac['detector']:11.3f}  {tally.detector_calls} calls x {detector.macs / 1e9:.3f} GMAC")
    if encoder is not None:
        print(f"{'encoder':10s} {ms['encoder']:9.1f} {gmac['encoder']:11.3f}  {tally.encoder_crops} crops x {encoder.macs / 1e9:.4f} GMAC")
    print(f"{'total':10s} {ms['total']:9.1f} {gmac['total']:11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# name -> (add_arguments, run, help): benchmarks that ship with the package (bench/ is not installed).
BUILTIN = {"compute": (_compute_args, _compute, "detector + encoder on real frames: ms and GMAC per frame")}


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
