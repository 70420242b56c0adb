"""Live changes of running parts (issue 9): tracker parameters, detector post-processing, encoder on/off,
event engine camera name and tracked classes, log level. Real data throughout: the MOT15 TUD-Stadtmitte
detections with appearance features computed by the committed encoder on the real video's crops, the
committed YOLO model on real frames (the demo scene's photographs, a MOT17 frame)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Set, Tuple

import cv2
import numpy as np
import pytest

from edged import logs
from edged.config import DetectorConfig, EventsConfig, TrackerConfig
from edged.events import EventEngine
from edged.inference.encoder import AppearanceEncoder
from edged.inference.yolo import LIVE_KEYS, YoloDetector, split_changes
from edged.tracking import motio
from edged.tracking.tracker import ID, LAST_Z, SLOT, TSU, Tracker
from edged.types import Detections, TrackerStep, TrackSnapshot

from conftest import ROOT, need_module, shared_path
from test_tracker import check_bookkeeping

DETECTOR = ROOT / "edged" / "models" / "yolov3-tiny-416-int8.tflite"
ENCODER = ROOT / "edged" / "models" / "encoder.tflite"
TUD_SIZE = (640, 480)


# ---------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tud() -> Tuple[List[Detections], float]:
    """TUD-Stadtmitte, every frame: the MOT15 detections with the encoder's features of the real crops,
    and the encoder's calibrated appearance gate."""
    rows = motio.load_detections(shared_path("data", "mot15", "TUD-Stadtmitte", "det", "det.txt"))
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    encoder = AppearanceEncoder(ENCODER)
    cap = cv2.VideoCapture(str(video))
    frames = []
    try:
        for number, dets in motio.iter_frames(rows, first=1):
            ok, image = cap.read()  # video frame k = MOT frame k + 1
            assert ok, f"{video}: cannot read frame {number}"
            dets.features = encoder.encode(image, dets.boxes) if len(dets) else None
            dets.frame_size = TUD_SIZE
            frames.append(dets)
    finally:
        cap.release()
    assert len(frames) == 179
    return frames, float(encoder.suggested_max_cosine_distance or 0.2)


def default_cfg(gate: float, **change) -> TrackerConfig:
    return TrackerConfig(**change).resolved(gate)


Change = Callable[[Tracker], None]


def run(frames: List[Detections], cfg: TrackerConfig, changes: Optional[Dict[int, Change]] = None,
        features_off: Tuple[int, int] = (0, 0)) -> Tuple[List[TrackerStep], Tracker]:
    """Track every frame; `changes[i]` runs just before frame i; frames in [features_off) lose their features."""
    tracker = Tracker(cfg)
    steps = []
    for i, dets in enumerate(frames):
        if changes and i in changes:
            changes[i](tracker)
        if features_off[0] <= i < features_off[1]:
            dets = replace(dets, features=None)
        steps.append(tracker.update(dets))
    return steps, tracker


def snap_key(t: TrackSnapshot, with_feature: bool = True) -> tuple:
    feature = None if t.feature is None else np.asarray(t.feature).tobytes()
    return (t.track_id, t.class_id, np.asarray(t.box).tobytes(), t.score, np.asarray(t.velocity).tobytes(),
            t.hits, t.age, t.time_since_update, feature if with_feature else t.feature is None)


def step_key(step: TrackerStep) -> tuple:
    return ([snap_key(t) for t in step.tracks], list(step.confirmed), [snap_key(t) for t in step.deleted])


def ids(step: TrackerStep) -> Set[int]:
    return {t.track_id for t in step.tracks}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# Live switches, each from the default tracker (EMA, 4 prototypes, nn_budget 100); max_age, n_init and
