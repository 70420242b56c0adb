"""Motion-gated, region-based detection: the model runs only where something moved or a live track is
due for a look, on a canvas at the model's input size into which those regions are packed.

Per frame (inference stage):
  1. `MotionDetector`: a running-average background on a small grey copy of the frame (about 1 ms for
     160 px width); pixels further than `threshold` grey levels from it, dilated, as boxes.
  2. `RegionPlanner.plan`: the regions to examine =
       - motion not explained by a live track (something new, or a track where the tracker does not expect it),
       - live tracks due for a detection: moving ones every `track_interval_s`, still ones every `refresh_s`,
         tentative ones (not confirmed yet) on every frame,
     each grown by `region_margin`, overlapping ones merged. Nothing to examine: no model call at all.
  3. `pack`: the regions as tiles on one canvas at the model's input size, all at one scale: as large as
     fits (never above `max_scale`, never below the scale of a whole-frame letterbox, so a far person gets
     more pixels than in the letterbox, never fewer). When they do not fit even at the letterbox scale,
     one crop around all of them (at worst: the whole frame) is used.
  4. Detections from the canvas are mapped back to frame pixels; the examined regions travel with them
     (`Detections.examined`) so the tracker does not count a miss for a track whose region was not looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from edged.inference.yolo import RESIZE, nms
from edged.types import Detections, Frame, TrackView  # noqa: F401 (TrackView re-exported)


# ---------------------------------------------------------------------------------------------- motion
class MotionDetector:
    """Boxes (frame pixels) of what differs from a slowly updated background."""

    def __init__(self, *, width: int = 160, threshold: int = 16, alpha: float = 0.02, min_area: float = 0.0005):
        self.width = int(width)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.min_area = float(min_area)
        self._bg: Optional[np.ndarray] = None
        self._shape: Optional[Tuple[int, int]] = None
        self._kernel = np.ones((3, 3), np.uint8)
        self.moving_fraction = 0.0  # share of the small frame that moved, last update
        self.mask: Optional[np.ndarray] = None  # last motion mask (small frame, uint8 0/1)
        self.scale = (1.0, 1.0)  # frame pixels per mask pixel (x, y)
        # What changed since the previous frame or the one before (frame differencing). Unlike the
        # background difference it has no ghost: a person who walked in and stopped stops showing here
        # at once, while the background takes 1 / alpha frames to take them in.
        self.moving_now = np.zeros((0, 4), np.float32)
        self._prev: Optional[np.ndarray] = None
        self._prev_changed: Optional[np.ndarray] = None

    def reset(self) -> None:
        self._bg = None
        self._prev = self._prev_changed = None
        self.moving_now = np.zeros((0, 4), np.float32)

    def update(self, image: np.ndarray) -> np.ndarray:
        """(K, 4) float32 boxes x1 y1 x2 y2 in frame pixels; empty on the first frame."""
        h, w = image.shape[:2]
        sw = min(self.width, w)
        sh = max(1, int(round(h * sw / w)))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        grey = cv2.GaussianBlur(grey, (5, 5), 0)
        self.scale = (w / sw, h / sh)
        if self._bg is None or self._shape != (sh, sw):
            self._bg = grey.astype(np.float32)
            self._shape = (sh, sw)
            self.moving_fraction = 0.0
            self.mask = np.zeros((sh, sw), np.uint8)
            self._prev, self._prev_changed = grey, self.mask
            self.moving_now = np.zeros((0, 4), np.float32)
            return np.zeros((0, 4), np.float32)
        changed = (cv2.absdiff(grey, self._prev) > self.threshold).astype(np.uint8)
        # Or the frame before: a camera that repeats frames (a 12.5 fps sensor in a 25 fps stream) shows
        # no change on every other one.
        self.moving_now = self.boxes(changed | self._prev_changed)
        self._prev, self._prev_changed = grey, changed
        diff = cv2.absdiff(grey.astype(np.float32), self._bg)
        cv2.accumulateWeighted(grey, self._bg, self.alpha)
        mask = (diff > self.threshold).astype(np.uint8)
        self.moving_fraction = float(mask.mean())
        if mask.any():
            mask = cv2.dilate(mask, self._kernel, iterations=2)
        self.mask = mask
        return self.boxes(mask)

    def boxes(self, mask: np.ndarray) -> np.ndarray:
        """Boxes (frame pixels) of the blobs of a mask of the small frame at least min_area large."""
        if not mask.any():
            return np.zeros((0, 4), np.float32)
        sh, sw = mask.shape
        n, _labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        min_px = max(1.0, self.min_area * sw * sh)
        keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_px]
        if not keep:
            return np.zeros((0, 4), np.float32)
        s = stats[keep]
        boxes = np.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 2], s[:, 1] + s[:, 3]], axis=1).astype(np.float32)
        fx, fy = self.scale
        boxes *= np.array([fx, fy, fx, fy], np.float32)
        return boxes

    def unexplained(self, covered: np.ndarray) -> np.ndarray:
        """Blobs of the last motion that lie outside `covered` (boxes in frame pixels, e.g. the grown
        boxes of live tracks): motion no track accounts for."""
        if self.mask is None or not self.mask.any():
            return np.zeros((0, 4), np.float32)
        if not len(covered):
            return self.boxes(self.mask)
        rest = self.mask.copy()
        fx, fy = self.scale
        for x1, y1, x2, y2 in covered:
            rest[max(0, int(y1 / fy)):int(np.ceil(y2 / fy)), max(0, int(x1 / fx)):int(np.ceil(x2 / fx))] = 0
        return self.boxes(rest)


# ---------------------------------------------------------------------------------------------- geometry
def _clip(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Boxes clipped to the frame, at least one pixel large (a track leaving the frame is looked for at
    the edge where it left)."""
    b = np.asarray(boxes, np.float64).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, w - 1)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, h - 1)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    return b

