"""edged.motion on real video: motion boxes, region planning, packing tiles on the model canvas."""

from __future__ import annotations

import cv2
import numpy as np

from edged.motion import (
    MotionDetector, RegionPlanner, Tile, TrackView, covered_fraction, merge_overlapping, plan_canvas, render, unpack,
)
from edged.types import Frame
from tests.conftest import shared_path


def _tud(n: int = 60):
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    gt = np.loadtxt(shared_path("data", "mot15", "TUD-Stadtmitte", "gt", "gt.txt"), delimiter=",")
    cap = cv2.VideoCapture(str(video))
    frames = []
    for i in range(n):
        ok, img = cap.read()
        assert ok
        frames.append(img)
    cap.release()
    return frames, gt


def test_motion_boxes_cover_the_walking_people_and_nothing_moves_in_a_still_frame():
    frames, gt = _tud(40)
    md = MotionDetector()
    assert len(md.update(frames[0])) == 0  # the first frame starts the background
    found, total = 0, 0
    for i in range(1, len(frames)):
        boxes = md.update(frames[i])
        rows = gt[gt[:, 0] == i + 1]
        people = np.stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]], axis=1)
        if i >= 10:  # once the background has settled
            got = covered_fraction(people, boxes.astype(np.float64)) > 0.3
            found += int(got.sum())
            total += len(people)
    assert found / total > 0.8, f"motion covered {found}/{total} walking people"
    still = MotionDetector()
    for _ in range(5):
        boxes = still.update(frames[0])
    assert len(boxes) == 0 and still.moving_fraction == 0.0


def test_plan_render_unpack_maps_boxes_back_exactly():
    frame_w, frame_h = 1920, 1080
    regions = np.array([[100, 200, 180, 400], [1500, 600, 1620, 900], [900, 100, 960, 220]], float)
    canvas = plan_canvas(regions, frame_w, frame_h, 416, 416, max_scale=1.0)
    tiles = canvas.tiles
    assert len(tiles) == 3 and min(t.scale for t in tiles) >= 416 / 1920
    assert [t.scale for t in tiles] == [0.86, 0.5733333333333334, 1.0], "small regions enlarged to ~172 px, at most max_scale"
    assert canvas.height < 416 or canvas.width < 416, "a smaller canvas than the model's full input"
    # A box in each region, as if the model found it on the canvas.
    canvas_boxes = []
    for t in tiles:
        x1, y1, x2, y2 = t.region
        fb = np.array([x1 + 10, y1 + 10, x2 - 10, y2 - 10])
        canvas_boxes.append([(fb[0] - x1) * t.scale + t.cx, (fb[1] - y1) * t.scale + t.cy,
                             (fb[2] - x1) * t.scale + t.cx, (fb[3] - y1) * t.scale + t.cy])
    back, keep = unpack(np.array(canvas_boxes, np.float32), tiles)
    assert list(keep) == [0, 1, 2]
    expected = np.array([[t.region[0] + 10, t.region[1] + 10, t.region[2] - 10, t.region[3] - 10] for t in tiles])
    np.testing.assert_allclose(back, expected, atol=0.01)
    # Rendering puts each region's pixels at its tile.
    img = np.zeros((frame_h, frame_w, 3), np.uint8)
    img[200:400, 100:180] = (0, 0, 255)  # red in BGR
    out = render(img, tiles, canvas.width, canvas.height, np.empty((canvas.height, canvas.width, 3), np.uint8))
    t = next(t for t in tiles if t.region[0] == 100)
    assert tuple(out[t.cy + 5, t.cx + 5]) == (255, 0, 0)  # RGB on the canvas


def test_regions_that_do_not_fit_become_the_whole_frame_letterboxed():
    regions = np.array([[0, 0, 1000, 1050], [1010, 0, 1910, 1050]], float)  # no room for both at 0.2167
    canvas = plan_canvas(regions, 1920, 1080, 416, 416)
    assert canvas.whole_frame and (canvas.height, canvas.width) == (416, 416)
    (t,) = canvas.tiles
    assert abs(t.scale - 416 / 1920) < 1e-9 and t.region == (0.0, 0.0, 1920.0, 1080.0)


def test_planner_looks_only_where_needed():
    planner = RegionPlanner(track_interval_s=0.1, refresh_s=2.0)
    img = np.zeros((480, 640, 3), np.uint8)
    view = TrackView(0, np.array([7]), np.array([[100.0, 100, 150, 250]]), np.zeros((1, 2)), np.array([True]))
    start = Frame(img, 0, 0.0, 0.9)
    plan = planner.plan(start, np.zeros((0, 4), np.float32), view)
    assert plan.reasons == {"scan": 1} and plan.regions.tolist() == [[0, 0, 640, 480]]  # the whole frame first
    planner.looked(TrackView.empty(), start, plan.regions)
    f0 = Frame(img, 1, 0.0, 1.0)
    plan = planner.plan(f0, np.zeros((0, 4), np.float32), view)
    assert plan.reasons == {"refresh": 1}  # a track never looked at yet
    planner.looked(view, f0, plan.regions)
    still = planner.plan(Frame(img, 2, 0.0, 1.04), np.zeros((0, 4), np.float32), view)
    assert len(still.regions) == 0, "a still, recently seen track needs no model call"
    moving = planner.plan(Frame(img, 3, 0.0, 1.2), np.array([[110, 120, 160, 240]], np.float32), view)
    assert moving.reasons == {"moving": 1}
    new = planner.plan(Frame(img, 4, 0.0, 1.21), np.array([[400, 300, 460, 420]], np.float32), view)
    assert new.reasons == {"motion": 1} and covered_fraction(np.array([[400, 300, 460, 420.0]]), new.regions)[0] == 1.0
    refresh = planner.plan(Frame(img, 60, 0.0, 3.1), np.zeros((0, 4), np.float32), view)
    assert refresh.reasons == {"refresh": 1}
    assert planner.plan(Frame(img, 200, 0.0, 11.0), np.zeros((0, 4), np.float32), view).reasons == {"scan": 1}


