"""EventEngine: lifecycle, zones, lines, positions, config changes, schemas and invariants over
random tracker step sequences (hypothesis)."""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import points_in_poly

from edged.config import EventsConfig
from edged.events import EventEngine, decode_embedding, encode_embedding, iso_utc
from edged.types import TrackerStep, TrackSnapshot

W, H = 640, 480
FPS = 10.0
T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "edged" / "mqtt" / "schemas"
EVENT_VALIDATOR = jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / "event.schema.json").read_text()))
POSITION_VALIDATOR = jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / "position.schema.json").read_text()))


def snap(tid: int, x: float, y: float, *, cls: int = 0, score: float = 0.9, vel=(0.0, 0.0), tsu: int = 0,
         bw: float = 40, bh: float = 100, feature: Optional[np.ndarray] = None) -> TrackSnapshot:
    """A track whose box has its bottom-centre (the feet) at pixel (x, y)."""
    box = np.array([x - bw / 2, y - bh, x + bw / 2, y], np.float64)
    return TrackSnapshot(tid, cls, box, score, np.asarray(vel, np.float64), 10, 10, tsu, feature)


class Run:
    """An engine fed frame by frame at FPS, collecting every event."""

    def __init__(self, cfg: Optional[EventsConfig] = None, *, class_names=("person", "car"), fps: Optional[float] = FPS,
                 **kw):
        self.engine = EventEngine(cfg or EventsConfig(), device_id="dev1", camera="cam0", class_names=list(class_names),
                                  frame_size=(W, H), fps=fps, **kw)
        self.frame = 0
        self.events: List[dict] = []
        self.seen_ids: set = set()

    def step(self, tracks: Sequence[TrackSnapshot] = (), deleted: Sequence[TrackSnapshot] = (),
             confirmed: Optional[Sequence[int]] = None) -> List[dict]:
        if confirmed is None:  # the ids not seen before, as a tracker would report them
            confirmed = [t.track_id for t in tracks if t.track_id not in self.seen_ids]
        self.seen_ids |= {t.track_id for t in tracks}
        out = self.engine.process(TrackerStep(list(tracks), list(confirmed), list(deleted)),
                                  frame_index=self.frame, timestamp=T0 + self.frame / FPS, stream_time=self.frame / FPS)
        self.frame += 1
        self.events += out
        return out

    def shutdown(self, tracks: Sequence[TrackSnapshot] = ()) -> List[dict]:
        out = self.engine.shutdown(frame_index=self.frame, timestamp=T0 + self.frame / FPS,
                                   stream_time=self.frame / FPS, tracks=list(tracks))
        self.events += out
        return out

    def types(self, track_id: Optional[int] = None, skip_positions: bool = True) -> List[str]:
        return [e["type"] for e in self.events
                if (track_id is None or e["track_id"] == track_id) and not (skip_positions and e["type"] == "position")]


def validate(events: Sequence[dict], per_type: Optional[int] = None) -> None:
    """Validate records against the schemas (`per_type`: only the first few of each type, as pure-Python
    validation costs milliseconds per record and the property tests produce thousands)."""
    seen: Counter = Counter()
    for e in events:
        seen[e["type"]] += 1
        if per_type is not None and seen[e["type"]] > per_type:
            continue
        EVENT_VALIDATOR.validate(e)
        if e["type"] == "position":
            POSITION_VALIDATOR.validate(e)


# ---------------------------------------------------------------------------------------------- scenarios
ZONE_RIGHT = {"name": "right_half", "polygon": [(0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)]}
LINE_DOWN = {"name": "door", "points": [(0.25, 0.0), (0.25, 1.0)]}  # directed top -> bottom


