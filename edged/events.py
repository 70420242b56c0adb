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
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from edged import geometry
from edged.config import EventsConfig
from edged.types import TrackerStep, TrackSnapshot

EVENT_TYPES = ("enter", "exit", "position", "zone_enter", "zone_exit", "line_cross")
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
    stream_time: float


class _Track:
    """Per-track values that are only needed when that track produces an event."""

    __slots__ = (
        "track_id", "slot", "class_id", "enter_time", "first_point", "last_box", "last_score",
        "velocity", "feature", "last_point", "time_since_update",
    )

    def __init__(self, snap: TrackSnapshot, slot: int, enter_time: float, point: Tuple[float, float]):
        self.track_id = int(snap.track_id)
        self.slot = slot
        self.class_id = int(snap.class_id)
        self.enter_time = enter_time
        self.first_point = point
        self.last_box = np.asarray(snap.box, np.float64).copy()
        self.last_score = float(snap.score)
        self.velocity = np.asarray(snap.velocity, np.float64).copy()
        self.feature = snap.feature
        self.last_point = point
        self.time_since_update = int(snap.time_since_update)


class _Geometry:
    """Zones and lines of one EventsConfig, packed for vectorised tests."""

    def __init__(self, cfg: EventsConfig, class_names: Sequence[str]):
        self.zone_names = [z.name for z in cfg.zones]
        self.zone_defs = {z.name: z for z in cfg.zones}
        self.polygons = geometry.pack_polygons([np.asarray(z.polygon, np.float64) for z in cfg.zones])
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
        self._dt_estimate: Optional[float] = None  # processed-frame interval when fps is not given
        self._last_stream_time: Optional[float] = None
        self._next_seq = next_seq or itertools.count(1).__next__
        self._ts_cache: Tuple[Optional[float], str] = (None, "")
        self._last_frame = _Frame(0, iso_utc(time.time()), 0.0)
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
        self._diag = math.hypot(self.width, self.height)

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
        - A zone whose polygon changed keeps its occupants; they are re-tested at their next update
          (a plain zone_exit / zone_enter follows if they are now outside / inside).
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
            new_def = new.zone_defs.get(name)
            for tr in live:
                if not self._inside[tr.slot, z_old]:
                    continue
                if new_def is None or not new.zone_allowed[self._class_row(tr.class_id), new.zone_names.index(name)]:
                    events.append(self._zone_exit_record(tr, z_old, "config_changed", frame, geo=old))
                    self._inside[tr.slot, z_old] = False
                    self._zone_count[z_old] -= 1
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
        self._update_rate(stream_time)
        events: List[dict] = []
        alive = step.tracks
        alive_ids = [int(t.track_id) for t in alive]
        alive_set = set(alive_ids)
        if len(alive_set) != len(alive_ids):
            dup = sorted({i for i in alive_ids if alive_ids.count(i) > 1})
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

        if not alive:
            if counts_changed:
                self.state_version += 1
            return events

        # 2. Per-step arrays over all live tracks.
        boxes = np.array([t.box for t in alive], np.float64).reshape(len(alive), 4)
        if not np.all(np.isfinite(boxes)):
            bad = [alive_ids[i] for i in np.nonzero(~np.all(np.isfinite(boxes), axis=1))[0]]
            raise ValueError(f"TrackerStep.tracks: non-finite box for track ids {bad}")
        vels = np.array([t.velocity for t in alive], np.float64).reshape(len(alive), 2)
        vels = np.nan_to_num(vels, nan=0.0, posinf=0.0, neginf=0.0)
        matched = np.array([t.time_since_update == 0 for t in alive], bool)
        class_ids = np.array([t.class_id for t in alive], np.int64)
        points = np.stack([(boxes[:, 0] + boxes[:, 2]) * 0.5, boxes[:, 3]], axis=1) / self._wh
        rows = _Rows(self, boxes, vels, points)

        # 3. Enters (any live track not yet entered: normally exactly the ids in step.confirmed).
        new_idx = []
        for i, snap in enumerate(alive):
            tid = alive_ids[i]
            tr = self._tracks.get(tid)
            if tr is None:
                tr = _Track(snap, self._alloc_slot(), stream_time, rows.point(i))
                self._tracks[tid] = tr
                self._rep_point[tr.slot] = points[i]
                self._rep_time[tr.slot] = stream_time
                events.append(self._record("enter", tr, frame, rows, i))
                new_idx.append(i)
                counts_changed = True
            elif matched[i]:
                if tr.class_id != int(snap.class_id):
                    counts_changed = True
                tr.class_id = int(snap.class_id)
                tr.last_box = boxes[i].copy()
                tr.last_score = float(snap.score)
                tr.velocity = vels[i].copy()
                tr.last_point = rows.point(i)
                if snap.feature is not None:
                    tr.feature = snap.feature
            tr.time_since_update = int(snap.time_since_update)
        tracks = [self._tracks[tid] for tid in alive_ids]
        slots = np.fromiter((tr.slot for tr in tracks), np.int64, len(tracks))
        class_rows = np.where((class_ids >= 0) & (class_ids < len(self.class_names)), class_ids, len(self.class_names))

        # 4. Lines and zones on observed positions.
        obs = np.nonzero(matched)[0]
        if len(obs):
            if len(self._geo.line_names):
                events += self._lines(obs, slots, class_rows, points, tracks, frame, rows)
            if len(self._geo.zone_names):
                ev = self._zones(obs, slots, class_rows, points, tracks, frame, rows)
                counts_changed |= bool(ev)
                events += ev
            self._obs_point[slots[obs]] = points[obs]
            self._has_obs[slots[obs]] = True

        # 5. Positions: moved enough (observed) and not too soon, or heartbeat.
        moved = np.hypot(*((points - self._rep_point[slots]) * self._wh).T) > self.cfg.position_min_move * self._diag
        waited = stream_time - self._rep_time[slots]
        due = (matched & moved & (waited >= self.cfg.position_min_interval_s)) | (waited >= self.cfg.position_interval_s)
        for i in np.nonzero(due)[0]:
            events.append(self._record("position", tracks[i], frame, rows, i))
        due_slots = slots[due]
        self._rep_point[due_slots] = points[due]
        self._rep_time[due_slots] = stream_time

        if counts_changed:
            self.state_version += 1
        return events

    def shutdown(self, *, frame_index: int, timestamp: float, stream_time: float,
                 tracks: Iterable[TrackSnapshot] = ()) -> List[dict]:
        """zone_exit + exit (reason shutdown) for every entered live track; the engine is empty after.

        `tracks` (the tracker's current snapshots, optional) refresh the last known box first."""
        frame = self._frame(frame_index, timestamp, stream_time)
        by_id = {int(t.track_id): t for t in tracks}
        events: List[dict] = []
        for tid in list(self._tracks):
            tr = self._tracks[tid]
            snap = by_id.get(tid)
            if snap is not None and snap.time_since_update == 0 and np.all(np.isfinite(snap.box)):
                tr.last_box = np.asarray(snap.box, np.float64).copy()
                tr.last_score = float(snap.score)
                tr.velocity = np.nan_to_num(np.asarray(snap.velocity, np.float64))
                tr.last_point = self._foot(tr.last_box)
                if snap.feature is not None:
                    tr.feature = snap.feature
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
        for tr in self._tracks.values():
            name = self._class_name(tr.class_id)
            classes[name] = classes.get(name, 0) + 1
        zones = {}
        for z, zname in enumerate(self._geo.zone_names):
            zdef = self._geo.zone_defs[zname]
            per_class: Dict[str, int] = {name: 0 for name in (zdef.classes or self.track_classes)}
            total = 0
            for tr in self._tracks.values():
                if self._inside[tr.slot, z]:
                    name = self._class_name(tr.class_id)
                    per_class[name] = per_class.get(name, 0) + 1
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
        frame = _Frame(
            int(frame_index) if frame_index is not None else last.index,
            self._ts_cache[1],
            float(stream_time) if stream_time is not None else last.stream_time,
        )
        self._last_frame = frame
        return frame

    def _update_rate(self, stream_time: float) -> None:
        if self._last_stream_time is not None:
            dt = stream_time - self._last_stream_time
            if dt > 0:
                # EMA of the processed-frame interval: the tracker's velocity is per processed frame.
                self._dt_estimate = dt if self._dt_estimate is None else 0.9 * self._dt_estimate + 0.1 * dt
        self._last_stream_time = stream_time

    def _frames_per_second(self) -> Optional[float]:
        if self._fps is not None:
            return self._fps
        return 1.0 / self._dt_estimate if self._dt_estimate else None

    def _foot(self, box: np.ndarray) -> Tuple[float, float]:
        """Normalised bottom-centre of a pixel box, clipped to the frame, 4 decimals."""
        x = min(max(float((box[0] + box[2]) * 0.5 / self.width), 0.0), 1.0)
        y = min(max(float(box[3] / self.height), 0.0), 1.0)
        return (round(x, 4), round(y, 4))

    def _class_row(self, class_id: int) -> int:
        return class_id if 0 <= class_id < len(self.class_names) else len(self.class_names)

    def _class_name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else f"class_{class_id}"

    def _alloc_tables(self, cap: int) -> None:
        nz, nl = len(self._geo.zone_names), len(self._geo.line_names)

        def grow(old: Optional[np.ndarray], shape: tuple, dtype) -> np.ndarray:
            new = np.zeros(shape, dtype)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        first = self._cap == 0
        self._inside = grow(None if first else self._inside, (cap, nz), bool)
        self._zone_since = grow(None if first else self._zone_since, (cap, nz), np.float64)
        self._side = grow(None if first else self._side, (cap, nl), np.int8)
        self._pending = grow(None if first else self._pending, (cap, nl), bool)
        self._obs_point = grow(None if first else self._obs_point, (cap, 2), np.float64)
        self._has_obs = grow(None if first else self._has_obs, (cap,), bool)
        self._rep_point = grow(None if first else self._rep_point, (cap, 2), np.float64)
        self._rep_time = grow(None if first else self._rep_time, (cap,), np.float64)
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
        x1, y1, x2, y2 = tr.last_box
        mx, my = self.cfg.edge_margin * self.width, self.cfg.edge_margin * self.height
        if x1 <= mx or y1 <= my or x2 >= self.width - mx or y2 >= self.height - my:
            return "left_frame"
        # Where it was heading: the last observed centre one step ahead, and the tracker's own
        # coasted estimate at deletion time.
        cx, cy = (x1 + x2) * 0.5 + tr.velocity[0], (y1 + y2) * 0.5 + tr.velocity[1]
        centres = [(cx, cy)]
        if snap is not None and np.all(np.isfinite(snap.box)):
            b = snap.box
            centres.append(((b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5))
        for x, y in centres:
            if not (0 <= x < self.width and 0 <= y < self.height):
                return "left_frame"
        return "lost"

    def _end_track(self, tr: _Track, snap: Optional[TrackSnapshot], reason: str, frame: _Frame) -> List[dict]:
        events = []
        zone_reason = "shutdown" if reason == "shutdown" else "track_exit"
        if snap is not None:
            tr.time_since_update = int(snap.time_since_update)
            if snap.feature is not None:
                tr.feature = snap.feature
        for z in np.nonzero(self._inside[tr.slot])[0]:
            events.append(self._zone_exit_record(tr, int(z), zone_reason, frame))
            self._inside[tr.slot, z] = False
            self._zone_count[z] -= 1
        rec = self._single_record("exit", tr, frame)
        duration = max(0.0, frame.stream_time - tr.enter_time)
        rec["reason"] = reason
        rec["duration_s"] = round(duration, 3)
        rec["first_position"] = list(tr.first_point)
        rec["last_position"] = list(tr.last_point)
        if self.cfg.include_embedding and tr.feature is not None:
            feature = np.asarray(tr.feature, np.float32)
            if feature.size and np.all(np.isfinite(feature)):
                rec["embedding"] = encode_embedding(feature)
        events.append(rec)
        del self._tracks[tr.track_id]
        self._free.append(tr.slot)
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
        in_poly = geometry.points_in_polygons(points[obs], geo.polygons)
        allowed = geo.zone_allowed[class_rows[obs]]
        now_in = in_poly & allowed
        was_in = self._inside[s]
        exits = was_in & ~now_in
        enters = now_in & ~was_in
        events = []
        for r, z in zip(*np.nonzero(exits)):
            tr = tracks[obs[r]]
            reason = "left_zone" if not in_poly[r, z] else "class_changed"
            self._inside[tr.slot, z] = False
            self._zone_count[z] -= 1
            events.append(self._zone_exit_record(tr, int(z), reason, frame, rows=rows, row=int(obs[r])))
        for r, z in zip(*np.nonzero(enters)):
            i = int(obs[r])
            tr = tracks[i]
            self._inside[tr.slot, z] = True
            self._zone_since[tr.slot, z] = frame.stream_time
            self._zone_count[z] += 1
            rec = self._record("zone_enter", tr, frame, rows, i)
            rec["zone"] = geo.zone_names[z]
            rec["zone_count"] = int(self._zone_count[z])
            events.append(rec)
        return events

    def _zone_exit_record(self, tr: _Track, z: int, reason: str, frame: _Frame, *, geo: Optional[_Geometry] = None,
                          rows: Optional["_Rows"] = None, row: int = 0) -> dict:
        geo = geo or self._geo
        rec = self._record("zone_exit", tr, frame, rows, row) if rows is not None else self._single_record("zone_exit", tr, frame)
        rec["zone"] = geo.zone_names[z]
        rec["reason"] = reason
        rec["zone_dwell_s"] = round(max(0.0, frame.stream_time - float(self._zone_since[tr.slot, z])), 3)
        # Occupancy after this exit (the caller decrements the count; account for it here).
        inside_now = int(self._zone_count[z]) - (1 if self._inside[tr.slot, z] else 0)
        rec["zone_count"] = max(0, inside_now)
        return rec

    def _single_record(self, kind: str, tr: _Track, frame: _Frame) -> dict:
        """A record from the track's last observed box (exits and config-change zone exits)."""
        box = tr.last_box.reshape(1, 4)
        point = np.array([[(box[0, 0] + box[0, 2]) * 0.5, box[0, 3]]]) / self._wh
        rows = _Rows(self, box, tr.velocity.reshape(1, 2), point, scores=[tr.last_score])
        return self._record(kind, tr, frame, rows, 0)

    def _record(self, kind: str, tr: _Track, frame: _Frame, rows: "_Rows", i: int) -> dict:
        return {
            "type": kind,
            "event_id": uuid.uuid4().hex,
            "seq": int(self._next_seq()),
            "ts": frame.ts,
            "frame": frame.index,
            "stream_time": round(frame.stream_time, 3),
            "device": self.device_id,
            "camera": self.camera,
            "track_id": tr.track_id,
            "class": self._class_name(tr.class_id),
            "class_id": tr.class_id,
            "confidence": rows.score(i, tr),
            "box_px": rows.box_px[i],
            "box_norm": rows.box_norm[i],
            "point": list(rows.point(i)),
            "velocity": {"px_per_frame": rows.vel_px[i], "norm_per_s": rows.vel_norm[i] if rows.vel_norm else None},
            "dwell_s": round(max(0.0, frame.stream_time - tr.enter_time), 3),
            "time_since_update": tr.time_since_update,
        }


class _Rows:
    """Rounded, JSON-ready per-row values, computed once per step for all tracks (lazily)."""

    __slots__ = ("box_px", "box_norm", "vel_px", "vel_norm", "_points", "_scores")

    def __init__(self, engine: EventEngine, boxes: np.ndarray, vels: np.ndarray, points: np.ndarray,
                 scores: Optional[List[float]] = None):
        wh4 = np.tile(engine._wh, 2)
        self.box_px = np.round(boxes, 1).tolist()
        self.box_norm = np.round(np.clip(boxes / wh4, 0.0, 1.0), 4).tolist()
        self.vel_px = np.round(vels, 2).tolist()
        fps = engine._frames_per_second()
        self.vel_norm = np.round(vels * fps / engine._wh, 4).tolist() if fps else None
        self._points = np.round(np.clip(points, 0.0, 1.0), 4).tolist()
        self._scores = scores

    def point(self, i: int) -> Tuple[float, float]:
        p = self._points[i]
        return (p[0], p[1])

    def score(self, i: int, tr: _Track) -> float:
        return round(float(self._scores[i] if self._scores is not None else tr.last_score), 4)