# exit_outside_frame have their own tests (they legitimately end or confirm tracks sooner).
SWITCHES = {
    "scalars": dict(max_iou_distance=0.5, max_cosine_distance=0.2, min_confidence=0.5, gating_threshold=9.4877,
                    gate_position_only=False, matching_cascade=False, motion_weight=0.02, second_association=True,
                    high_score=0.9, low_score=0.3, iou_stage_max_cosine=0.3, nsa_kalman=True),
    "use_appearance off": dict(use_appearance=False),
    "observation_reupdate on": dict(observation_reupdate=True),
    "prototypes 4->1": dict(appearance_prototypes=1),
    "prototypes 4->8": dict(appearance_prototypes=8),
    "EMA -> gallery": dict(feature_ema=0.0),
    "gallery fallback on, budget 3": dict(ema_gallery_fallback=True, nn_budget=3),
    "momentum 0.5": dict(feature_ema=0.5),
}


# ---------------------------------------------------------------------------------------------- tracker
@pytest.mark.parametrize("base", [
    dict(), dict(feature_ema=0.0), dict(ema_gallery_fallback=True, appearance_prototypes=2, nn_budget=10),
    dict(observation_reupdate=True, second_association=True),
], ids=["default", "gallery", "ema+fallback", "reupdate+bytetrack"])
def test_set_config_with_the_same_config_changes_nothing(tud, base):
    frames, gate = tud
    cfg = default_cfg(gate, **base)
    half = len(frames) // 2

    def same(t: Tracker) -> None:
        t.set_config(cfg)
        t.set_config(cfg.model_copy())  # equal, not identical

    plain, _ = run(frames, cfg)
    switched, _ = run(frames, cfg, {half: same})
    assert [step_key(s) for s in switched] == [step_key(s) for s in plain]
    assert sum(len(s.tracks) for s in plain[half:]) > 100  # tracks were live across the call


@pytest.mark.parametrize("name", list(SWITCHES))
def test_set_config_before_the_first_frame_equals_building_with_it(tud, name):
    """Everything derived from the config (gate, appearance memory layout) follows set_config."""
    frames, gate = tud
    target = default_cfg(gate, **SWITCHES[name])
    built, _ = run(frames, target)
    switched, _ = run(frames, default_cfg(gate), {0: lambda t: t.set_config(target)})
    assert [step_key(s) for s in switched] == [step_key(s) for s in built]


@pytest.mark.parametrize("name", list(SWITCHES))
def test_live_switch_keeps_every_track(tud, name):
    frames, gate = tud
    base = default_cfg(gate)
    half = len(frames) // 2
    seen: Dict[str, List[TrackSnapshot]] = {}

    def switch(t: Tracker) -> None:
        seen["before"] = t.live_tracks()
        t.set_config(base.model_copy(update=SWITCHES[name]))
        seen["after"] = t.live_tracks()

    plain, _ = run(frames, base)
    steps, tracker = run(frames, base, {half: switch})
    # The switch itself: same tracks, same Kalman boxes, counters, and appearance known or not.
    assert len(seen["before"]) >= 8
    assert [snap_key(t, False) for t in seen["after"]] == [snap_key(t, False) for t in seen["before"]]
    # The next frame ends no track that the unchanged tracker keeps.
    lost = ids(steps[half - 1]) - ids(steps[half])
    assert lost <= {t.track_id for t in plain[half].deleted}, f"tracks {lost} lost at the switch"
    check_bookkeeping(steps, tracker)


@pytest.mark.parametrize("start, change", [
    (dict(), dict(appearance_prototypes=8)),
    (dict(), dict(ema_gallery_fallback=True)),
    (dict(ema_gallery_fallback=True), dict(ema_gallery_fallback=False)),
    (dict(ema_gallery_fallback=True), dict(nn_budget=2)),
    (dict(feature_ema=0.0), dict(nn_budget=2)),
    (dict(), dict(feature_ema=0.5)),
], ids=["prototypes 4->8", "fallback on", "fallback off", "budget 100->2 (EMA)", "budget 100->2 (gallery)", "momentum"])
def test_appearance_memory_kept_exactly(tud, start, change):
    """Switches that keep each track's representative appearance as it was (snapshots identical)."""
    frames, gate = tud
    base = default_cfg(gate, **start)
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        seen["before"] = t.live_tracks()
        t.set_config(base.model_copy(update=change))
        seen["after"] = t.live_tracks()

    run(frames, base, {half: switch})
    with_feature = [t for t in seen["before"] if t.feature is not None]
    assert len(with_feature) >= 8
    assert [snap_key(t) for t in seen["after"]] == [snap_key(t) for t in seen["before"]]