def test_walk_across_frame_gives_ordered_lifecycle() -> None:
    run = Run(EventsConfig(zones=[ZONE_RIGHT], lines=[LINE_DOWN]))
    xs = list(range(40, 640, 10))  # the feet stay inside the frame, the box reaches the right border
    for x in xs:
        run.step([snap(1, x, 300, vel=(10, 0))])
    run.step([], deleted=[snap(1, xs[-1] + 20, 300, vel=(10, 0), tsu=2)])
    # Facing down the image (p1 -> p2), +x is the left-hand side: walking right is right_to_left.
    assert run.types(1) == ["enter", "line_cross", "zone_enter", "zone_exit", "exit"]
    by_type = {e["type"]: e for e in run.events}
    cross, exit_ = by_type["line_cross"], by_type["exit"]
    assert (cross["line"], cross["direction"], cross["in_out"]) == ("door", "right_to_left", "out")
    assert cross["point"][0] >= 0.25 and cross["box_px"][0] < 0.25 * W
    assert by_type["zone_enter"]["zone"] == "right_half" and by_type["zone_enter"]["zone_count"] == 1
    assert by_type["zone_exit"]["reason"] == "track_exit" and by_type["zone_exit"]["zone_count"] == 0
    assert exit_["reason"] == "left_frame"
    assert exit_["first_position"] == [round(40 / W, 4), round(300 / H, 4)]
    assert exit_["last_position"] == [round(xs[-1] / W, 4), round(300 / H, 4)]
    assert exit_["duration_s"] == pytest.approx(len(xs) / FPS, abs=1e-6)
    assert exit_["velocity"]["px_per_frame"] == [10.0, 0.0]
    assert exit_["velocity"]["norm_per_s"] == pytest.approx([10 * FPS / W, 0.0], abs=1e-4)
    positions = [e for e in run.events if e["type"] == "position"]
    assert positions, "a moving track reports positions"
    validate(run.events)
    seqs = [e["seq"] for e in run.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert run.engine.live_track_ids() == [] and run.engine.state()["total"] == 0


def test_common_fields() -> None:
    run = Run()
    (enter,) = run.step([snap(7, 320, 240, cls=1, score=0.87654, vel=(2, -1))])
    assert enter["type"] == "enter" and enter["track_id"] == 7
    assert (enter["class"], enter["class_id"], enter["confidence"]) == ("car", 1, 0.8765)
    assert (enter["device"], enter["camera"], enter["frame"], enter["stream_time"]) == ("dev1", "cam0", 0, 0.0)
    assert enter["ts"] == "2025-11-24T16:00:00.000Z"
    assert enter["box_px"] == [300.0, 140.0, 340.0, 240.0]
    assert enter["box_norm"] == [round(300 / W, 4), round(140 / H, 4), round(340 / W, 4), 0.5]
    assert enter["point"] == [0.5, 0.5] and enter["dwell_s"] == 0.0
    assert re.fullmatch(r"[0-9a-f]{32}", enter["event_id"])
    assert iso_utc(T0 + 0.1234) == "2025-11-24T16:00:00.123Z"
    assert iso_utc(T0 + 59.9996) == "2025-11-24T16:01:00.000Z"
    validate([enter])


def test_exit_reasons() -> None:
    run = Run(EventsConfig(edge_margin=0.03))
    run.step([snap(1, 320, 300), snap(2, 630, 300, bw=20), snap(3, 600, 300, vel=(30, 0)), snap(4, 320, 200)])
    # 1 vanishes mid-frame; 2 touches the right margin; 3 was heading out (coasted box outside).
    run.step([snap(4, 320, 200)], deleted=[snap(1, 320, 300, tsu=5), snap(2, 630, 300, bw=20, tsu=5),
                                           snap(3, 780, 300, tsu=5, vel=(30, 0))])
    run.shutdown([snap(4, 322, 201)])
    reasons = {e["track_id"]: e["reason"] for e in run.events if e["type"] == "exit"}
    assert reasons == {1: "lost", 2: "left_frame", 3: "left_frame", 4: "shutdown"}
    shut = [e for e in run.events if e["type"] == "exit" and e["track_id"] == 4][0]
    assert shut["box_px"] == [302.0, 101.0, 342.0, 201.0], "shutdown uses the tracker's latest snapshot"
    validate(run.events)


def test_exit_predicted_out_of_frame_by_velocity() -> None:
    run = Run(EventsConfig(edge_margin=0.0))
    run.step([snap(1, 600, 300, vel=(80, 0))])
    run.step([], deleted=[snap(1, 600, 300, vel=(80, 0), tsu=1)])  # centre 600 + 80 > 640
    assert [e["reason"] for e in run.events if e["type"] == "exit"] == ["left_frame"]


def test_line_jitter_counts_once_per_real_crossing() -> None:
    # Horizontal line at y = 240 drawn left -> right: below it is the right side.
    run = Run(EventsConfig(lines=[{"name": "l", "points": [(0.0, 0.5), (1.0, 0.5)]}], line_hysteresis=0.02))
    diag = float(np.hypot(W, H))  # 800 px; hysteresis band 16 px
    ys = [150, 200, 230]
    ys += [240 + a for a in [-5, 6, -7, 4, -3, 8, -6, 5, -2, 7] * 3]  # jitter within the band
    ys += [270, 300]  # firmly below: one crossing
    ys += [240 + a for a in [5, -8, 9, -12, 10, -15, 3] * 3]  # jitter again (never beyond the band above)
    ys += [300]  # back below: same side, no crossing
    ys += [200, 150]  # firmly above: one crossing back
    for y in ys:
        run.step([snap(1, 320, y)])
    crosses = [e for e in run.events if e["type"] == "line_cross"]
    assert [(c["direction"], c["in_out"]) for c in crosses] == [("left_to_right", "in"), ("right_to_left", "out")]
    band_px = 0.02 * diag
    assert crosses[0]["point"][1] * H > 240 + band_px and crosses[1]["point"][1] * H < 240 - band_px
    validate(run.events)


def test_line_zero_hysteresis_counts_every_side_change() -> None:
    run = Run(EventsConfig(lines=[{"name": "l", "points": [(0.0, 0.5), (1.0, 0.5)]}], line_hysteresis=0.0))
    for y in [230, 250, 230, 250]:
        run.step([snap(1, 320, y)])
    assert [e["direction"] for e in run.events if e["type"] == "line_cross"] == [
        "left_to_right", "right_to_left", "left_to_right"]


def test_line_crossing_outside_segment_is_not_counted() -> None:
    # Segment covers only the left half of the frame; walking down on the right passes its extension.
    run = Run(EventsConfig(lines=[{"name": "l", "points": [(0.0, 0.5), (0.5, 0.5)]}]))
    for y in range(100, 400, 20):
        run.step([snap(1, 500, y), snap(2, 100, y)])
    assert [(e["track_id"], e["direction"]) for e in run.events if e["type"] == "line_cross"] == [(2, "left_to_right")]


def test_line_and_zone_class_filters() -> None:
    cfg = EventsConfig(zones=[{**ZONE_RIGHT, "classes": ["car"]}],
                       lines=[{"name": "l", "points": [(0.5, 0.0), (0.5, 1.0)], "classes": ["person"]}])
    run = Run(cfg)
    for x in range(200, 500, 20):
        run.step([snap(1, x, 300, cls=0), snap(2, x, 400, cls=1)])
    assert sorted((e["type"], e["track_id"]) for e in run.events if e["type"] not in ("position", "enter")) == [
        ("line_cross", 1), ("zone_enter", 2)]
    state = run.engine.state()
    assert state["zones"]["right_half"] == {"total": 1, "classes": {"car": 1}}


def test_coasting_track_cannot_enter_zone_or_cross_line() -> None:
    run = Run(EventsConfig(zones=[ZONE_RIGHT], lines=[{"name": "mid", "points": [(0.5, 0.0), (0.5, 1.0)]}]))
    run.step([snap(1, 200, 300)])
    for k, x in enumerate(range(250, 500, 50)):
        run.step([snap(1, x, 300, tsu=k + 1)])  # predicted-only boxes drifting into the zone
    assert run.types(1) == ["enter"]
    run.step([snap(1, 480, 300)])  # observed there: now it counts
    assert run.types(1) == ["enter", "line_cross", "zone_enter"]


def test_position_rate_limits_and_heartbeat() -> None:
    cfg = EventsConfig(position_interval_s=2.0, position_min_interval_s=0.5, position_min_move=0.05)
    run = Run(cfg)
    # Stationary for 5 s: heartbeats only, every 2 s.
    for _ in range(51):
        run.step([snap(1, 100, 300)])
    hb = [e["stream_time"] for e in run.events if e["type"] == "position"]
    assert hb == [2.0, 4.0]
    # Fast mover (60 px/frame > 40 px threshold): at most one update per 0.5 s.
    start = len(run.events)
    for k in range(1, 21):
        run.step([snap(1, 100 + 25 * k, 300)])
    times = [e["stream_time"] for e in run.events[start:] if e["type"] == "position"]
    assert len(times) >= 3 and all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:]))
    # A slow creep (1 px/frame, 20 px between heartbeats < 40 px): after the catch-up report of the
    # fast phase's last metres, only heartbeats.
    start = len(run.events)
    x0 = 100 + 25 * 20
    for k in range(1, 61):
        run.step([snap(1, x0 + k, 300)])
    creep = [e["stream_time"] for e in run.events[start:] if e["type"] == "position"]
    assert creep[0] - times[-1] == pytest.approx(0.5)
    assert np.diff(creep[1:]).tolist() == pytest.approx([2.0] * (len(creep) - 2)) and len(creep) == 3
    validate(run.events)


