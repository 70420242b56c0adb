"""Track lifecycle -> event records (enter, exit, position, zone_enter, zone_exit, line_cross).

`EventEngine.process` takes one `TrackerStep` per frame and returns JSON-ready dicts; the MQTT layer
publishes `position` records on the `tracks` topic and every other type on `events`. The record
format is described in docs/events.md and by edged/mqtt/schemas/{event,position}.schema.json.

Design notes:
- Per-track state that zone/line/position tests need lives in numpy arrays indexed by a *slot*
  (one row per live entered track), so the tests run as a few numpy expressions over all tracks.
- Zones, lines and movement-triggered positions use *observed* positions only (steps where the
  track was matched, `time_since_update == 0`): a coasting (predicted-only) track cannot cross a
  line or enter a zone on a guess. It still sends position heartbeats.
- Lifecycle guarantees: an `exit` is only ever emitted for a track that got an `enter`; a track
  gets one `enter` per lifetime; zone_exit only for a zone the track is in; `shutdown()` exits
  every entered track. Tracker inconsistencies are absorbed, not propagated: an entered track that
  disappears from the tracker output without being reported deleted gets an `exit` (reason lost).
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from edged import geometry
from edged.config import IDENT_RE, EventsConfig
from edged.types import TrackerStep, TrackSnapshot

EXIT_REASONS = ("lost", "left_frame", "shutdown")
ZONE_EXIT_REASONS = ("left_zone", "track_exit", "shutdown", "config_changed", "class_changed")
DIRECTION_NAMES = {geometry.LEFT_TO_RIGHT: "left_to_right", geometry.RIGHT_TO_LEFT: "right_to_left"}
# "in" = crossing from the left to the right side of the directed line p1 -> p2 (see docs/events.md).
IN_OUT = {geometry.LEFT_TO_RIGHT: "in", geometry.RIGHT_TO_LEFT: "out"}
EMBEDDING_ENCODING = "int8-base64"


# ---------------------------------------------------------------------------------------------- helpers
def iso_utc(timestamp: float) -> str:
    """UTC ISO-8601 with milliseconds and 'Z', e.g. 2026-11-26T01:02:03.456Z."""
    ms = int(round(timestamp * 1000.0))
    dt = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return f"{dt.strftime('%Y-%m-%dT%H:%M:%S')}.{ms % 1000:03d}Z"


def encode_embedding(vector: np.ndarray) -> dict:
    """Compact int8 encoding of an appearance vector: q = round(v / scale), scale = max|v| / 127.

    Decode with `decode_embedding` or: np.frombuffer(base64.b64decode(data), np.int8) * scale.
    The error per component is at most scale / 2 (~0.4 % of the largest component).
    """
    v = np.asarray(vector, dtype=np.float32).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("embedding must be a non-empty finite vector")
    peak = float(np.max(np.abs(v)))
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
    return {
        "encoding": EMBEDDING_ENCODING,
        "dim": int(v.size),
        "scale": float(np.float32(scale)),
        "data": base64.b64encode(q.tobytes()).decode("ascii"),
    }


def decode_embedding(payload: dict) -> np.ndarray:
    """Inverse of `encode_embedding` (float32 vector)."""
    if payload.get("encoding") != EMBEDDING_ENCODING:
        raise ValueError(f"embedding: unknown encoding {payload.get('encoding')!r}, expected {EMBEDDING_ENCODING}")
    q = np.frombuffer(base64.b64decode(payload["data"]), dtype=np.int8)
    if q.size != int(payload["dim"]):
        raise ValueError(f"embedding: data holds {q.size} values, dim says {payload['dim']}")
    return q.astype(np.float32) * np.float32(payload["scale"])


@dataclass
class _Frame:
    index: int
    ts: str
    stream_time: float  # as given (reported in records)
    clock: float  # engine-internal monotonic seconds: durations survive a stream_time reset (looped file)


class _Track:
    """Per-track values fixed at enter; everything that changes lives in the engine's slot arrays."""

    __slots__ = ("track_id", "slot", "enter_time", "first_point")

    def __init__(self, track_id: int, slot: int, enter_time: float, first_point: Tuple[float, float]):
        self.track_id = track_id
        self.slot = slot
        self.enter_time = enter_time
        self.first_point = first_point