def test_gallery_to_ema_starts_from_the_mean_feature(tud):
    frames, gate = tud
    base = default_cfg(gate, feature_ema=0.0)  # the original: gallery + mean feature as the snapshot
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        seen["before"] = t.live_tracks()
        t.set_config(base.model_copy(update={"feature_ema": 0.9, "appearance_prototypes": 3}))
        seen["after"] = t.live_tracks()

    steps, tracker = run(frames, base, {half: switch})
    pairs = [(a.feature, b.feature) for a, b in zip(seen["before"], seen["after"]) if a.feature is not None]
    assert len(pairs) >= 8 and all(b is not None for _, b in pairs)
    assert min(cosine(a, b) for a, b in pairs) > 0.9999
    check_bookkeeping(steps, tracker)


def _slots(tracker: Tracker) -> Dict[int, int]:
    return {int(r[ID]): int(r[SLOT]) for r in tracker.state}


def test_fewer_prototypes_keep_the_most_recent(tud):
    frames, gate = tud
    base = default_cfg(gate)  # 4 prototypes
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        slots = _slots(t)
        seen["before"] = {i: (t._ema[s].copy(), t._proto_stamp[s].copy()) for i, s in slots.items()}
        t.set_config(base.model_copy(update={"appearance_prototypes": 2}))
        seen["after"] = {i: t._ema[s].copy() for i, s in slots.items()}

    run(frames, base, {half: switch})
    several = 0
    for tid, (protos, stamps) in seen["before"].items():
        recent = np.sort(np.argsort(-stamps, kind="stable")[:2])  # kept in their order
        assert np.array_equal(seen["after"][tid], protos[recent]), f"track {tid}"
        several += int((stamps > 0).sum() > 2)
    assert several >= 1  # some track really had more than 2 prototypes to choose from


@pytest.mark.parametrize("budget", [3, 150])
def test_new_nn_budget_keeps_the_most_recent_features(tud, budget):
    frames, gate = tud
    base = default_cfg(gate, feature_ema=0.0, nn_budget=40)  # 40 < the frames most tracks have lived
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        slots = _slots(t)
        # Each slot's features in the order written, from the ring buffer.
        old = t._gallery.shape[1]
        seen["before"] = {i: t._gallery[s][np.arange(t._gallery_pos[s] - min(t._gallery_pos[s], old), t._gallery_pos[s]) % old].copy()
                          for i, s in slots.items()}
        t.set_config(base.model_copy(update={"nn_budget": budget}))
        seen["after"] = {i: t._gallery[s, : t._gallery_pos[s]].copy() for i, s in slots.items()}
        seen["shape"] = t._gallery.shape

    steps, tracker = run(frames, base, {half: switch})
    assert seen["shape"][1] == budget
    assert any(len(f) == 40 for f in seen["before"].values())  # full, wrapped rings
    for tid, feats in seen["before"].items():
        assert np.array_equal(seen["after"][tid], feats[-budget:]), f"track {tid}"
    check_bookkeeping(steps, tracker)


