"""`edged replay`: the real daemon fed from recorded detections instead of a camera and models.

Everything after detection is the production code path: the tracker, the events engine, the outbox,
the MQTT publisher, remote configuration, the supervisor. Frames carry no pixels (a zero-strided array
of the sequence's size: no memory, no decoding) and the detector plays back a MOTChallenge detection
file (det.txt, or a DeepSORT .npy with appearance features) by frame index. A replayed device costs a
millisecond or two of CPU per frame, so a fleet of hundreds fits on one small machine.

    edged replay --config device.yaml --detections MOT15/TUD-Stadtmitte/det/det.txt --loop --fps 5
"""

from __future__ import annotations

import argparse
import configparser
import logging
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edged.types import Detections, Frame

log = logging.getLogger("edged.replay")


# ---------------------------------------------------------------------------------------------- parts
class RecordedDetector:
    """Detections by frame index (0-based frame i = MOT frame i + 1), filtered like the model's output:
    score threshold and, with `classes`, only those class ids."""

    def __init__(self, by_frame: Dict[int, Detections], class_names: Sequence[str], *, score_threshold: float = 0.0):
        self.by_frame = by_frame
        self.class_names = list(class_names)
        self.score_threshold = score_threshold
        self.last_calls = 0  # no model runs
        self.macs_per_call = 0

    @classmethod
    def from_mot(cls, path: Union[str, Path], class_names: Sequence[str], *, class_id: int = 0,
                 score_threshold: float = 0.0) -> "RecordedDetector":
        from edged.tracking.motio import iter_frames, load_detections

        rows = load_detections(path)
        by_frame = {}
        for frame, dets in iter_frames(rows, first=1):
            dets.class_ids[:] = class_id
            by_frame[frame - 1] = dets
        return cls(by_frame, class_names, score_threshold=score_threshold)

    @property
    def n_frames(self) -> int:
        return max(self.by_frame) + 1 if self.by_frame else 0

    def configure(self, *, score_threshold: Optional[float] = None, **_other) -> None:
        """detector.score_threshold changes live, as with the model (the other keys mean nothing here)."""
        if score_threshold is not None:
            self.score_threshold = float(score_threshold)

    def detect_frame(self, frame: Frame) -> Detections:
        d = self.by_frame.get(frame.index % max(1, self.n_frames))
        if d is None or not len(d):
            return Detections.empty()
        keep = d.scores >= self.score_threshold
        return d.subset(np.flatnonzero(keep))


class ReplayCapture:
    """Frames without pixels at the sequence's size, paced at `fps` in real time (or as fast as the
    pipeline takes them); quacks like edged.capture.CaptureThread for the daemon."""

    live = False

    def __init__(self, n_frames: int, size: Tuple[int, int], fps: float, *, loop: bool = False,
                 realtime: bool = True, description: str = "replay"):
        if n_frames < 1:
            raise ValueError("replay: the detection file has no frames")
        w, h = size
        self.n_frames, self.fps, self.loop, self.realtime = n_frames, float(fps), loop, realtime
        self._image = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (h, w, 3))
        self.ended = threading.Event()
        self.failed: Optional[str] = None
        self._stop = threading.Event()
        self._index = 0
        self._t0 = 0.0
        self.source = self  # the daemon shows `capture.source.description`
        self.description = description

    def start(self) -> "ReplayCapture":
        self._t0 = time.monotonic()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        self._stop.set()
        return True

    def get(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self.ended.is_set() or self._stop.is_set():
            return None
        if not self.loop and self._index >= self.n_frames:
            self.ended.set()
            return None
        if self.realtime:
            delay = self._t0 + self._index / self.fps - time.monotonic()
            if delay > 0:
                wait = delay if timeout is None else min(delay, timeout)
                if self._stop.wait(wait) or wait < delay:
                    return None  # stopped, or the frame is not due within `timeout`
        i = self._index
        self._index += 1
        return Frame(image=self._image, index=i, timestamp=time.time(), stream_time=i / self.fps)

    def stats(self) -> dict:
        return {"state": "ended" if self.ended.is_set() else "ok", "source": self.description, "live": False,
                "captured": self._index, "delivered": self._index, "dropped": 0, "skipped": 0, "reconnects": 0,
                "fps": self.fps, "last_error": None, "last_index": self._index - 1}


def sequence_info(detections: Union[str, Path]) -> Dict[str, float]:
    """Frame size, rate and length from the MOTChallenge seqinfo.ini next to det/ (when there is one)."""
    det = Path(detections)
    for candidate in (det.parent.parent / "seqinfo.ini", det.parent / "seqinfo.ini"):
        if candidate.is_file():
            cp = configparser.ConfigParser()
            cp.read(candidate)
            s = cp["Sequence"]
            return {"width": int(s["imWidth"]), "height": int(s["imHeight"]), "fps": float(s["frameRate"]),
                    "length": int(s["seqLength"])}
    return {}


# ---------------------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (MQTT, events, tracker...; capture and models are not used)")
    p.add_argument("--detections", required=True, metavar="FILE",
                   help="MOTChallenge det.txt (or a DeepSORT .npy with appearance features)")
    p.add_argument("--size", metavar="WxH", help="frame size (default: seqinfo.ini next to det/, else 640x480)")
    p.add_argument("--fps", type=float, help="frames per second (default: seqinfo.ini, else 25)")
    p.add_argument("--loop", action="store_true", help="start over at the end (track ids keep increasing)")
    p.add_argument("--as-fast-as-possible", action="store_true", help="do not pace frames in real time")
    p.add_argument("--class-name", default="person", help="class of the recorded detections (default person)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = no limit)")
    p.add_argument("--print-events", action="store_true", help="print every event as a JSON line on stdout")
    p.add_argument("--mot-out", help="write confirmed tracks per frame in MOTChallenge format to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")


def run(args: argparse.Namespace) -> int:
    from edged.service import run as run_daemon

    args.replay = args
    args.source = None
    args.no_mqtt = False
    args.state_dir = None
    return run_daemon(args)


def build_replay(args: argparse.Namespace, cfg) -> Tuple[RecordedDetector, ReplayCapture]:
    """The detector and the frame source of a replay run (called by the daemon when it builds parts)."""
    from edged.inference import runtime
    from edged.config import resolve_path

    info = sequence_info(args.detections)
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size: expected WxH, got {args.size!r}") from None
    else:
        w, h = int(info.get("width", 640)), int(info.get("height", 480))
    fps = float(args.fps or info.get("fps", 25.0))
    meta = runtime.read_metadata(resolve_path(cfg.detector.model)) or {}
    class_names: List[str] = list(meta.get("classes") or [args.class_name])
    if args.class_name not in class_names:
        raise ValueError(f"--class-name: {args.class_name!r} is not a class of {cfg.detector.model}")
    detector = RecordedDetector.from_mot(args.detections, class_names, class_id=class_names.index(args.class_name),
                                         score_threshold=cfg.detector.score_threshold)
    n = max(detector.n_frames, int(info.get("length", 0)))
    capture = ReplayCapture(n, (w, h), fps, loop=args.loop, realtime=not args.as_fast_as_possible,
                            description=f"replay {Path(args.detections).name} ({n} frames, {w}x{h} @ {fps:g} fps)")
    log.info("replay: %s", capture.description)
    return detector, capture