def test_velocity_rate_estimated_without_fps() -> None:
    run = Run(fps=None)
    (enter,) = run.step([snap(1, 100, 300, vel=(6.4, 0))])
    assert enter["velocity"] == {"px_per_frame": [6.4, 0.0], "norm_per_s": None}
    for k in range(1, 30):
        run.step([snap(1, 100 + 6.4 * k, 300, vel=(6.4, 0))])
    run.step([], deleted=[snap(1, 300, 300, vel=(6.4, 0), tsu=1)])
    exit_ = run.events[-1]
    assert exit_["velocity"]["norm_per_s"][0] == pytest.approx(6.4 * FPS / W, abs=1e-4)
    validate(run.events)


def test_stream_restart_keeps_durations_and_heartbeats() -> None:
    # A looped file restarts stream_time at 0: dwell keeps growing, heartbeats keep coming.
    run = Run(EventsConfig(position_interval_s=1.0))
    for k in range(30):  # 3 s
        run.engine.process(TrackerStep([snap(1, 100, 300)], [1] if k == 0 else []), frame_index=k,
                           timestamp=T0 + k / FPS, stream_time=k / FPS)
    events = []
    for k in range(30):  # stream_time back to 0.0 .. 2.9
        events += run.engine.process(TrackerStep([snap(1, 100, 300)]), frame_index=k,
                                     timestamp=T0 + 3 + k / FPS, stream_time=k / FPS)
    heartbeats = [e for e in events if e["type"] == "position"]
    assert len(heartbeats) == 3
    assert [e["dwell_s"] for e in heartbeats] == pytest.approx([3.0, 4.0, 5.0], abs=0.11)
    (exit_,) = run.engine.shutdown(frame_index=30, timestamp=T0 + 6, stream_time=3.0)
    assert exit_["duration_s"] == pytest.approx(6.0, abs=0.11) and exit_["stream_time"] == 3.0


