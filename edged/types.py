"""Small typed records passed between stages (capture -> detect/encode -> track -> events -> MQTT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

# The one list of event record types (`type` of every record the events engine emits). The JSON
# schemas, the docs, the MQTT routing and Home Assistant discovery are checked against it.
EVENT_TYPES = ("enter", "exit", "position", "zone_enter", "zone_exit", "line_cross")
POSITION = "position"  # the one type published on the `tracks` topic; every other type goes to `events`


@dataclass
class Frame:
    image: np.ndarray  # H x W x 3 uint8, BGR (OpenCV order)
    index: int  # 0-based frame number from the source (file frame i = MOT gt frame i + 1)
    timestamp: float  # UTC wall-clock seconds when the frame was captured
    stream_time: float  # seconds into the stream (file position) or monotonic time for live sources

    @property
    def size(self) -> tuple:
        h, w = self.image.shape[:2]
        return w, h


@dataclass
class Detections:
    """One frame's detections; all arrays share the first dimension N."""

    boxes: np.ndarray  # (N, 4) float32 [x1, y1, x2, y2] in frame pixels
    scores: np.ndarray  # (N,) float32 in 0..1
    class_ids: np.ndarray  # (N,) int32
    features: Optional[np.ndarray] = None  # (N, D) float32, L2-normalised rows, or None
    frame_size: Optional[tuple] = None  # (w, h) of the frame, when known (lets tracks leave the frame)
    # Regions (R, 4) x1 y1 x2 y2 the detector looked at; None = the whole frame. A track whose region was
    # not looked at is not missed in this frame (motion-gated, region-based detection).
    examined: Optional[np.ndarray] = None
    # Lazy appearance: encode(indices) -> (k, D) features of those detections, called by the tracker for
    # the detections whose association needs appearance (None: `features` holds them all, or none).
    encode: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty(feature_dim: int = 0) -> "Detections":
        return Detections(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            class_ids=np.zeros((0,), np.int32),
            features=np.zeros((0, feature_dim), np.float32) if feature_dim else None,
        )

    def subset(self, keep: np.ndarray) -> "Detections":
        return Detections(
            self.boxes[keep], self.scores[keep], self.class_ids[keep],
            None if self.features is None else self.features[keep],
            self.frame_size, self.examined,  # `encode` refers to the full set's indices: not carried over
        )


@dataclass
class TrackSnapshot:
    """A track as the tracker sees it after one step."""

    track_id: int
    class_id: int
    box: np.ndarray  # (4,) float [x1, y1, x2, y2] Kalman estimate, frame pixels
    score: float  # score of the last matched detection
    velocity: np.ndarray  # (2,) box-centre velocity, pixels per frame
    hits: int  # total matched detections
    age: int  # frames since the track was created
    time_since_update: int  # 0 = matched in this frame
    feature: Optional[np.ndarray] = None  # (D,) mean/EMA appearance, L2-normalised, or None


@dataclass
class TrackerStep:
    """What one `Tracker.update` produced."""

    tracks: List[TrackSnapshot] = field(default_factory=list)  # confirmed, alive tracks
    confirmed: List[int] = field(default_factory=list)  # ids that became confirmed in this step
    deleted: List[TrackSnapshot] = field(default_factory=list)  # confirmed tracks removed in this step


@dataclass
class TrackView:
    """The live tracks as the tracking stage last saw them (shown to the inference stage)."""

    frame_index: int
    ids: np.ndarray  # (T,) int
    boxes: np.ndarray  # (T, 4) float, frame pixels, at frame_index
    velocities: np.ndarray  # (T, 2) box-centre pixels per frame
    confirmed: np.ndarray  # (T,) bool
    # (T, 4) where each track was last detected. A track not looked at for a while is predicted along
    # its velocities, size included; the region that refreshes it covers where it was seen too.
    seen: Optional[np.ndarray] = None

    @staticmethod
    def empty() -> "TrackView":
        return TrackView(-1, np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros((0, 2)), np.zeros(0, bool))

    def last_seen(self) -> np.ndarray:
        return self.boxes if self.seen is None else self.seen

    def at(self, frame_index: int) -> np.ndarray:
        """Boxes extrapolated to `frame_index` along their velocity."""
        if self.frame_index < 0 or not len(self.ids):
            return self.boxes
        dt = max(0, frame_index - self.frame_index)
        return self.boxes + np.tile(self.velocities, 2) * dt
