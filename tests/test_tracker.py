"""DeepSORT tracker behaviour: lifecycle, cascade, gating, classes, no-feature mode, bookkeeping."""

from typing import Dict, List

import numpy as np
import pytest

from edged.config import TrackerConfig
from edged.tracking import motio
from edged.tracking.matching import matching_cascade, min_cost_matching
from edged.tracking.tracker import Tracker
from edged.types import Detections

from conftest import shared_path

FAITHFUL = TrackerConfig(feature_ema=0.0, nsa_kalman=False, matching_cascade=True, motion_weight=0.0,
                         second_association=False, observation_reupdate=False)


def unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def dets(boxes, scores=None, classes=None, feats=None) -> Detections:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = b.shape[0]
    return Detections(
        boxes=b,
        scores=np.asarray(scores if scores is not None else [0.9] * n, np.float32),
        class_ids=np.asarray(classes if classes is not None else [0] * n, np.int32),
        features=None if feats is None else np.asarray(feats, np.float32).reshape(n, -1),
    )


def person(frame: int, x0: float = 100.0, speed: float = 5.0) -> List[float]:
    x = x0 + speed * frame
    return [x, 50.0, x + 40.0, 150.0]


@pytest.mark.parametrize("cfg", [FAITHFUL, TrackerConfig()], ids=["faithful", "default"])
def test_lifecycle_n_init_and_max_age(cfg):
    cfg = cfg.model_copy(update={"n_init": 3, "max_age": 5})
    tracker = Tracker(cfg)
    f = unit(0)
    steps = [tracker.update(dets([person(i)], feats=[f])) for i in range(3)]
    assert [s.tracks for s in steps[:2]] == [[], []]  # tentative tracks are not reported
    assert steps[0].confirmed == [] and steps[1].confirmed == [] and steps[2].confirmed == [1]
    assert [t.track_id for t in steps[2].tracks] == [1]
    # Missed frames: alive (coasting) until more than max_age misses, then deleted exactly once.
    deleted_at = None
    for miss in range(1, 10):
        step = tracker.update(Detections.empty())
        if step.deleted:
            assert [t.track_id for t in step.deleted] == [1]
            deleted_at = miss
            break
        assert step.tracks[0].time_since_update == miss
    assert deleted_at == cfg.max_age + 1
    assert tracker.live_tracks() == [] and len(tracker) == 0


def test_tentative_track_dies_on_first_miss_and_ids_never_repeat():
    tracker = Tracker(FAITHFUL)
    tracker.update(dets([person(0)]))
    tracker.update(dets([person(1)]))
    step = tracker.update(Detections.empty())
    assert step.deleted == [] and step.confirmed == [] and len(tracker) == 0
    for i in range(3):
        step = tracker.update(dets([person(i)]))
    assert step.confirmed == [2]  # id 1 is not reused


def test_snapshot_velocity_box_and_feature():
    tracker = Tracker(TrackerConfig(feature_ema=0.9))
    f = unit(3)
    for i in range(15):
        step = tracker.update(dets([person(i, speed=4.0)], feats=[f]))
    (t,) = step.tracks
    assert t.velocity[0] == pytest.approx(4.0, abs=0.2) and t.velocity[1] == pytest.approx(0.0, abs=0.2)
    assert np.allclose(t.box, person(14, speed=4.0), atol=1.0)
    assert np.linalg.norm(t.feature) == pytest.approx(1.0, abs=1e-5)
    assert float(t.feature @ f) == pytest.approx(1.0, abs=1e-5)
    assert t.hits == 15 and t.age == 15 and t.time_since_update == 0 and t.score == pytest.approx(0.9)


def test_cascade_prefers_the_fresher_track():
    # Track 0 was missed for 3 frames but looks closer; track 1 was seen last frame.
    cost = np.array([[0.05], [0.15]])
    levels = np.array([3, 1])
    r, c = matching_cascade(cost, levels, 0.2, max_level=30)
    assert r.tolist() == [1] and c.tolist() == [0]
    r, c = min_cost_matching(cost, 0.2)  # a global assignment takes the closer one
    assert r.tolist() == [0]
    # Beyond max_level the track does not take part at all.
    r, c = matching_cascade(np.array([[0.05]]), np.array([31]), 0.2, max_level=30)
    assert r.size == 0