def test_rate_is_measured_from_processed_frames() -> None:
    # The source says 30 fps but only every third frame is processed: velocity is per processed frame.
    engine = EventEngine(EventsConfig(), device_id="d", camera="c", class_names=["person"], frame_size=(W, H), fps=30.0)
    (enter,) = engine.process(TrackerStep([snap(1, 100, 300, vel=(6.4, 0))], [1]), frame_index=0, timestamp=T0,
                              stream_time=0.0)
    assert enter["velocity"]["norm_per_s"] == [round(6.4 * 30 / W, 4), 0.0]  # the source's fps until measured
    for k in range(1, 20):
        stall = 5.0 if k == 10 else 0.0  # one reconnect gap does not disturb the estimate
        engine.process(TrackerStep([snap(1, 100, 300, vel=(6.4, 0))]), frame_index=3 * k, timestamp=T0 + k / 10,
                       stream_time=k / 10 + stall * (k >= 10))
    (exit_,) = engine.shutdown(frame_index=60, timestamp=T0 + 7, stream_time=6.9)
    assert exit_["velocity"]["norm_per_s"][0] == pytest.approx(6.4 * 10 / W, abs=1e-4)


def test_embedding_encoding_roundtrip() -> None:
    rng = np.random.default_rng(0)
    feature = rng.normal(size=512).astype(np.float32)
    feature /= np.linalg.norm(feature)
    enc = encode_embedding(feature)
    back = decode_embedding(enc)
    assert enc["dim"] == 512 and len(enc["data"]) == 4 * math.ceil(512 / 3)
    assert np.max(np.abs(back - feature)) <= enc["scale"] / 2 + 1e-7
    assert float(np.dot(back, feature) / np.linalg.norm(back)) > 0.9999
    with pytest.raises(ValueError, match="finite"):
        encode_embedding(np.array([np.nan, 1.0]))

    run = Run(EventsConfig(include_embedding=True))
    run.step([snap(1, 320, 300, feature=feature)])
    run.step([], deleted=[snap(1, 320, 300, tsu=3, feature=feature)])
    exit_ = run.events[-1]
    np.testing.assert_allclose(decode_embedding(exit_["embedding"]), feature, atol=enc["scale"] / 2 + 1e-7)
    validate(run.events)
    off = Run(EventsConfig(include_embedding=False))
    off.step([snap(1, 320, 300, feature=feature)])
    off.step([], deleted=[snap(1, 320, 300, tsu=3, feature=feature)])
    assert "embedding" not in off.events[-1]