def test_ema_to_gallery_keeps_every_prototype_as_a_gallery_view(tud):
    frames, gate = tud
    base = default_cfg(gate)
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        slots = _slots(t)
        seen["before"] = {i: t._ema[s][t._feature_count[s] > 0].copy() for i, s in slots.items()}
        t.set_config(base.model_copy(update={"feature_ema": 0.0, "nn_budget": 50}))
        # Nearest gallery view of each former prototype: the prototype itself.
        seen["distance"] = {i: t._nn_distance(np.full(len(p), slots[i]), p) for i, p in seen["before"].items() if len(p)}
        seen["after"] = t.live_tracks()

    steps, tracker = run(frames, base, {half: switch})
    assert sum(len(p) for p in seen["before"].values()) > len(seen["before"])  # several prototypes per track
    assert max(float(d.max()) for d in seen["distance"].values()) < 1e-5
    assert all(t.feature is not None for t in seen["after"])
    check_bookkeeping(steps, tracker)


def test_smaller_max_age_deletes_missed_tracks_sooner(tud):
    frames, gate = tud
    base = default_cfg(gate)  # max_age 70
    half = len(frames) // 2
    plain, _ = run(frames, base)
    steps, tracker = run(frames, base, {half: lambda t: t.set_config(base.model_copy(update={"max_age": 5}))})
    coasting = {t.track_id for t in steps[half - 1].tracks if t.time_since_update >= 5}
    assert coasting, "needs tracks missed for 5+ frames at the switch"
    assert max(t.time_since_update for s in plain[half:] for t in s.tracks) > 5  # the old max_age keeps them
    # At the next update they are gone (reported deleted, with exits downstream), and from then on no
    # track coasts more than 5 frames; every later deletion is at exactly 6 misses.
    assert coasting <= {t.track_id for t in steps[half].deleted}
    assert all(t.time_since_update <= 5 for s in steps[half:] for t in s.tracks)
    later = [t.time_since_update for s in steps[half + 1:] for t in s.deleted]
    assert later and set(later) == {6}
    check_bookkeeping(steps, tracker)


def test_exit_outside_frame_switched_on_ends_tracks_predicted_out(tud):
    frames, gate = tud
    base = default_cfg(gate)
    half = len(frames) // 2
    plain, _ = run(frames, base)
    steps, tracker = run(frames, base, {half: lambda t: t.set_config(base.model_copy(update={"exit_outside_frame": True}))})
    w, h = TUD_SIZE
    out = {t.track_id for t in steps[half - 1].tracks if t.time_since_update > 0
           and (t.box[2] + t.velocity[0] < 0 or t.box[0] + t.velocity[0] > w)}
    assert out, "needs a missed track predicted out of the frame at the switch"
    assert out <= {t.track_id for t in steps[half].deleted}
    assert not out & {t.track_id for t in plain[half].deleted}  # the unchanged tracker keeps them
    check_bookkeeping(steps, tracker)


def refound_after_misses(steps: List[TrackerStep], start: int) -> Set[int]:
    """Tracks matched again after two or more missed frames, from frame `start` on (only the first,
    appearance stage can do that: the IoU stages take tracks missed in the previous frame only)."""
    found = set()
    for prev, cur in zip(steps[start - 1:], steps[start:]):
        missed = {t.track_id for t in prev.tracks if t.time_since_update >= 2}
        found |= {t.track_id for t in cur.tracks if t.track_id in missed and t.time_since_update == 0}
    return found


def test_a_tighter_gate_stops_re_finding_missed_tracks(tud):
    frames, gate = tud
    base = default_cfg(gate)
    half = len(frames) // 2
    plain, _ = run(frames, base)
    tight = base.model_copy(update={"gating_threshold": 1e-3})
    steps, tracker = run(frames, base, {half: lambda t: t.set_config(tight)})
    assert refound_after_misses(plain, half)
    assert not refound_after_misses(steps, half)
    check_bookkeeping(steps, tracker)