def test_min_cost_matching_rejects_pairs_above_threshold():
    cost = np.array([[0.1, 0.9], [0.8, 0.95]])
    r, c = min_cost_matching(cost, 0.5)
    assert list(zip(r.tolist(), c.tolist())) == [(0, 0)]


@pytest.mark.parametrize("cascade", [True, False])
def test_cascade_inside_tracker_gives_detection_to_recent_track(cascade):
    """Tracks A (lost 2 frames, looks exactly like the detection) and B (seen last frame, cosine
    distance 0.15): the cascade serves B first; a global assignment takes A."""
    fd = unit(1)
    other = unit(2)
    other -= (other @ fd) * fd
    other /= np.linalg.norm(other)
    fb = 0.85 * fd + np.sqrt(1 - 0.85**2) * other
    box_a, box_b = [100.0, 50.0, 140.0, 150.0], [110.0, 50.0, 150.0, 150.0]
    tracker = Tracker(FAITHFUL.model_copy(update={"matching_cascade": cascade}))
    for _ in range(4):
        tracker.update(dets([box_a, box_b], feats=[fd, fb]))
    for _ in range(2):
        tracker.update(dets([box_b], feats=[fb]))
    step = tracker.update(dets([[105.0, 50.0, 145.0, 150.0]], feats=[fd]))
    tsu = {t.track_id: t.time_since_update for t in step.tracks}
    assert tsu == ({1: 3, 2: 0} if cascade else {1: 0, 2: 1})


def test_gating_rejects_a_far_detection_with_the_same_appearance():
    tracker = Tracker(FAITHFUL)
    f = unit(2)
    for i in range(5):
        tracker.update(dets([person(i)], feats=[f]))
    step = tracker.update(dets([[900.0, 400.0, 940.0, 500.0]], feats=[f]))
    (t,) = step.tracks
    assert t.track_id == 1 and t.time_since_update == 1  # not teleported
    assert len(tracker) == 2  # the far detection started its own (tentative) track


def test_never_associates_across_classes():
    for cfg in (FAITHFUL, TrackerConfig(), TrackerConfig(use_appearance=False)):
        tracker = Tracker(cfg)
        f = unit(4)
        for i in range(4):
            tracker.update(dets([person(i)], classes=[0], feats=[f]))
        # Same place, same appearance, other class: a new track, the old one misses.
        step = tracker.update(dets([person(4)], classes=[2], feats=[f]))
        (t,) = step.tracks
        assert t.class_id == 0 and t.time_since_update == 1
        for i in range(5, 8):
            step = tracker.update(dets([person(i)], classes=[2], feats=[f]))
        assert {(t.track_id, t.class_id) for t in step.tracks if t.time_since_update == 0} == {(2, 2)}


@pytest.mark.parametrize("mode", ["features_none", "use_appearance_false"])
def test_works_without_appearance(mode):
    cfg = TrackerConfig(use_appearance=(mode != "use_appearance_false"))
    tracker = Tracker(cfg)
    ids = set()
    for i in range(30):
        a, b = person(i, x0=50, speed=3), person(i, x0=300, speed=-3)
        feats = None if mode == "features_none" else [unit(5), unit(6)]
        step = tracker.update(dets([a, b], feats=feats))
        ids |= {t.track_id for t in step.tracks}
        if mode == "features_none":
            assert all(t.feature is None for t in step.tracks)
    assert ids == {1, 2}  # two people walking towards each other, tracked from start to end
    assert len(step.tracks) == 2