class _Geometry:
    """Zones and lines of one EventsConfig, packed for vectorised tests."""

    def __init__(self, cfg: EventsConfig, class_names: Sequence[str]):
        self.zone_names = [z.name for z in cfg.zones]
        self.zone_defs = {z.name: z for z in cfg.zones}
        self.polygons = geometry.pack_polygons([np.asarray(z.polygon, np.float64) for z in cfg.zones])
        self.polygons_prev = np.roll(self.polygons, 1, axis=1)
        self.line_names = [ln.name for ln in cfg.lines]
        self.line_defs = {ln.name: ln for ln in cfg.lines}
        self.line_a = np.array([ln.points[0] for ln in cfg.lines], np.float64).reshape(-1, 2)
        self.line_b = np.array([ln.points[1] for ln in cfg.lines], np.float64).reshape(-1, 2)
        # Class filters as lookup tables: row = class id, last row = ids outside class_names.
        self.zone_allowed = self._allowed([z.classes for z in cfg.zones], class_names)
        self.line_allowed = self._allowed([ln.classes for ln in cfg.lines], class_names)

    @staticmethod
    def _allowed(filters: List[List[str]], class_names: Sequence[str]) -> np.ndarray:
        table = np.ones((len(class_names) + 1, len(filters)), bool)
        for j, names in enumerate(filters):
            if names:
                wanted = set(names)
                table[:, j] = [n in wanted for n in class_names] + [False]
        return table


def _check_frame_size(frame_size: Tuple[int, int]) -> Tuple[int, int]:
    try:
        w, h = (int(frame_size[0]), int(frame_size[1]))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"frame_size must be (width, height), got {frame_size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"frame_size must be positive (width, height), got {frame_size!r}")
    return w, h