def grow(boxes: np.ndarray, margin: float, frame_w: int, frame_h: int, min_size: float = 0.0) -> np.ndarray:
    """Boxes grown by `margin` x their size on every side (at least min_size / 2), clipped to the frame."""
    if not len(boxes):
        return boxes.reshape(0, 4).astype(np.float64)
    b = boxes.astype(np.float64).copy()
    pad_w = np.maximum((b[:, 2] - b[:, 0]) * margin, min_size / 2)
    pad_h = np.maximum((b[:, 3] - b[:, 1]) * margin, min_size / 2)
    b[:, 0] -= pad_w
    b[:, 2] += pad_w
    b[:, 1] -= pad_h
    b[:, 3] += pad_h
    np.clip(b[:, 0::2], 0, frame_w, out=b[:, 0::2])
    np.clip(b[:, 1::2], 0, frame_h, out=b[:, 1::2])
    return b


def merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """Union boxes that intersect until none do (regions examined together)."""
    b = [list(map(float, x)) for x in boxes]
    merged = True
    while merged and len(b) > 1:
        merged = False
        out: List[List[float]] = []
        while b:
            cur = b.pop()
            changed = True
            while changed:
                changed = False
                rest = []
                for o in b:
                    if o[0] < cur[2] and cur[0] < o[2] and o[1] < cur[3] and cur[1] < o[3]:
                        cur = [min(cur[0], o[0]), min(cur[1], o[1]), max(cur[2], o[2]), max(cur[3], o[3])]
                        changed = merged = True
                    else:
                        rest.append(o)
                b = rest
            out.append(cur)
        b = out
    return np.array(b, np.float64).reshape(-1, 4)