def test_merge_overlapping_regions():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40], [19, 19, 31, 31]], float)
    assert merge_overlapping(boxes).tolist() == [[0.0, 0.0, 40.0, 40.0]]
    assert len(merge_overlapping(np.array([[0, 0, 1, 1], [2, 2, 3, 3]], float))) == 2
    assert Tile((0, 0, 10, 20), 0, 0, 2.0).size == (20, 40)


def test_a_track_whose_region_was_not_examined_is_not_missed():
    from edged.config import TrackerConfig
    from edged.tracking.tracker import Tracker
    from edged.types import Detections

    tracker = Tracker(TrackerConfig(use_appearance=False, max_age=30))
    box = np.array([[100.0, 100, 150, 250]], np.float32)
    for _ in range(5):
        tracker.update(Detections(box.copy(), np.array([0.9], np.float32), np.array([0], np.int32)))
    (track,) = tracker.live_tracks()
    elsewhere = np.array([[400.0, 0, 640, 480]], np.float32)
    for _ in range(100):  # far beyond max_age: the detector looked only elsewhere
        d = Detections.empty()
        d.examined = elsewhere
        step = tracker.update(d)
    (still,) = step.tracks
    assert still.track_id == track.track_id and still.time_since_update == 0 and not step.deleted
    nothing = Detections.empty()
    nothing.examined = np.zeros((0, 4), np.float32)  # no model call at all
    assert tracker.update(nothing).tracks[0].time_since_update == 0
    # Looked at, and not found: a real miss, and after max_age misses the track is gone.
    for k in range(31):
        d = Detections.empty()
        d.examined = np.array([[0.0, 0, 640, 480]], np.float32)
        step = tracker.update(d)
        if step.deleted:
            break
    assert step.deleted and step.deleted[0].track_id == track.track_id and k == 30


def _run_scene(spec, overlay):
    """The scene's frames through the daemon's own parts (one thread): its ComputeRun."""
    from edged.bench import run_configured
    from edged.config import deep_merge, load_config
    from edged.scene import Scene

    cfg = load_config(None, overlay=deep_merge({"detector": {"classes": ["person"]}}, overlay))
    scene = Scene(spec)
    return run_configured(cfg, ((i, scene.frame(i)[0]) for i in range(spec.n_frames)), spec.fps)


def test_people_standing_still_stay_tracked_on_a_few_model_calls():
    from tests.conftest import need_module

    need_module("skimage")
    from edged.scene import SceneObject, SceneSpec, Waypoint

    objs = (SceneObject(1, "astronaut", 220, (Waypoint(0, 180, 280), Waypoint(149, 180, 280))),
            SceneObject(2, "cameraman", 190, (Waypoint(0, 470, 170), Waypoint(149, 470, 170))))
    spec = SceneSpec(640, 480, 10.0, 150, 3, objs)  # 15 s, nothing moves
    run = _run_scene(spec, {})
    types = [e["type"] for e in run.events]
    assert types.count("enter") == 2
    # No exit while they stand there: the only exits are the two at the end of the stream.
    assert [e["reason"] for e in run.events if e["type"] == "exit"] == ["shutdown", "shutdown"]
    # The first frames confirm the tracks; then one look per refresh_s (3 s) keeps them.
    assert run.counters.detector_calls <= 15, run.counters.detector_calls
    full = _run_scene(spec, {"detector": {"motion": {"enabled": False}}})
    assert full.counters.macs >= 10 * run.counters.macs


def test_a_person_who_stops_keeps_a_whole_box():
    """Walk in, stand, walk out. Between refreshes a standing track is predicted along its last velocities
    (its size too), so its region must also cover where it was last seen; and it stops counting as moving
    as soon as it stops (frame differencing), not when the background has taken it in. Every detection of
    the standing person is its whole box, and it is tracked as one person throughout."""
    from tests.conftest import need_module

    need_module("skimage")
    from edged.scene import Scene, SceneObject, SceneSpec, Waypoint
    from edged.tracking.matching import iou_matrix

    path = (Waypoint(0, -80, 260), Waypoint(50, 320, 260), Waypoint(200, 320, 260), Waypoint(250, 720, 260),
            Waypoint(299, 720, 260))
    spec = SceneSpec(640, 480, 10.0, 300, 4, (SceneObject(1, "astronaut", 220, path),))
    run = _run_scene(spec, {})
    gt = dict(Scene(spec).gt())
    standing = [i for i in range(60, 200) if i in run.detections]
    assert len(standing) >= 3, "a standing person is still looked at now and then"
    for i in standing:
        (g,) = gt[i]
        truth = np.array([[g.x, g.y, g.x + g.w, g.y + g.h]])
        found = run.detections[i]
        assert len(found) == 1 and iou_matrix(truth, found.astype(np.float64))[0, 0] >= 0.8, (i, found, truth)
    ids = {int(row[1]) for row in run.mot_rows}
    assert len(ids) == 1 and [e["type"] for e in run.events].count("enter") == 1
    # Once it stands, a look per refresh, not per track_interval.
    assert sum(1 for i in range(80, 200) if i in run.detections) <= 12