def test_larger_max_age_keeps_missed_tracks_longer(tud):
    frames, gate = tud
    base = default_cfg(gate, max_age=20)
    half = len(frames) // 2
    plain, _ = run(frames, base)
    steps, _ = run(frames, base, {half: lambda t: t.set_config(base.model_copy(update={"max_age": 200}))})
    assert any(s.deleted for s in plain[half:])
    assert not any(s.deleted for s in steps[half:])


@pytest.mark.parametrize("n_init", [2, 6])
def test_n_init_change_applies_to_confirmations(tud, n_init):
    frames, gate = tud
    base = default_cfg(gate)  # n_init 3
    half = len(frames) // 4

    def hits_at_confirmation(steps: List[TrackerStep]) -> List[int]:
        return [t.hits for s in steps for t in s.tracks if t.track_id in s.confirmed]

    plain, _ = run(frames, base)
    steps, tracker = run(frames, base, {half: lambda t: t.set_config(base.model_copy(update={"n_init": n_init}))})
    assert set(hits_at_confirmation(plain[half + 1:])) == {3}
    confirmed = hits_at_confirmation(steps[half + 1:])
    assert len(confirmed) >= 2 and set(confirmed) == {n_init}
    check_bookkeeping(steps, tracker)


def test_observation_reupdate_switched_on_starts_from_the_last_match(tud):
    frames, gate = tud
    base = default_cfg(gate)  # observation_reupdate off: the last-observation columns are not kept
    half = len(frames) // 2
    seen = {}

    def switch(t: Tracker) -> None:
        t.set_config(base.model_copy(update={"observation_reupdate": True}))
        seen["last_z"] = {int(r[ID]): (r[LAST_Z].copy(), int(r[TSU])) for r in t.state}

    steps, tracker = run(frames, base, {half: switch})
    # The Kalman box right after each track's last match, from the history of outputs.
    last_box = {}
    for s in steps[:half]:
        for t in s.tracks:
            if t.time_since_update == 0:
                last_box[t.track_id] = np.asarray(t.box, np.float64)
    checked = missed = 0
    for tid, (z, tsu) in seen["last_z"].items():
        if tid not in last_box:
            continue  # tentative
        x1, y1, x2, y2 = last_box[tid]
        expected = [(x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / (y2 - y1), y2 - y1]
        np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6, err_msg=f"track {tid}")
        checked += 1
        missed += tsu > 0
    assert checked >= 8 and missed >= 2  # both matched and coasting tracks were seeded
    check_bookkeeping(steps, tracker)


def test_switching_appearance_layouts_every_few_frames(tud):
    """Safe between any two frames: cycling through memory layouts never drops a track (every deletion is
    a max_age one) nor breaks the bookkeeping."""
    frames, gate = tud
    layouts = [dict(appearance_prototypes=1), dict(feature_ema=0.0, nn_budget=3), dict(appearance_prototypes=8),
               dict(ema_gallery_fallback=True, nn_budget=100), dict(feature_ema=0.0, nn_budget=50),
               dict(ema_gallery_fallback=True, nn_budget=2, appearance_prototypes=3), dict()]
    base = default_cfg(gate, max_age=10)
    changes = {i: (lambda t, c=layouts[k % len(layouts)]: t.set_config(base.model_copy(update=c)))
               for k, i in enumerate(range(5, len(frames), 3))}
    steps, tracker = run(frames, base, changes)
    deleted = [t.time_since_update for s in steps for t in s.deleted]
    assert deleted and set(deleted) == {11}
    check_bookkeeping(steps, tracker)


def test_set_config_refuses_an_unresolved_or_foreign_config():
    tracker = Tracker()
    with pytest.raises(ValueError, match="tracker.max_cosine_distance"):
        tracker.set_config(TrackerConfig())
    with pytest.raises(TypeError, match="TrackerConfig"):
        tracker.set_config({"max_age": 5})  # type: ignore[arg-type]
    assert tracker.cfg == TrackerConfig().resolved()