def test_state_counts_per_class_and_zone() -> None:
    cfg = EventsConfig(zones=[ZONE_RIGHT, {"name": "top", "polygon": [(0, 0), (1, 0), (1, 0.5), (0, 0.5)]}])
    run = Run(cfg, track_classes=["person", "car"])
    assert run.engine.state()["classes"] == {"person": 0, "car": 0}
    v0 = run.engine.state_version
    run.step([snap(1, 500, 100, cls=0), snap(2, 100, 100, cls=1), snap(3, 500, 400, cls=0), snap(4, 100, 400, cls=7)])
    state = run.engine.state()
    assert run.engine.state_version > v0
    assert state["total"] == 4 and state["classes"] == {"person": 2, "car": 1, "class_7": 1}
    assert state["zones"]["right_half"] == {"total": 2, "classes": {"person": 2, "car": 0}}
    assert state["zones"]["top"] == {"total": 2, "classes": {"person": 1, "car": 1}}
    v1 = run.engine.state_version
    run.step([snap(1, 502, 101, cls=0), snap(2, 101, 100, cls=1), snap(3, 500, 400, cls=0), snap(4, 100, 400, cls=7)])
    assert run.engine.state_version == v1, "no change, no new state version"
    run.step([snap(1, 502, 101, cls=0), snap(4, 100, 400, cls=7)], deleted=[snap(2, 100, 100, cls=1, tsu=9)])
    state = run.engine.state()
    assert state["total"] == 2 and state["classes"] == {"person": 1, "car": 0, "class_7": 1}
    assert state["zones"]["top"]["total"] == 1
    validate(run.events)
    # The retained `state` payload schema (docs/mqtt.md) accepts the engine's state.
    state_schema = json.loads((SCHEMA_DIR / "state.schema.json").read_text())
    jsonschema.Draft202012Validator(state_schema).validate(state)


def test_set_config_zone_removed_changed_and_added() -> None:
    cfg = EventsConfig(zones=[ZONE_RIGHT, {"name": "all", "polygon": [(0, 0), (1, 0), (1, 1), (0, 1)]}],
                       lines=[{"name": "mid", "points": [(0.0, 0.5), (1.0, 0.5)]}])
    run = Run(cfg)
    run.step([snap(1, 500, 300), snap(2, 100, 300, cls=1)])
    assert Counter(e["type"] for e in run.events)["zone_enter"] == 3
    new_cfg = EventsConfig(
        zones=[{"name": "all", "polygon": [(0, 0), (1, 0), (1, 1), (0, 1)], "classes": ["car"]},
               {"name": "left", "polygon": [(0, 0), (0.5, 0), (0.5, 1), (0, 1)]}],
        lines=[{"name": "mid", "points": [(0.0, 0.5), (1.0, 0.5)]}])
    out = run.engine.set_config(new_cfg, frame_index=1, timestamp=T0 + 0.1, stream_time=0.1)
    run.events += out
    # right_half removed (track 1 inside); 'all' now only admits cars (track 1 is a person).
    assert sorted((e["zone"], e["track_id"], e["reason"]) for e in out) == [
        ("all", 1, "config_changed"), ("right_half", 1, "config_changed")]
    state = run.engine.state()
    assert set(state["zones"]) == {"all", "left"}
    assert state["zones"]["all"]["total"] == 1 and state["zones"]["left"]["total"] == 0
    run.frame = 2
    run.step([snap(1, 500, 300), snap(2, 100, 300, cls=1)])  # next update: 'left' gets track 2
    assert [(e["type"], e["zone"], e["track_id"]) for e in run.events if e["type"].startswith("zone")][-1] == (
        "zone_enter", "left", 2)
    run.shutdown()
    closing = [(e["zone"], e["track_id"]) for e in run.events if e["type"] == "zone_exit" and e["reason"] == "shutdown"]
    assert sorted(closing) == [("all", 2), ("left", 2)], "no dangling membership of removed zones"
    validate(run.events)
    _check_invariants(run.events, run.engine)


def test_set_config_moved_line_forgets_side() -> None:
    run = Run(EventsConfig(lines=[{"name": "l", "points": [(0.0, 0.5), (1.0, 0.5)]}]))
    run.step([snap(1, 320, 200)])
    run.engine.set_config(EventsConfig(lines=[{"name": "l", "points": [(0.0, 0.6), (1.0, 0.6)]}]))
    run.step([snap(1, 320, 310)])  # crosses the old line position and the new one in one move
    assert [e["type"] for e in run.events if e["type"] == "line_cross"] == []
    run.step([snap(1, 320, 250)])  # back up across the new line: counted (side known since last step)
    assert [e["direction"] for e in run.events if e["type"] == "line_cross"] == ["right_to_left"]


def test_set_frame_size_keeps_normalised_state() -> None:
    run = Run(EventsConfig(zones=[ZONE_RIGHT]))
    run.step([snap(1, 500, 300)])
    run.engine.set_frame_size((1280, 960))
    out = run.step([snap(1, 1000, 600)])  # same normalised place in the bigger frame: nothing happened
    assert out == [] and run.types(1) == ["enter", "zone_enter"]
    run.frame += 10  # past position_min_interval_s
    (pos,) = run.step([snap(1, 1200, 600)])  # 200 px of 1600 px diagonal > 5 %: a position update
    assert pos["type"] == "position" and pos["point"] == [0.9375, 0.625] and pos["box_px"][2] == 1220.0
    with pytest.raises(ValueError, match="frame_size must be positive"):
        run.engine.set_frame_size((0, 480))