# ---------------------------------------------------------------------------------------------- engine
class EventEngine:
    """Turns tracker steps into event records. Not thread-safe: call from the tracking thread."""

    def __init__(
        self,
        cfg: EventsConfig,
        *,
        device_id: str,
        camera: str,
        class_names: Sequence[str],
        frame_size: Tuple[int, int],
        fps: Optional[float] = None,
        next_seq: Optional[Callable[[], int]] = None,
        track_classes: Optional[Sequence[str]] = None,
    ):
        if fps is not None and not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        self.device_id = device_id
        self.camera = camera
        self.class_names = [str(n) for n in class_names]
        self.track_classes = list(track_classes or [])
        self._fps = float(fps) if fps is not None else None
        self._dt_estimate: Optional[float] = None  # measured processed-frame interval
        self._intervals: Deque[float] = deque(maxlen=15)
        self._last_stream_time: Optional[float] = None
        self._next_seq = next_seq or itertools.count(1).__next__
        self._ts_cache: Tuple[Optional[float], str] = (None, "")
        self._last_frame = _Frame(0, iso_utc(time.time()), 0.0, 0.0)
        self.set_frame_size(frame_size)
        self.cfg = cfg
        self._geo = _Geometry(cfg, self.class_names)
        self._tracks: Dict[int, _Track] = {}
        self._free: List[int] = []
        self._cap = 0
        self._alloc_tables(16)
        self._zone_count = np.zeros(len(self._geo.zone_names), np.int64)
        self.state_version = 0  # bumped whenever state() would change; publish `state` on change

    # ------------------------------------------------------------------ configuration
    def set_frame_size(self, frame_size: Tuple[int, int]) -> None:
        """Frame size in pixels (w, h). Stored positions are normalised, so a change keeps state."""
        self.width, self.height = _check_frame_size(frame_size)
        self._wh = np.array([self.width, self.height], np.float64)
        self._wh4 = np.tile(self._wh, 2)
        self._diag = math.hypot(self.width, self.height)

    def set_camera(self, name: str) -> None:
        """capture.name changed live: records from now on (and `state`) carry `name`. Live tracks, zone
        memberships and line states stay: the engine follows one camera whatever it is called."""
        if not isinstance(name, str) or not re.fullmatch(IDENT_RE, name):
            raise ValueError(f"capture.name must match {IDENT_RE}, got {name!r}")
        if name != self.camera:
            self.camera = name
            self.state_version += 1

    def set_track_classes(self, classes: Sequence[str]) -> None:
        """detector.classes changed live: the classes `state` always lists (0 when none is live; []
        = none listed up front). Entered tracks stay, and are counted under their class as before: a
        track of a class no longer detected exits the usual way, when the tracker deletes it."""
        classes = [str(c) for c in classes]
        unknown = [c for c in classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"detector.classes {unknown} are not in the model's {len(self.class_names)} classes")
        if classes != self.track_classes:
            self.track_classes = classes
            self.state_version += 1

    def set_config(
        self,
        cfg: EventsConfig,
        *,
        frame_index: Optional[int] = None,
        timestamp: Optional[float] = None,
        stream_time: Optional[float] = None,
    ) -> List[dict]:
        """Apply a new EventsConfig. Zones and lines are matched by name.

        - A removed zone: every track inside gets `zone_exit` (reason config_changed), returned here.
        - A zone whose class filter no longer admits a track inside it: same.
        - A zone whose polygon changed keeps its occupants; they are re-tested at their next observed
          update (a plain zone_exit / zone_enter follows if they are now outside / inside).
        - A new zone is empty; tracks inside it get zone_enter at their next observed update.
        - A removed or moved line forgets its side state (no crossing can be completed across a
          configuration change); a line whose only change is its class filter keeps it.
        Frame fields of the returned events default to the last processed frame; ts to now.
        """
        frame = self._frame(frame_index, timestamp, stream_time)
        old, new = self._geo, _Geometry(cfg, self.class_names)
        events: List[dict] = []
        live = list(self._tracks.values())
        # Zones that go away (or stop admitting a track) close their occupancy first.
        for z_old, name in enumerate(old.zone_names):
            z_new = new.zone_names.index(name) if name in new.zone_defs else None
            for tr in live:
                if not self._inside[tr.slot, z_old]:
                    continue
                if z_new is None or not new.zone_allowed[self._class_row(int(self._cls[tr.slot])), z_new]:
                    self._inside[tr.slot, z_old] = False
                    self._zone_count[z_old] -= 1
                    events.append(self._zone_exit_record(tr, z_old, "config_changed", frame, old))
        # Re-index the per-slot tables to the new zone / line order.
        cap = self._cap
        inside = np.zeros((cap, len(new.zone_names)), bool)
        since = np.zeros((cap, len(new.zone_names)), np.float64)
        count = np.zeros(len(new.zone_names), np.int64)
        for z_new, name in enumerate(new.zone_names):
            if name in old.zone_defs:
                z_old = old.zone_names.index(name)
                inside[:, z_new] = self._inside[:, z_old]
                since[:, z_new] = self._zone_since[:, z_old]
                count[z_new] = self._zone_count[z_old]
        side = np.zeros((cap, len(new.line_names)), np.int8)
        pending = np.zeros((cap, len(new.line_names)), bool)
        for l_new, name in enumerate(new.line_names):
            old_def = old.line_defs.get(name)
            if old_def is not None and old_def.points == new.line_defs[name].points:
                l_old = old.line_names.index(name)
                side[:, l_new] = self._side[:, l_old]
                pending[:, l_new] = self._pending[:, l_old]
        self._inside, self._zone_since, self._zone_count = inside, since, count
        self._side, self._pending = side, pending
        self._geo, self.cfg = new, cfg
        if events or old.zone_names != new.zone_names:
            self.state_version += 1
        return events

    # ------------------------------------------------------------------ per-frame
    def process(self, step: TrackerStep, *, frame_index: int, timestamp: float, stream_time: float) -> List[dict]:
        """Events for one tracker step, in emission order (seq increasing)."""
        frame = self._frame(frame_index, timestamp, stream_time)
        self._update_rate(frame.stream_time)
        events: List[dict] = []
        alive = step.tracks
        ids = [int(t.track_id) for t in alive]
        alive_set = set(ids)
        if len(alive_set) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"TrackerStep.tracks lists track ids more than once: {dup}")
        counts_changed = False

        # 1. Ends of life: reported deletions, then entered tracks the tracker silently dropped.
        deleted_ids = set()
        for snap in step.deleted:
            tid = int(snap.track_id)
            deleted_ids.add(tid)
            tr = self._tracks.get(tid)
            if tr is not None and tid not in alive_set:
                events += self._end_track(tr, snap, self._exit_reason(tr, snap), frame)
                counts_changed = True
        for tid in [t for t in self._tracks if t not in alive_set and t not in deleted_ids]:
            events += self._end_track(self._tracks[tid], None, "lost", frame)
            counts_changed = True
        n = len(alive)
        if n == 0:
            if counts_changed:
                self.state_version += 1
            return events

        # 2. Per-step arrays over all live tracks (one list comprehension per attribute).
        boxes = np.array([t.box for t in alive], np.float64).reshape(n, 4)
        finite = np.isfinite(boxes).all(axis=1)
        if not finite.all():
            raise ValueError(f"TrackerStep.tracks: non-finite box for track ids {[ids[i] for i in np.nonzero(~finite)[0]]}")
        vels = np.array([t.velocity for t in alive], np.float64).reshape(n, 2)
        vels[~np.isfinite(vels)] = 0.0
        tsu = np.array([t.time_since_update for t in alive], np.int64)
        matched = tsu == 0
        class_ids = np.array([t.class_id for t in alive], np.int64)
        scores = np.array([t.score for t in alive], np.float64)
        boxes_norm = boxes / self._wh4
        points = np.stack([(boxes_norm[:, 0] + boxes_norm[:, 2]) * 0.5, boxes_norm[:, 3]], axis=1)
        rows = _Rows(self, boxes_norm, vels, scores, class_ids, tsu)

        # 3. Enters: any live track not yet entered (normally exactly the ids in step.confirmed).
        tracks: List[_Track] = []
        for i, tid in enumerate(ids):
            tr = self._tracks.get(tid)
            if tr is None:
                tr = self._tracks[tid] = _Track(tid, self._alloc_slot(), frame.clock, rows.point(i))
                s = tr.slot
                self._rep_point[s] = points[i]
                self._rep_time[s] = frame.clock
                self._box[s], self._vel[s], self._score[s], self._cls[s] = boxes_norm[i], vels[i], scores[i], class_ids[i]
                self._tsu[s] = tsu[i]
                self._feature[s] = alive[i].feature
                events.append(self._record("enter", tr, frame, rows, i))
                counts_changed = True
            tracks.append(tr)
        slots = np.fromiter((tr.slot for tr in tracks), np.int64, n)

        # 4. Remember the last observation of matched tracks (exits report where a track was last seen).
        obs = np.nonzero(matched)[0]
        s_obs = slots[obs]
        if (self._cls[s_obs] != class_ids[obs]).any():
            counts_changed = True
        self._box[s_obs] = boxes_norm[obs]
        self._vel[s_obs] = vels[obs]
        self._score[s_obs] = scores[obs]
        self._cls[s_obs] = class_ids[obs]
        self._tsu[slots] = tsu
        for i in obs:
            feature = alive[i].feature
            if feature is not None:
                self._feature[slots[i]] = feature

        # 5. Lines and zones on observed positions.
        if len(obs):
            class_rows = np.where((class_ids >= 0) & (class_ids < len(self.class_names)), class_ids, len(self.class_names))
            if len(self._geo.line_names):
                events += self._lines(obs, slots, class_rows, points, tracks, frame, rows)
            if len(self._geo.zone_names):
                zone_events = self._zones(obs, slots, class_rows, points, tracks, frame, rows)
                counts_changed |= bool(zone_events)
                events += zone_events
            self._obs_point[s_obs] = points[obs]
            self._has_obs[s_obs] = True

        # 6. Positions: moved enough (observed) and not too soon, or heartbeat.
        delta = (points - self._rep_point[slots]) * self._wh
        moved = np.hypot(delta[:, 0], delta[:, 1]) > self.cfg.position_min_move * self._diag
        waited = frame.clock - self._rep_time[slots]
        due = (matched & moved & (waited >= self.cfg.position_min_interval_s)) | (waited >= self.cfg.position_interval_s)
        for i in np.nonzero(due)[0]:
            events.append(self._record("position", tracks[i], frame, rows, i))
        due_slots = slots[due]
        self._rep_point[due_slots] = points[due]
        self._rep_time[due_slots] = frame.clock

        if counts_changed:
            self.state_version += 1
        return events

    def shutdown(self, *, frame_index: int, timestamp: float, stream_time: float,
                 tracks: Iterable[TrackSnapshot] = ()) -> List[dict]:
        """zone_exit + exit (reason shutdown) for every entered live track; the engine is empty after.

        `tracks` (the tracker's current snapshots, optional) refresh the last observation first."""
        frame = self._frame(frame_index, timestamp, stream_time)
        by_id = {int(t.track_id): t for t in tracks}
        events: List[dict] = []
        for tid in list(self._tracks):
            tr = self._tracks[tid]
            snap = by_id.get(tid)
            if snap is not None and snap.time_since_update == 0 and np.all(np.isfinite(snap.box)):
                s = tr.slot
                self._box[s] = np.asarray(snap.box, np.float64) / self._wh4
                vel = np.asarray(snap.velocity, np.float64)
                self._vel[s] = np.where(np.isfinite(vel), vel, 0.0)
                self._score[s] = float(snap.score)
                self._cls[s] = int(snap.class_id)
            events += self._end_track(tr, snap, "shutdown", frame)
        if events:
            self.state_version += 1
        return events

    # ------------------------------------------------------------------ state
    def live_track_ids(self) -> List[int]:
        """Ids of tracks that got an enter and no exit yet."""
        return list(self._tracks)

    def state(self) -> dict:
        """Retained `state` payload body: live entered tracks per class, and per zone (per class)."""
        classes: Dict[str, int] = {name: 0 for name in self.track_classes}
        names = {}
        for tr in self._tracks.values():
            name = names[tr.slot] = self._class_name(int(self._cls[tr.slot]))
            classes[name] = classes.get(name, 0) + 1
        zones = {}
        for z, zname in enumerate(self._geo.zone_names):
            zdef = self._geo.zone_defs[zname]
            per_class: Dict[str, int] = {name: 0 for name in (zdef.classes or self.track_classes)}
            total = 0
            for tr in self._tracks.values():
                if self._inside[tr.slot, z]:
                    per_class[names[tr.slot]] = per_class.get(names[tr.slot], 0) + 1
                    total += 1
            zones[zname] = {"total": total, "classes": per_class}
        return {
            "ts": self._last_frame.ts,
            "frame": self._last_frame.index,
            "device": self.device_id,
            "camera": self.camera,
            "total": len(self._tracks),
            "classes": classes,
            "zones": zones,
        }

    # ------------------------------------------------------------------ internals
    def _frame(self, frame_index: Optional[int], timestamp: Optional[float], stream_time: Optional[float]) -> _Frame:
        last = self._last_frame
        if timestamp is not None and not math.isfinite(timestamp):
            raise ValueError(f"timestamp must be finite UTC epoch seconds, got {timestamp!r}")
        if stream_time is not None and not math.isfinite(stream_time):
            raise ValueError(f"stream_time must be finite seconds, got {stream_time!r}")
        ts = timestamp if timestamp is not None else time.time()
        if self._ts_cache[0] != ts:
            self._ts_cache = (ts, iso_utc(ts))
        st = float(stream_time) if stream_time is not None else last.stream_time
        dt = st - last.stream_time if self._last_stream_time is not None else 0.0
        if dt < 0:  # the stream restarted (looped file, reopened source): continue at the frame rate
            dt = self._dt_estimate or 0.0
        frame = _Frame(int(frame_index) if frame_index is not None else last.index, self._ts_cache[1], st, last.clock + dt)
        self._last_frame = frame
        return frame

    def _update_rate(self, stream_time: float) -> None:
        if self._last_stream_time is not None:
            dt = stream_time - self._last_stream_time
            if dt > 0:
                # Median of recent processed-frame intervals: robust to a reconnect gap or a stall.
                self._intervals.append(dt)
                self._dt_estimate = statistics.median(self._intervals)
        self._last_stream_time = stream_time

    def _frames_per_second(self) -> Optional[float]:
        """Processed frames per second: measured (frames may be skipped on live sources, and the
        tracker's velocity is per processed frame), the source's fps until two frames were seen."""
        return 1.0 / self._dt_estimate if self._dt_estimate else self._fps

    def _class_row(self, class_id: int) -> int:
        return class_id if 0 <= class_id < len(self.class_names) else len(self.class_names)

    def _class_name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else f"class_{class_id}"

    def _alloc_tables(self, cap: int) -> None:
        """(Re)allocate the per-slot arrays with `cap` rows, keeping existing rows."""
        nz, nl = len(self._geo.zone_names), len(self._geo.line_names)
        specs = {
            "_inside": ((nz,), bool), "_zone_since": ((nz,), np.float64),  # zone membership, since when
            "_side": ((nl,), np.int8), "_pending": ((nl,), bool),  # line hysteresis state
            "_obs_point": ((2,), np.float64), "_has_obs": ((), bool),  # last observed feet (lines)
            "_rep_point": ((2,), np.float64), "_rep_time": ((), np.float64),  # last reported position
            "_box": ((4,), np.float64), "_vel": ((2,), np.float64), "_score": ((), np.float64),
            "_cls": ((), np.int64), "_tsu": ((), np.int64),  # last observation (normalised box)
        }
        for name, (shape, dtype) in specs.items():
            new = np.zeros((cap,) + shape, dtype)
            if self._cap:
                new[: self._cap] = getattr(self, name)
            setattr(self, name, new)
        self._feature: List[Optional[np.ndarray]] = (getattr(self, "_feature", []) + [None] * cap)[:cap]
        self._free.extend(range(cap - 1, self._cap - 1, -1))
        self._cap = cap

    def _alloc_slot(self) -> int:
        if not self._free:
            self._alloc_tables(self._cap * 2)
        slot = self._free.pop()
        self._inside[slot] = False
        self._side[slot] = 0
        self._pending[slot] = False
        self._has_obs[slot] = False
        return slot

    def _exit_reason(self, tr: _Track, snap: TrackSnapshot) -> str:
        m = self.cfg.edge_margin
        x1, y1, x2, y2 = self._box[tr.slot]
        if x1 <= m or y1 <= m or x2 >= 1.0 - m or y2 >= 1.0 - m:
            return "left_frame"
        # Where it was heading: the last observed centre one step ahead, and the tracker's own
        # coasted estimate at deletion time.
        vx, vy = self._vel[tr.slot] / self._wh
        centres = [((x1 + x2) * 0.5 + vx, (y1 + y2) * 0.5 + vy)]
        if snap is not None and np.all(np.isfinite(snap.box)):
            b = np.asarray(snap.box, np.float64) / self._wh4
            centres.append(((b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5))
        for x, y in centres:
            if not (0.0 <= x < 1.0 and 0.0 <= y < 1.0):
                return "left_frame"
        return "lost"

    def _end_track(self, tr: _Track, snap: Optional[TrackSnapshot], reason: str, frame: _Frame) -> List[dict]:
        events = []
        s = tr.slot
        zone_reason = "shutdown" if reason == "shutdown" else "track_exit"
        if snap is not None:
            self._tsu[s] = int(snap.time_since_update)
            if snap.feature is not None:
                self._feature[s] = snap.feature
        for z in np.nonzero(self._inside[s])[0]:
            self._inside[s, z] = False
            self._zone_count[z] -= 1
            events.append(self._zone_exit_record(tr, int(z), zone_reason, frame))
        rows = self._slot_rows(s)
        rec = self._record("exit", tr, frame, rows, 0)
        rec["reason"] = reason
        rec["duration_s"] = round(max(0.0, frame.clock - tr.enter_time), 3)
        rec["first_position"] = list(tr.first_point)
        rec["last_position"] = list(rows.point(0))
        feature = self._feature[s]
        if self.cfg.include_embedding and feature is not None:
            feature = np.asarray(feature, np.float32)
            if feature.size and np.all(np.isfinite(feature)):
                rec["embedding"] = encode_embedding(feature)
        events.append(rec)
        del self._tracks[tr.track_id]
        self._feature[s] = None
        self._free.append(s)
        return events

    def _lines(self, obs, slots, class_rows, points, tracks, frame, rows) -> List[dict]:
        geo = self._geo
        s = slots[obs]
        cur = points[obs] * self._wh
        prev = self._obs_point[s] * self._wh
        a, b = geo.line_a * self._wh, geo.line_b * self._wh
        dist = geometry.signed_distance(cur, a, b) / self._diag
        hit = geometry.segments_intersect(prev, cur, a, b) & self._has_obs[s][:, None]
        pending = self._pending[s] | hit
        side = self._side[s]
        firm = np.abs(dist) > self.cfg.line_hysteresis
        new_side = np.where(firm, np.sign(dist), 0).astype(np.int8)
        # Hysteresis: a crossing completes only when the point is firmly on the side opposite to the
        # last firm side and the path went through the line segment since then.
        crossed = firm & (side != 0) & (new_side != side) & pending & geo.line_allowed[class_rows[obs]]
        self._side[s] = np.where(firm, new_side, side)
        self._pending[s] = np.where(firm, False, pending)
        events = []
        for r, ln in zip(*np.nonzero(crossed)):
            i = obs[r]
            direction = int(new_side[r, ln])
            rec = self._record("line_cross", tracks[i], frame, rows, i)
            rec["line"] = geo.line_names[ln]
            rec["direction"] = DIRECTION_NAMES[direction]
            rec["in_out"] = IN_OUT[direction]
            events.append(rec)
        return events

    def _zones(self, obs, slots, class_rows, points, tracks, frame, rows) -> List[dict]:
        geo = self._geo
        s = slots[obs]
        in_poly = geometry.points_in_polygons(points[obs], geo.polygons, geo.polygons_prev)
        now_in = in_poly & geo.zone_allowed[class_rows[obs]]
        was_in = self._inside[s]
        events = []
        for r, z in zip(*np.nonzero(was_in & ~now_in)):  # exits first: moving between adjacent zones
            tr = tracks[obs[r]]
            self._inside[tr.slot, z] = False
            self._zone_count[z] -= 1
            reason = "left_zone" if not in_poly[r, z] else "class_changed"
            events.append(self._zone_exit_record(tr, int(z), reason, frame, geo, rows, int(obs[r])))
        for r, z in zip(*np.nonzero(now_in & ~was_in)):
            i = int(obs[r])
            tr = tracks[i]
            self._inside[tr.slot, z] = True
            self._zone_since[tr.slot, z] = frame.clock
            self._zone_count[z] += 1
            rec = self._record("zone_enter", tr, frame, rows, i)
            rec["zone"] = geo.zone_names[z]
            rec["zone_count"] = int(self._zone_count[z])
            events.append(rec)
        return events

    def _zone_exit_record(self, tr: _Track, z: int, reason: str, frame: _Frame, geo: Optional[_Geometry] = None,
                          rows: Optional["_Rows"] = None, row: int = 0) -> dict:
        """zone_exit record; the caller has already cleared the membership and decremented the count."""
        geo = geo or self._geo
        if rows is None:
            rows, row = self._slot_rows(tr.slot), 0
        rec = self._record("zone_exit", tr, frame, rows, row)
        rec["zone"] = geo.zone_names[z]
        rec["reason"] = reason
        rec["zone_dwell_s"] = round(max(0.0, frame.clock - float(self._zone_since[tr.slot, z])), 3)
        rec["zone_count"] = int(self._zone_count[z])
        return rec

    def _slot_rows(self, slot: int) -> "_Rows":
        """Record values from a track's last observation (exits, zone exits outside an update).
        One row: plain Python arithmetic is cheaper than numpy calls here."""
        rows = _Rows.__new__(_Rows)
        x1, y1, x2, y2 = (float(v) for v in self._box[slot])
        w, h = self.width, self.height
        rows.box_px = [[round(x1 * w, 1), round(y1 * h, 1), round(x2 * w, 1), round(y2 * h, 1)]]
        rows.box_norm = [[round(min(max(v, 0.0), 1.0), 4) for v in (x1, y1, x2, y2)]]
        rows._points = [[round(min(max((x1 + x2) * 0.5, 0.0), 1.0), 4), round(min(max(y2, 0.0), 1.0), 4)]]
        vx, vy = (float(v) for v in self._vel[slot])
        rows.vel_px = [[round(vx, 2), round(vy, 2)]]
        fps = self._frames_per_second()
        rows.vel_norm = [[round(vx * (fps / w), 4), round(vy * (fps / h), 4)]] if fps else None
        rows.score = [round(min(max(float(self._score[slot]), 0.0), 1.0), 4)]
        rows.class_id = [int(self._cls[slot])]
        rows.tsu = [int(self._tsu[slot])]
        return rows

    def _record(self, kind: str, tr: _Track, frame: _Frame, rows: "_Rows", i: int) -> dict:
        return {
            "type": kind,
            "event_id": os.urandom(16).hex(),  # 128 random bits, as uuid4 (without the object overhead)
            "seq": int(self._next_seq()),
            "ts": frame.ts,
            "frame": frame.index,
            "stream_time": round(frame.stream_time, 3),
            "device": self.device_id,
            "camera": self.camera,
            "track_id": tr.track_id,
            "class": self._class_name(rows.class_id[i]),
            "class_id": rows.class_id[i],
            "confidence": rows.score[i],
            "box_px": rows.box_px[i],
            "box_norm": rows.box_norm[i],
            "point": list(rows.point(i)),
            "velocity": {"px_per_frame": rows.vel_px[i], "norm_per_s": rows.vel_norm[i] if rows.vel_norm else None},
            "dwell_s": round(max(0.0, frame.clock - tr.enter_time), 3),
            "time_since_update": rows.tsu[i],
        }


class _Rows:
    """Rounded, JSON-ready values of a batch of tracks, computed with a few numpy calls per step."""

    __slots__ = ("box_px", "box_norm", "vel_px", "vel_norm", "score", "class_id", "tsu", "_points")

    def __init__(self, engine: EventEngine, boxes_norm: np.ndarray, vels: np.ndarray, scores: np.ndarray,
                 class_ids: np.ndarray, tsu: np.ndarray):
        self.box_px = np.round(boxes_norm * engine._wh4, 1).tolist()
        clipped = np.minimum(np.maximum(boxes_norm, 0.0), 1.0)
        self.box_norm = np.round(clipped, 4).tolist()
        feet = np.stack([(boxes_norm[:, 0] + boxes_norm[:, 2]) * 0.5, boxes_norm[:, 3]], axis=1)
        self._points = np.round(np.minimum(np.maximum(feet, 0.0), 1.0), 4).tolist()
        self.vel_px = np.round(vels, 2).tolist()
        fps = engine._frames_per_second()
        self.vel_norm = np.round(vels * (fps / engine._wh), 4).tolist() if fps else None
        self.score = np.round(np.minimum(np.maximum(scores, 0.0), 1.0), 4).tolist()
        self.class_id = class_ids.tolist()
        self.tsu = tsu.tolist()

    def point(self, i: int) -> Tuple[float, float]:
        p = self._points[i]
        return (p[0], p[1])