# ---------------------------------------------------------------------------------------------- encoder on/off
def test_encoder_off_for_a_stretch_and_back_on(tud):
    frames, gate = tud
    cfg = default_cfg(gate)
    off, on = 60, 120
    plain, _ = run(frames, cfg)
    steps, tracker = run(frames, cfg, features_off=(off, on))
    for at in (off, on):
        lost = ids(steps[at - 1]) - ids(steps[at])
        assert not lost - {t.track_id for t in plain[at].deleted}, f"tracks {lost} lost when the encoder switched at {at}"
    born_blind = {t.track_id for s in steps[off:on] for t in s.tracks} - ids(steps[off - 1])
    assert born_blind and all(t.feature is None for s in steps[off:on] for t in s.tracks if t.track_id in born_blind)
    # Back on: every track matched again learns its appearance.
    matched = [t for s in steps[on:] for t in s.tracks if t.time_since_update == 0]
    assert matched and all(t.feature is not None for t in matched)
    assert {t.track_id for t in matched} & born_blind
    # A track born without features and missed when they came back is still found again (on IoU, as
    # without features): without that it could never be matched again.
    blind_coasting = {t.track_id for t in steps[on - 1].tracks if t.track_id in born_blind and t.time_since_update > 1}
    found = {t.track_id for s in steps[on:] for t in s.tracks if t.track_id in blind_coasting and t.time_since_update == 0}
    assert found, f"none of the featureless missed tracks {blind_coasting} was found again"
    check_bookkeeping(steps, tracker)


def test_encoder_switched_on_for_the_first_time_mid_run(tud):
    frames, gate = tud
    on = len(frames) // 2
    steps, tracker = run(frames, default_cfg(gate), features_off=(0, on))
    assert len(steps[on - 1].tracks) >= 8 and all(t.feature is None for t in steps[on - 1].tracks)
    assert ids(steps[on - 1]) - ids(steps[on]) <= {t.track_id for t in steps[on].deleted}
    assert not {t.track_id for t in steps[on].deleted}
    assert all(t.feature is not None for s in steps[on:] for t in s.tracks if t.time_since_update == 0)
    check_bookkeeping(steps, tracker)


def learned_part(dets: Detections) -> Detections:
    """The same crops described by another encoder: the learned 1024-d part alone (no colour histogram)."""
    if dets.features is None:
        return dets
    f = dets.features[:, :1024]
    return replace(dets, features=f / np.linalg.norm(f, axis=1, keepdims=True))


@pytest.mark.parametrize("explicit", [False, True], ids=["dimension change", "forget_appearance"])
def test_encoder_model_changed_mid_run(tud, explicit):
    frames, gate = tud
    half = len(frames) // 2
    seen = {}

    def swap(t: Tracker) -> None:
        if explicit:
            t.forget_appearance()
            seen["after"] = t.live_tracks()

    other = frames[:half] + [learned_part(d) for d in frames[half:]]
    steps, tracker = run(other, default_cfg(gate), {half: swap})
    assert ids(steps[half - 1]) - ids(steps[half]) <= {t.track_id for t in steps[half].deleted}
    if explicit:
        assert seen["after"] and all(t.feature is None for t in seen["after"])
    assert all(t.feature is not None and t.feature.shape == (1120,) for t in steps[half - 1].tracks if t.time_since_update == 0)
    matched = [t for s in steps[half:] for t in s.tracks if t.time_since_update == 0]
    assert len(matched) > 100 and all(t.feature is not None and t.feature.shape == (1024,) for t in matched)
    check_bookkeeping(steps, tracker)


# ---------------------------------------------------------------------------------------------- detector
@pytest.fixture(scope="module")
def scene_frames() -> Dict[int, np.ndarray]:
    """Demo-scene frames: 90 a person and a cup, 150 a person (scored ~0.5) and a cat."""
    need_module("skimage")
    from edged.scene import Scene, default_scene

    scene = Scene(default_scene())
    return {i: scene.frame(i)[0] for i in (90, 150)}