def test_tracker_inconsistencies_are_absorbed() -> None:
    run = Run()
    run.step([snap(1, 100, 300), snap(2, 200, 300)], confirmed=[1])  # 2 alive but not announced
    run.step([snap(2, 200, 300)])  # 1 vanished without being reported deleted
    run.step([snap(2, 200, 300)], deleted=[snap(9, 50, 50)])  # never-entered id deleted
    run.step([snap(2, 200, 300)], deleted=[snap(2, 200, 300)])  # deleted but still listed alive
    assert run.types() == ["enter", "enter", "exit"]
    assert [(e["track_id"], e["reason"]) for e in run.events if e["type"] == "exit"] == [(1, "lost")]
    run.shutdown()
    _check_invariants(run.events, run.engine)


def test_bad_input_is_reported_clearly() -> None:
    run = Run()
    with pytest.raises(ValueError, match=r"more than once: \[3\]"):
        run.step([snap(3, 100, 100), snap(3, 200, 200)])
    bad = snap(4, 100, 100)
    bad.box[1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite box for track ids \[4\]"):
        run.step([bad])
    with pytest.raises(ValueError, match="frame_size must be"):
        EventEngine(EventsConfig(), device_id="d", camera="c", class_names=["person"], frame_size=(640,))
    with pytest.raises(ValueError, match="fps must be"):
        EventEngine(EventsConfig(), device_id="d", camera="c", class_names=["person"], frame_size=(640, 480), fps=0)
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_embedding({"encoding": "fp16", "dim": 1, "scale": 1.0, "data": ""})


def test_next_seq_callable_is_used() -> None:
    counter = iter(range(1000, 2000, 7))
    run = Run(next_seq=lambda: next(counter))
    run.step([snap(1, 100, 100), snap(2, 300, 100)])
    run.shutdown()
    assert [e["seq"] for e in run.events] == [1000, 1007, 1014, 1021]


# ---------------------------------------------------------------------------------------------- schemas
def test_schemas_are_valid_and_not_vacuous() -> None:
    event_schema = json.loads((SCHEMA_DIR / "event.schema.json").read_text())
    position_schema = json.loads((SCHEMA_DIR / "position.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(event_schema)
    jsonschema.Draft202012Validator.check_schema(position_schema)
    # The tracks topic schema is the event schema's position variant, not a drifting copy.
    for key, value in position_schema["$defs"].items():
        assert event_schema["$defs"][key] == value, key
    run = Run(EventsConfig(zones=[ZONE_RIGHT], lines=[LINE_DOWN], include_embedding=True))
    for x in range(100, 600, 25):
        run.step([snap(1, x, 300, feature=np.ones(4) / 2)])
    run.shutdown()
    kinds = {e["type"] for e in run.events}
    assert kinds == {"enter", "exit", "position", "zone_enter", "zone_exit", "line_cross"}
    validate(run.events)
    exit_ = [e for e in run.events if e["type"] == "exit"][0]
    for mutate in (lambda e: e.pop("reason"), lambda e: e.update(reason="gone"), lambda e: e.update(seq="1"),
                   lambda e: e.update(ts="2025-11-24 16:00:00"), lambda e: e.update(extra=1),
                   lambda e: e.update(type="teleport"), lambda e: e["embedding"].pop("scale"),
                   lambda e: e.update(box_norm=[0, 0, 1.5, 1])):
        broken = copy.deepcopy(exit_)
        mutate(broken)
        assert not EVENT_VALIDATOR.is_valid(broken)
    pos = [e for e in run.events if e["type"] == "position"][0]
    assert not POSITION_VALIDATOR.is_valid(exit_)
    assert not POSITION_VALIDATOR.is_valid({**pos, "zone": "x"})


# ---------------------------------------------------------------------------------------------- invariants
def _check_invariants(events: Sequence[dict], engine: EventEngine, after_shutdown: bool = True) -> None:
    seqs = [e["seq"] for e in events]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), "seq strictly increasing"
    assert len({e["event_id"] for e in events}) == len(events), "event ids unique"
    status: Dict[int, str] = {}
    zones: Dict[tuple, bool] = defaultdict(bool)
    for e in events:
        tid = e["track_id"]
        if e["type"] == "enter":
            assert tid not in status, f"track {tid} entered twice"
            status[tid] = "live"
            continue
        assert status.get(tid) == "live", f"{e['type']} for track {tid} without a live enter"
        if e["type"] == "exit":
            status[tid] = "gone"
            assert not any(v for (t, _), v in zones.items() if t == tid), f"track {tid} exited while in a zone"
        elif e["type"] == "zone_enter":
            assert not zones[(tid, e["zone"])], "zone_enter twice"
            zones[(tid, e["zone"])] = True
        elif e["type"] == "zone_exit":
            assert zones[(tid, e["zone"])], "zone_exit without zone_enter"
            zones[(tid, e["zone"])] = False
    if after_shutdown:
        assert all(s == "gone" for s in status.values()), "after shutdown every entered track has an exit"
        assert engine.live_track_ids() == [] and engine.state()["total"] == 0


class _SimTracker:
    """A random but well-formed tracker: confirmations, coasting, deletions, class flips, occasional
    silent drops, tracks jittering on the lines and tracks leaving through the borders."""

    def __init__(self, rng: np.random.Generator, p_spawn: float, p_delete: float, p_coast: float, p_silent: float):
        self.rng, self.p_spawn, self.p_delete, self.p_coast, self.p_silent = rng, p_spawn, p_delete, p_coast, p_silent
        self.next_id = 1
        self.tentative: Dict[int, dict] = {}
        self.live: Dict[int, dict] = {}

    def _snap(self, tid: int, t: dict) -> TrackSnapshot:
        x, y = t["pos"]
        feature = t["feature"] if self.rng.random() < 0.8 else None
        return snap(tid, x, y, cls=t["cls"], score=float(self.rng.uniform(0.3, 1)), vel=t["vel"], tsu=t["tsu"],
                    feature=feature)

    def step(self) -> TrackerStep:
        rng = self.rng
        confirmed, deleted = [], []
        if rng.random() < self.p_spawn:
            jitter_line = rng.random() < 0.3
            pos = np.array([rng.uniform(-30, W + 30), 240.0 + rng.normal(0, 12) if jitter_line else rng.uniform(0, H + 20)])
            self.tentative[self.next_id] = {"pos": pos, "vel": rng.normal(0, 8, 2), "tsu": 0, "hits": 0,
                                            "cls": int(rng.choice([0, 0, 1, 5])), "jitter": jitter_line,
                                            "feature": rng.normal(size=8)}
            self.next_id += 1
        for tid in list(self.tentative):
            t = self.tentative[tid]
            t["hits"] += 1
            if t["hits"] >= 2:
                self.live[tid] = self.tentative.pop(tid)
                confirmed.append(tid)
        for tid in list(self.live):
            if tid in confirmed:
                continue
            t = self.live[tid]
            r = rng.random()
            if r < self.p_delete:
                t["tsu"] += 1
                deleted.append(self._snap(tid, t))
                del self.live[tid]
                continue
            if r < self.p_delete + self.p_silent:
                del self.live[tid]
                continue
            if t["jitter"]:
                t["pos"] = np.array([t["pos"][0], 240.0 + rng.normal(0, 12)])
            else:
                if rng.random() < 0.1:
                    t["vel"] = rng.normal(0, 15, 2)
                t["pos"] = t["pos"] + t["vel"]
            t["tsu"] = t["tsu"] + 1 if rng.random() < self.p_coast else 0
            if t["tsu"] == 0 and rng.random() < 0.05:
                t["cls"] = int(rng.choice([0, 1]))
        tracks = [self._snap(tid, t) for tid, t in self.live.items()]
        return TrackerStep(tracks, confirmed, deleted)


ZONES = [
    {"name": "z_left", "polygon": [(0.0, 0.0), (0.45, 0.0), (0.45, 1.0), (0.0, 1.0)]},
    {"name": "z_tri", "polygon": [(0.2, 0.9), (0.8, 0.9), (0.5, 0.3)], "classes": ["person"]},
    {"name": "z_u", "polygon": [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.6, 0.9), (0.6, 0.5), (0.4, 0.5), (0.4, 0.9),
                                (0.1, 0.9)]},
]
LINES = [
    {"name": "l_h", "points": [(0.0, 0.5), (1.0, 0.5)]},
    {"name": "l_d", "points": [(0.1, 0.9), (0.8, 0.2)], "classes": ["car"]},
]


@given(seed=st.integers(0, 2**32 - 1), frames=st.integers(1, 120), p_spawn=st.floats(0.05, 0.8),
       p_delete=st.floats(0.0, 0.2), p_coast=st.floats(0.0, 0.5), p_silent=st.floats(0.0, 0.05),
       min_move=st.sampled_from([0.0, 0.01, 0.05]), hysteresis=st.sampled_from([0.0, 0.01, 0.03]))
@settings(max_examples=80, deadline=None)
def test_invariants_over_random_tracker_steps(seed, frames, p_spawn, p_delete, p_coast, p_silent, min_move,
                                              hysteresis) -> None:
    _random_run(seed, frames, p_spawn, p_delete, p_coast, p_silent, min_move, hysteresis)


def _random_run(seed, frames, p_spawn, p_delete, p_coast, p_silent, min_move, hysteresis) -> None:
    rng = np.random.default_rng(seed)
    sim = _SimTracker(rng, p_spawn, p_delete, p_coast, p_silent)
    cfg = EventsConfig(zones=ZONES, lines=LINES, position_min_move=min_move, position_min_interval_s=0.2,
                       position_interval_s=1.0, line_hysteresis=hysteresis, include_embedding=True)
    run = Run(cfg, class_names=["person", "car"], fps=None)
    last_obs: Dict[int, tuple] = {}
    for _ in range(frames):
        step = sim.step()
        run.step(step.tracks, step.deleted, step.confirmed)
        for t in step.tracks:
            if t.time_since_update == 0 or t.track_id not in last_obs:
                last_obs[t.track_id] = ((t.box[0] + t.box[2]) / 2 / W, t.box[3] / H, t.class_id)
        # state() == live entered tracks, per class and per zone, from an independent oracle.
        live = set(run.engine.live_track_ids())
        alive_now = {t.track_id for t in step.tracks}
        assert live == alive_now, "every live confirmed track has entered, exits removed the rest"
        state = run.engine.state()
        classes = Counter({"person": 0, "car": 0, "class_5": 0})
        for tid in live:
            classes[["person", "car"][last_obs[tid][2]] if last_obs[tid][2] < 2 else "class_5"] += 1
        assert state["total"] == len(live)
        assert {k: v for k, v in state["classes"].items() if v} == {k: v for k, v in classes.items() if v}
        ids = sorted(live)
        pts = np.array([last_obs[tid][:2] for tid in ids]).reshape(-1, 2)
        names = [["person", "car"][last_obs[tid][2]] if last_obs[tid][2] < 2 else "class_5" for tid in ids]
        for zone in ZONES:
            in_poly = points_in_poly(pts, np.array(zone["polygon"])) if ids else []
            inside = [tid for tid, inp, name in zip(ids, in_poly, names)
                      if inp and (not zone.get("classes") or name in zone["classes"])]
            assert state["zones"][zone["name"]]["total"] == len(inside), zone["name"]
            assert sum(state["zones"][zone["name"]]["classes"].values()) == len(inside)
    run.shutdown(sim._snap(tid, t) for tid, t in sim.live.items())
    _check_invariants(run.events, run.engine)
    validate(run.events, per_type=3)
    # A crossing is reported where the feet are firmly (beyond the hysteresis band) on the side the
    # direction names.
    lines = {ln["name"]: np.array(ln["points"]) * (W, H) for ln in LINES}
    for e in run.events:
        if e["type"] == "line_cross":
            (ax, ay), (bx, by) = lines[e["line"]]
            px, py = e["box_px"][0] / 2 + e["box_px"][2] / 2, e["box_px"][3]
            dist = ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / math.hypot(bx - ax, by - ay) / math.hypot(W, H)
            expected = 1 if e["direction"] == "left_to_right" else -1
            assert dist * expected > hysteresis - 1e-3, (e["line"], e["direction"], dist)


@given(seed=st.integers(0, 2**32 - 1), frames=st.integers(5, 60))
@settings(max_examples=30, deadline=None)
def test_invariants_hold_across_config_changes(seed: int, frames: int) -> None:
    rng = np.random.default_rng(seed)
    sim = _SimTracker(rng, 0.5, 0.08, 0.2, 0.02)
    configs = [EventsConfig(zones=ZONES[:k], lines=LINES[: k % 3]) for k in range(4)]
    configs.append(EventsConfig(zones=[{**ZONES[0], "polygon": [(0.3, 0.0), (1.0, 0.0), (1.0, 1.0)]}]))
    run = Run(configs[0])
    net: Counter = Counter()
    for _ in range(frames):
        new = []
        if rng.random() < 0.2:
            new = run.engine.set_config(configs[int(rng.integers(len(configs)))])
            run.events += new
        step = sim.step()
        new += run.step(step.tracks, step.deleted, step.confirmed)
        for e in new:
            if e["type"] in ("zone_enter", "zone_exit"):
                net[e["zone"]] += 1 if e["type"] == "zone_enter" else -1
        state = run.engine.state()
        for name, body in state["zones"].items():
            assert body["total"] == net[name], name
        assert all(net[name] == 0 for name in net if name not in state["zones"]), "removed zones were emptied"
    run.shutdown()
    _check_invariants(run.events, run.engine)
    validate(run.events, per_type=3)