def test_bad_detections_raise_clear_errors():
    tracker = Tracker()
    bad = Detections(np.zeros((2, 4), np.float32), np.zeros(3, np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"2 boxes but scores of shape \(3,\)"):
        tracker.update(bad)
    bad = Detections(np.ones((2, 4), np.float32), np.ones(2, np.float32), np.zeros(2, np.int32), np.ones((3, 8)))
    with pytest.raises(ValueError, match="features must be"):
        tracker.update(bad)
    with pytest.raises(ValueError, match="boxes must be"):
        tracker.update(Detections(np.ones((2, 5), np.float32), np.ones(2, np.float32), np.zeros(2, np.int32)))


def test_degenerate_and_low_score_boxes_start_no_tracks():
    tracker = Tracker(TrackerConfig(min_confidence=0.5))
    for _ in range(5):
        step = tracker.update(dets([[10, 10, 10, 50], [0, 0, 20, float("nan")], person(0)], scores=[0.9, 0.9, 0.2]))
    assert len(tracker) == 0 and step.tracks == []


def check_bookkeeping(steps, tracker) -> Dict[str, int]:
    confirmed_once, deleted, _next_min = set(), set(), 1
    for step in steps:
        for i in step.confirmed:
            assert i not in confirmed_once, f"id {i} confirmed twice"
            confirmed_once.add(i)
        for t in step.deleted:
            assert t.track_id in confirmed_once, f"deleted id {t.track_id} was never confirmed"
            assert t.track_id not in deleted
            deleted.add(t.track_id)
        alive = {t.track_id for t in step.tracks}
        assert alive <= confirmed_once and not (alive & deleted)
    assert {t.track_id for t in tracker.live_tracks()} == confirmed_once - deleted
    return {"confirmed": len(confirmed_once), "deleted": len(deleted)}


@pytest.mark.parametrize("cfg", [FAITHFUL, TrackerConfig(), TrackerConfig(use_appearance=False)],
                         ids=["faithful", "default", "no-appearance"])
def test_bookkeeping_on_a_real_sequence(cfg):
    rows = motio.load_detections(shared_path("data", "mot15", "TUD-Stadtmitte", "det", "det.txt"))
    tracker = Tracker(cfg)
    steps = [tracker.update(d) for _, d in motio.iter_frames(rows)]
    counts = check_bookkeeping(steps, tracker)
    assert 8 <= counts["confirmed"] <= 60  # 10 people in the clip
    assert counts["deleted"] >= 1


def test_recycled_appearance_slot_forgets_its_previous_owner():
    cfg = TrackerConfig(max_age=2)
    tracker = Tracker(cfg)
    f, h, g = unit(7), unit(8), unit(9)
    box = person(0, speed=0)
    # Tentative frames are associated on IoU alone: track 1 learns two looks (two prototypes).
    for feat in (f, h, f, f):
        tracker.update(dets([box], feats=[feat]))
    while len(tracker):
        tracker.update(Detections.empty())
    for _ in range(4):  # track 2 reuses the appearance slot, with its own look
        step = tracker.update(dets([box], feats=[g]))
    assert [t.track_id for t in step.tracks] == [2]
    # Someone looking like track 1's second view, at the same place: not track 2.
    step = tracker.update(dets([box], feats=[h]))
    assert [(t.track_id, t.time_since_update) for t in step.tracks] == [(2, 1)]


def _walk_out(exit_outside_frame: bool) -> int:
    """A box walking right out of a 200 px wide frame; returns the frame its track is deleted in."""
    t = Tracker(TrackerConfig(n_init=2, max_age=30, exit_outside_frame=exit_outside_frame))
    for i in range(60):
        x = 100 + 8 * i
        d = dets([[x, 50, x + 40, 130]]) if x + 20 < 200 else dets(np.zeros((0, 4)))
        d.frame_size = (200, 200)
        step = t.update(d)
        if step.deleted:
            return i
    return -1


def test_track_leaving_the_frame_exits_at_once():
    # Last seen with its centre at x=192 (frame 9); the predicted 40 px box is wholly beyond x=200
    # from frame 13 (centre > 220).
    assert _walk_out(True) == 13
    # Without the switch it waits for max_age misses: last seen in frame 9, deleted at the 31st miss.
    assert _walk_out(False) == 40