def names(detector: YoloDetector, dets: Detections) -> List[str]:
    return sorted(detector.class_names[c] for c in dets.class_ids)


def same_detections(a: Detections, b: Detections) -> bool:
    return all(np.array_equal(x, y) for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.class_ids, b.class_ids)))


def test_detector_class_filter_changes_live(scene_frames):
    detector = YoloDetector(DETECTOR, classes=["person"])
    image = scene_frames[150]
    assert names(detector, detector.detect(image)) == ["person"]
    detector.configure(classes=["person", "cat"])
    assert names(detector, detector.detect(image)) == ["cat", "person"]
    assert detector.classes == ["person", "cat"]
    detector.configure(classes=["cat"])
    assert names(detector, detector.detect(image)) == ["cat"]
    detector.configure(classes=[])  # every class
    assert names(detector, detector.detect(scene_frames[90])) == ["cup", "person"]


def test_detector_threshold_changes_live_like_a_new_detector(scene_frames):
    detector = YoloDetector(DETECTOR, classes=["person", "cat"], score_threshold=0.3)
    image = scene_frames[150]
    low = detector.detect(image)
    assert names(detector, low) == ["cat", "person"] and float(low.scores.min()) < 0.6
    detector.configure(score_threshold=0.6)
    high = detector.detect(image)
    assert names(detector, high) == ["cat"]
    assert same_detections(high, YoloDetector(DETECTOR, classes=["person", "cat"], score_threshold=0.6).detect(image))
    detector.configure(score_threshold=0.3)
    assert same_detections(detector.detect(image), low)


def test_detector_threshold_nms_and_cap_on_a_real_crowd():
    image = cv2.imread(str(shared_path("data", "MOT17-mini", "MOT17-04-FRCNN", "img1", "000001.jpg")))
    detector = YoloDetector(DETECTOR, classes=["person"], score_threshold=0.1)
    low = detector.detect(image)
    for change in (dict(score_threshold=0.5), dict(nms_iou=0.2), dict(max_detections=3),
                   dict(score_threshold=0.2, nms_iou=0.6, max_detections=7)):
        detector.configure(**change)
        fresh = YoloDetector(DETECTOR, classes=["person"], **{"score_threshold": 0.1, **change})
        got = detector.detect(image)
        assert same_detections(got, fresh.detect(image)), change
        assert len(got) < len(low), change
        detector.configure(score_threshold=0.1, nms_iou=0.45, max_detections=100)
    assert same_detections(detector.detect(image), low)


@pytest.mark.parametrize("change, key", [
    (dict(classes=["persn"]), "detector.classes"),
    (dict(score_threshold=1.5), "detector.score_threshold"),
    (dict(score_threshold=float("nan")), "detector.score_threshold"),
    (dict(nms_iou=0.0), "detector.nms_iou"),
    (dict(max_detections=0), "detector.max_detections"),
    (dict(score_threshold=0.9, classes=["person", "unicorn"]), "detector.classes"),
])
def test_detector_bad_live_values_change_nothing(scene_frames, change, key):
    detector = YoloDetector(DETECTOR, classes=["person", "cat"])
    before = detector.detect(scene_frames[150])
    with pytest.raises(ValueError, match=key):
        detector.configure(**change)
    assert detector.score_threshold == 0.3 and detector.classes == ["person", "cat"]
    assert same_detections(detector.detect(scene_frames[150]), before)


def test_split_changes_names_what_needs_a_rebuild():
    old = DetectorConfig()
    live, rebuild = split_changes(old, old.model_copy(update={"score_threshold": 0.5, "classes": ["cat"]}))
    assert live == {"score_threshold": 0.5, "classes": ["cat"]} and rebuild == []
    live, rebuild = split_changes(old, old.model_copy(update={"model": "other.tflite", "threads": 1, "nms_iou": 0.5}))
    assert live == {"nms_iou": 0.5} and rebuild == ["model", "threads"]
    assert split_changes(old, old.model_copy()) == ({}, [])
    assert set(LIVE_KEYS) < set(DetectorConfig.model_fields)