def covered_fraction(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """For each box, the largest fraction of its area inside one of `regions`."""
    if not len(boxes):
        return np.zeros(0)
    if not len(regions):
        return np.zeros(len(boxes))
    ix1 = np.maximum(boxes[:, None, 0], regions[None, :, 0])
    iy1 = np.maximum(boxes[:, None, 1], regions[None, :, 1])
    ix2 = np.minimum(boxes[:, None, 2], regions[None, :, 2])
    iy2 = np.minimum(boxes[:, None, 3], regions[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return (inter / area[:, None]).max(axis=1)


# ---------------------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Tile:
    """A frame region drawn on the canvas at (cx, cy) with `scale` canvas pixels per frame pixel."""

    region: Tuple[float, float, float, float]  # x1 y1 x2 y2, frame pixels (integers)
    cx: int
    cy: int
    scale: float

    @property
    def size(self) -> Tuple[int, int]:
        x1, y1, x2, y2 = self.region
        return max(1, int(round((x2 - x1) * self.scale))), max(1, int(round((y2 - y1) * self.scale)))


def _shelf_pack(sizes: Sequence[Tuple[int, int]], net_w: int, net_h: int, gap: int) -> Optional[List[Tuple[int, int]]]:
    """Positions for rectangles on shelves (tallest first), or None when they do not fit."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][1])
    pos: List[Tuple[int, int]] = [(0, 0)] * len(sizes)
    x = y = shelf_h = 0
    for i in order:
        w, h = sizes[i]
        if w > net_w or h > net_h:
            return None
        if x + w > net_w:
            x, y, shelf_h = 0, y + shelf_h + gap, 0
        if y + h > net_h:
            return None
        pos[i] = (x, y)
        x += w + gap
        shelf_h = max(shelf_h, h)
    return pos


@dataclass(frozen=True)
class Canvas:
    """What one model call looks at: tiles on a canvas of height x width network pixels."""

    tiles: Tuple[Tile, ...]
    height: int
    width: int
    whole_frame: bool = False  # the frame letterboxed, as without motion gating


def _letterbox_canvas(frame_w: int, frame_h: int, net_w: int, net_h: int) -> Canvas:
    s = min(net_w / frame_w, net_h / frame_h)
    tw, th = frame_w * s, frame_h * s
    # Centred like the letterbox (edged.inference.yolo.letterbox_params): same pixels, same detections.
    cx, cy = int((net_w - int(tw)) // 2), int((net_h - int(th)) // 2)
    return Canvas((Tile((0.0, 0.0, float(frame_w), float(frame_h)), cx, cy, s),), net_h, net_w, True)


def small_canvas(net_h: int, net_w: int, stride: int = 32) -> Tuple[int, int]:
    """The one smaller canvas region-based detection runs besides the model's own size: about 70 % of its
    side (half its area), a multiple of the stride. One size, built once: each size is another interpreter
    holding its own copy of the packed weights (about 25 MB for YOLOv3-tiny)."""
    return (max(stride, int(round(net_h * 0.7 / stride)) * stride), max(stride, int(round(net_w * 0.7 / stride)) * stride))


def plan_canvas(regions: np.ndarray, frame_w: int, frame_h: int, net_w: int, net_h: int, *,
                max_scale: float = 2.0, target_px: float = 172.0, small_px: float = 80.0, stride: int = 32,
                whole_frame_at: float = 0.7,
                can_run: Callable[[int, int], bool] = lambda h, w: True, gap: int = 8) -> Canvas:
    """The canvas for one model call on `regions`. A region is drawn at the whole-frame letterbox scale (the
    model sees it as it would in the whole frame), unless that leaves it under `small_px` tall: then it is
    enlarged to about `target_px` (a region is an object plus its margins: at the default margin an object
    of about 96 canvas pixels, where the model sees best), at most max_scale. So a far-away person gets
    several times the pixels of the letterbox, and everything else exactly the letterbox's.

    The regions are shelf-packed into the small canvas (`small_canvas`, half the area of the model's
    input) when they fit and the model can run it, else into the full input size; the convolutions cost in
    proportion to the canvas area. When they do not fit, every enlarged scale shrinks (never below the
    letterbox's); regions that need about as much as the whole frame get the whole frame, letterboxed."""
    whole = _letterbox_canvas(frame_w, frame_h, net_w, net_h)
    if not len(regions):
        return whole
    lo = whole.tiles[0].scale
    regions = np.round(regions).astype(np.int64)
    heights = np.maximum(1, regions[:, 3] - regions[:, 1])
    scales = np.where(heights * lo >= small_px, lo, np.clip(target_px / heights, lo, max(lo, max_scale)))
    whole_area = net_w * math.ceil(frame_h * lo / stride) * stride if frame_w / frame_h >= net_w / net_h \
        else net_h * math.ceil(frame_w * lo / stride) * stride
    small = small_canvas(net_h, net_w, stride)
    candidates = ([small] if can_run(*small) else []) + [(net_h, net_w)]
    while True:
        sizes = [(max(1, int(round((r[2] - r[0]) * s))), max(1, int(round((r[3] - r[1]) * s))))
                 for r, s in zip(regions, scales)]
        for ch, cw in candidates:
            pos = _shelf_pack(sizes, cw, ch, gap)
            if pos is None:
                continue
            at_letterbox = bool(np.all(scales <= lo * 1.05))
            if ch * cw >= whole_frame_at * whole_area and at_letterbox:
                return whole  # about the whole frame anyway: see all of it
            tiles = tuple(Tile(tuple(float(v) for v in r), x, y, float(s)) for r, (x, y), s in zip(regions, pos, scales))
            return Canvas(tiles, ch, cw)
        if np.all(scales <= lo * 1.0001):
            return whole
        scales = np.maximum(lo, scales * 0.85)


def render(image_bgr: np.ndarray, tiles: Sequence[Tile], net_w: int, net_h: int, out: np.ndarray,
           fill: int = 127) -> np.ndarray:
    """The RGB network input: each tile's region resized to its place on a grey canvas."""
    out[...] = fill
    for t in tiles:
        x1, y1, x2, y2 = (int(round(v)) for v in t.region)
        tw, th = t.size
        tw, th = min(tw, net_w - t.cx), min(th, net_h - t.cy)
        crop = image_bgr[y1:y2, x1:x2]
        if crop.size == 0 or tw <= 0 or th <= 0:
            continue
        resized = crop if (crop.shape[1], crop.shape[0]) == (tw, th) else cv2.resize(crop, (tw, th), interpolation=RESIZE)
        out[t.cy:t.cy + th, t.cx:t.cx + tw] = resized[..., ::-1]
    return out


def unpack(boxes: np.ndarray, tiles: Sequence[Tile], frame_size: Optional[Tuple[int, int]] = None
           ) -> Tuple[np.ndarray, np.ndarray]:
    """Canvas boxes -> frame boxes; a box belongs to the tile holding its centre (others are dropped).
    A box may reach past its tile (the model sees part of an object and estimates the rest, as it does
    at the frame's edge): it is clipped to the frame (`frame_size`), not to the tile, so a person cut by
    a region border keeps a whole box. Returns (frame boxes, index of the kept canvas boxes)."""
    if not len(boxes):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    out, keep = [], []
    for t in tiles:
        tw, th = t.size
        inside = ((centres[:, 0] >= t.cx) & (centres[:, 0] < t.cx + tw) &
                  (centres[:, 1] >= t.cy) & (centres[:, 1] < t.cy + th))
        for i in np.flatnonzero(inside):
            b = boxes[i].astype(np.float64)
            x1, y1, x2, y2 = t.region
            fb = np.array([(b[0] - t.cx) / t.scale + x1, (b[1] - t.cy) / t.scale + y1,
                           (b[2] - t.cx) / t.scale + x1, (b[3] - t.cy) / t.scale + y1])
            if frame_size is not None:
                fb[0::2] = np.clip(fb[0::2], 0, frame_size[0])
                fb[1::2] = np.clip(fb[1::2], 0, frame_size[1])
            else:
                fb[0::2] = np.clip(fb[0::2], x1, x2)
                fb[1::2] = np.clip(fb[1::2], y1, y2)
            out.append(fb)
            keep.append(i)
    if not out:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return np.array(out, np.float32), np.array(keep, np.int64)


# ---------------------------------------------------------------------------------------------- planning
PERSISTENT_S = 1.0  # unexplained motion in one place for this long counts as persistent (not something entering)

@dataclass
class Plan:
    regions: np.ndarray  # (R, 4) frame pixels to examine; empty: no model call
    reasons: Dict[str, int] = field(default_factory=dict)  # why: motion, moving, refresh, tentative


class RegionPlanner:
    """Decides per frame which regions the model looks at (see the module docstring)."""

    def __init__(self, *, region_margin: float = 0.4, track_interval_s: float = 0.12, refresh_s: float = 3.0,
                 motion_interval_s: float = 0.5, scan_s: float = 10.0, explained: float = 0.6, min_region: float = 32.0):
        self.region_margin = region_margin
        self.track_interval_s = track_interval_s
        self.refresh_s = refresh_s
        self.motion_interval_s = motion_interval_s
        self.scan_s = scan_s
        self.explained = explained
        self.min_region = min_region
        self._last_look: Dict[int, float] = {}  # track id -> stream time its region was last examined
        # Where the model last looked, and when, on a coarse grid (frame / 16): motion that no track
        # explains and that was looked at moments ago without finding anything (a swaying plant, a
        # screen, a person the model cannot see) is looked at again only after motion_interval_s.
        self._grid: Optional[np.ndarray] = None
        self._moving_since: Optional[np.ndarray] = None
        self._last_call = -np.inf  # stream time of the last model call
        self._last_scan = -np.inf  # stream time the whole frame was last looked at
        self._cell = (1.0, 1.0)

    def plan(self, frame: Frame, motion: np.ndarray, view: TrackView,
             unexplained: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             moving_now: Optional[np.ndarray] = None) -> Plan:
        """`motion`: boxes of what differs from the background; `unexplained(covered)`: the moving blobs
        outside `covered` boxes (MotionDetector.unexplained; without it, motion boxes mostly outside every
        track count); `moving_now`: boxes of what changed since the last frames (MotionDetector.moving_now;
        without it, `motion`), which tells the tracks that move from those that stand."""
        w, h = frame.size
        now = frame.stream_time
        if now - self._last_scan >= self.scan_s:
            # The whole frame now and then (and at the start): what is there without having been seen to
            # move (present when edged started, arrived during a lighting change) is found too.
            return Plan(np.array([[0.0, 0.0, float(w), float(h)]]), {"scan": 1})
        boxes = _clip(view.at(frame.index), w, h)
        now_moving = (motion if moving_now is None else moving_now).astype(np.float64).reshape(-1, 4)
        moving = covered_fraction(boxes, now_moving) > 0.0 if len(now_moving) else np.zeros(len(boxes), bool)
        # A track is looked for where it is predicted and where it was last detected: between refreshes its
        # prediction drifts along its velocities (its size too), and a region around the drifted box alone
        # can cut the object it should find (a person who stopped, a walker who turned).
        seen = _clip(view.last_seen(), w, h)
        covers = np.concatenate([np.minimum(boxes[:, :2], seen[:, :2]), np.maximum(boxes[:, 2:], seen[:, 2:])], 1)
        reasons: Dict[str, int] = {}
        wanted: List[np.ndarray] = []
        self.note_motion(motion, w, h, now)
        # Motion that no track explains: something new (or a track the tracker lost), looked at on the
        # moving tracks' cadence (a call at most every track_interval_s for it).
        if len(motion) and now - self._last_call >= self.track_interval_s - 1e-6:
            grown_tracks = grow(covers, self.region_margin, w, h)
            if unexplained is not None:
                new = unexplained(grown_tracks).astype(np.float64)
            else:
                new = motion[covered_fraction(motion.astype(np.float64), grown_tracks) < self.explained].astype(np.float64)
            if len(new):
                new = new[self._looked_long_ago(new, w, h, now)]
            if len(new):
                # Motion shows only the part of a new object that changed (its leading edge when it slowly
                # enters): look at generous surroundings, at least a tenth of the frame height around it.
                wanted.append(grow(new, self.region_margin, w, h, min_size=0.1 * h))
                reasons["motion"] = len(new)
        if len(view.ids):
            last = np.array([self._last_look.get(int(i), -np.inf) for i in view.ids])
            age = now - last
            due_tentative = ~view.confirmed
            due_moving = moving & (age >= self.track_interval_s - 1e-6)
            due_refresh = age >= self.refresh_s
            due = due_tentative | due_moving | due_refresh
            for name, m in (("tentative", due_tentative), ("moving", due_moving & view.confirmed),
                            ("refresh", due_refresh & ~due_moving & view.confirmed)):
                if m.any():
                    reasons[name] = int(m.sum())
            if due.any() or wanted:
                # The cost is the model call, not the regions on its canvas: once a call is made, every live
                # track is looked at, and their schedules line up (one call for all of them).
                wanted.append(covers)
        if not wanted:
            return Plan(np.zeros((0, 4)), reasons)
        regions = merge_overlapping(grow(np.concatenate(wanted), self.region_margin, w, h, self.min_region))
        return Plan(regions, reasons)

    def _grid_for(self, w: int, h: int) -> np.ndarray:
        gw, gh = max(1, w // 16), max(1, h // 16)
        if self._grid is None or self._grid.shape != (gh, gw):
            self._grid = np.full((gh, gw), -np.inf, np.float64)
            self._cell = (w / gw, h / gh)
        return self._grid

    def _looked_long_ago(self, boxes: np.ndarray, w: int, h: int, now: float) -> np.ndarray:
        """For each unexplained moving blob: worth a look now? New motion always is (something may be
        entering); motion that has gone on in the same place for a while (PERSISTENT_S) without any
        track explaining it is looked at again only motion_interval_s after the last look."""
        grid = self._grid_for(w, h)
        cx, cy = self._cell
        moving = self._moving_since
        out = np.ones(len(boxes), bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            sl = (slice(int(y1 // cy), int(np.ceil(y2 / cy))), slice(int(x1 // cx), int(np.ceil(x2 / cx))))
            cells = grid[sl]
            if cells.size:
                persistent = np.mean(now - moving[sl] >= PERSISTENT_S) >= 0.5
                recent = np.mean(now - cells < self.motion_interval_s) >= 0.8
                out[i] = not (persistent and recent)
        return out

    def note_motion(self, motion: np.ndarray, w: int, h: int, now: float) -> None:
        """Remember since when each cell has been moving without a break (for _looked_long_ago)."""
        grid = self._grid_for(w, h)
        if self._moving_since is None or self._moving_since.shape != grid.shape:
            self._moving_since = np.full(grid.shape, np.inf)
        cx, cy = self._cell
        now_moving = np.zeros(grid.shape, bool)
        for x1, y1, x2, y2 in motion:
            now_moving[int(y1 // cy):int(np.ceil(y2 / cy)), int(x1 // cx):int(np.ceil(x2 / cx))] = True
        since = self._moving_since
        since[~now_moving] = np.inf
        since[now_moving & np.isinf(since)] = now

    def looked(self, view: TrackView, frame: Frame, examined: np.ndarray) -> None:
        """Record which regions (and so which tracks) were examined at this frame."""
        w, h = frame.size
        self._last_call = frame.stream_time
        if any(x1 <= 0 and y1 <= 0 and x2 >= w - 1 and y2 >= h - 1 for x1, y1, x2, y2 in examined):
            self._last_scan = frame.stream_time
        grid = self._grid_for(w, h)
        cx, cy = self._cell
        for x1, y1, x2, y2 in examined:
            grid[int(np.ceil(y1 / cy)):int(y2 // cy), int(np.ceil(x1 / cx)):int(x2 // cx)] = frame.stream_time
        if not len(view.ids):
            return
        boxes = _clip(view.at(frame.index), w, h)
        inside = covered_fraction(boxes, examined) >= 0.5 if len(examined) else np.zeros(len(view.ids), bool)
        for tid in view.ids[inside]:
            self._last_look[int(tid)] = frame.stream_time
        if len(self._last_look) > 4 * max(16, len(view.ids)):  # forget ended tracks
            alive = set(int(i) for i in view.ids)
            self._last_look = {k: v for k, v in self._last_look.items() if k in alive}


# ---------------------------------------------------------------------------------------------- detector
class GatedDetector:
    """The pipeline's detector part with motion gating: per frame, motion -> plan -> packed canvas ->
    one model call (or none) -> detections in frame pixels with the examined regions.

    `model` needs `input_size` ((h, w)), `macs` (per call) and `detect_canvas(rgb_canvas)` returning
    Detections in canvas pixels; `view()` returns the newest TrackView the tracking stage published."""

    plans_from_tracks = True  # the pipeline lets the tracker take the previous frame before detect_frame

    def __init__(self, model, view, *, motion: MotionDetector, planner: RegionPlanner, max_scale: float = 2.0):
        self.model = model
        self.view = view
        self.motion = motion
        self.planner = planner
        self.max_scale = max_scale
        self._canvases: Dict[Tuple[int, int], np.ndarray] = {}
        self.macs_per_call = int(getattr(model, "macs", 0) or 0)  # at the model's full input size
        self.last_calls = 0  # model invocations for the last frame (0 or 1)
        self.last_macs = 0  # multiply-accumulates of the last frame's call (a smaller canvas costs less)
        self.reasons: Dict[str, int] = {}

    def detect_frame(self, frame: Frame) -> Detections:
        self.last_calls = self.last_macs = 0
        self.last_invoke_ms = 0.0
        w, h = frame.size
        motion = self.motion.update(frame.image)
        view = self.view()
        plan = self.planner.plan(frame, motion, view, self.motion.unexplained, self.motion.moving_now)
        for k, v in plan.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        if not len(plan.regions):
            dets = Detections.empty()
            dets.examined = np.zeros((0, 4), np.float32)
            return dets
        net_h, net_w = self.model.input_size
        canvas = plan_canvas(plan.regions, w, h, net_w, net_h, max_scale=self.max_scale,
                             stride=getattr(self.model, "stride", 32),
                             can_run=getattr(self.model, "can_run", lambda ch, cw: (ch, cw) == (net_h, net_w)))
        buf = self._canvases.get((canvas.height, canvas.width))
        if buf is None:
            buf = self._canvases[(canvas.height, canvas.width)] = np.empty((canvas.height, canvas.width, 3), np.uint8)
        render(frame.image, canvas.tiles, canvas.width, canvas.height, buf)
        raw = self.model.detect_canvas(buf)
        self.last_calls = 1
        self.last_invoke_ms = float(getattr(self.model, "last_timing", {}).get("invoke_ms", 0.0))
        macs_at = getattr(self.model, "macs_at", None)
        self.last_macs = macs_at(canvas.height, canvas.width) if macs_at else self.macs_per_call
        boxes, keep = unpack(raw.boxes, canvas.tiles, (w, h))
        scores, classes = raw.scores[keep], raw.class_ids[keep]
        if len(canvas.tiles) > 1 and len(boxes) > 1:
            # One object seen in two neighbouring regions gives a box from each: keep the best, as the
            # model's own NMS would within one image.
            best = nms(boxes, scores, classes, float(getattr(self.model, "nms_iou", 0.45)), len(boxes))
            boxes, scores, classes = boxes[best], scores[best], classes[best]
        dets = Detections(boxes, scores, classes)
        dets.examined = np.array([t.region for t in canvas.tiles], np.float32)
        self.planner.looked(view, frame, dets.examined)
        return dets