# ---------------------------------------------------------------------------------------------- events
def tracked_run(frames: List[Detections], engine_changes: Dict[int, Callable[[EventEngine], None]]) -> Tuple[List[List[dict]], EventEngine]:
    """TUD-Stadtmitte through a real tracker and an event engine; per-frame records."""
    tracker = Tracker(TrackerConfig().resolved(0.12))
    engine = EventEngine(EventsConfig(), device_id="dev", camera="cam-a", class_names=["person", "car"],
                         frame_size=TUD_SIZE, fps=25.0, track_classes=["person"])
    out = []
    for i, dets in enumerate(frames):
        if i in engine_changes:
            engine_changes[i](engine)
        step = tracker.update(dets)
        out.append(engine.process(step, frame_index=i, timestamp=1.7e9 + i / 25, stream_time=i / 25))
    return out, engine


def test_camera_renamed_live(tud):
    frames, _ = tud
    half = len(frames) // 2
    seen = {}

    def rename(engine: EventEngine) -> None:
        seen["live"], seen["version"] = engine.live_track_ids(), engine.state_version
        engine.set_camera("cam-b")
        seen["state"] = engine.state()
        seen["version_after"] = engine.state_version

    plain, _ = tracked_run(frames, {})
    records, engine = tracked_run(frames, {half: rename})
    assert {r["camera"] for rs in records[:half] for r in rs} == {"cam-a"}
    assert {r["camera"] for rs in records[half:] for r in rs} == {"cam-b"}
    assert seen["state"]["camera"] == "cam-b" and seen["version_after"] > seen["version"]
    assert len(seen["live"]) >= 5 and engine.live_track_ids()
    # Only the camera differs: the same enters and exits, for the same tracks (no churn at the rename).
    def strip(rs):
        return [(r["type"], r["track_id"], r["frame"]) for r in rs]
    assert [strip(rs) for rs in records] == [strip(rs) for rs in plain]
    with pytest.raises(ValueError, match="capture.name"):
        engine.set_camera("cam b")
    assert engine.camera == "cam-b"


def test_track_classes_changed_live(tud):
    frames, _ = tud
    half = len(frames) // 2
    seen = {}

    def reclass(engine: EventEngine) -> None:
        seen["before"] = engine.state()
        engine.set_track_classes(["person", "car"])
        seen["after"] = engine.state()
        version = engine.state_version
        engine.set_track_classes(["person", "car"])  # unchanged: no new state to publish
        seen["same_version"] = engine.state_version == version

    records, engine = tracked_run(frames, {half: reclass})
    before, after = seen["before"], seen["after"]
    assert before["classes"] == {"person": before["total"]} and before["total"] >= 5
    assert after["classes"] == {"person": before["total"], "car": 0} and after["total"] == before["total"]
    assert seen["same_version"]
    entered = [r["track_id"] for rs in records for r in rs if r["type"] == "enter"]
    assert len(entered) == len(set(entered))  # no track entered twice
    with pytest.raises(ValueError, match=r"detector.classes \['bus'\]"):
        engine.set_track_classes(["person", "bus"])
    assert engine.track_classes == ["person", "car"]


# ---------------------------------------------------------------------------------------------- logging
def test_log_level_changes_live(caplog):
    root = logging.getLogger()
    saved = root.level
    log = logging.getLogger("edged.test_live")
    try:
        logs.set_level("warning")
        log.info("hidden")
        logs.set_level("debug")
        log.debug("shown")
        assert [r.getMessage() for r in caplog.records if r.name == "edged.test_live"] == ["shown"]
        with pytest.raises(ValueError, match="logging.level"):
            logs.set_level("verbose")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(saved)
