"""edged.pipeline without threads, models or a broker: real frames of the demo scene, detections
recorded from its ground truth, the real tracker and events engine, a list-collecting sink."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import pytest

from edged.config import EventsConfig, TrackerConfig, ZoneConfig
from edged.events import EventEngine
from edged.pipeline import CommandQueue, Pipeline
from edged.tracking.tracker import Tracker
from edged.types import Detections, Frame
from tests.conftest import need_module


COCO = ["person"] + [f"c{i}" for i in range(1, 80)]
COCO[15], COCO[41] = "cat", "cup"


class ListSink:
    def __init__(self) -> None:
        self.events: List[dict] = []
        self.states: List[dict] = []
        self.fail_next = 0  # refuse this many emits (a broken outbox)
        self.refused = 0

    def emit(self, events: List[dict], state: Optional[dict]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            self.refused += 1
            raise OSError("disk I/O error (injected)")
        self.events.extend(events)
        if state is not None:
            self.states.append(state)


class GroundTruthDetector:
    """Detections recorded from the scene's ground truth, looked up by frame index."""

    def __init__(self, by_frame: Dict[int, Detections]):
        self.by_frame = by_frame
        self.calls = 0

    def detect_frame(self, frame: Frame) -> Detections:
        self.calls += 1
        d = self.by_frame.get(frame.index)
        return Detections.empty() if d is None else d.subset(np.arange(len(d)))


class ListSource:
    def __init__(self, frames: List[Frame]):
        self.frames = list(frames)

    def get(self, timeout: Optional[float] = None) -> Optional[Frame]:
        return self.frames.pop(0) if self.frames else None

    @property
    def finished(self) -> bool:
        return not self.frames


@pytest.fixture(scope="module")
def scene_frames():
    need_module("skimage")
    from edged.scene import Scene, default_scene

    scene = Scene(default_scene(n_frames=120))
    frames, dets = [], {}
    for i, image, gt in scene.frames():
        frames.append(Frame(image=image, index=i, timestamp=1_800_000_000.0 + i / 10, stream_time=i / 10))
        seen = [g for g in gt if g.visibility > 0.3]
        boxes = np.array([[g.x, g.y, g.x + g.w, g.y + g.h] for g in seen], np.float32).reshape(-1, 4)
        dets[i] = Detections(boxes, np.full(len(seen), 0.9, np.float32), np.array([g.class_id for g in seen], np.int32))
    return frames, dets, Counter(o.class_name for o in scene.spec.objects)


def _pipeline(frames, dets, sink, events_cfg=None, **kw) -> Pipeline:
    def make_engine(frame, fps):
        return EventEngine(events_cfg or EventsConfig(), device_id="t", camera="cam0", class_names=COCO,
                           frame_size=frame.size, fps=fps, track_classes=["person", "cat", "cup"])

    return Pipeline(source=ListSource(frames), detector=GroundTruthDetector(dets),
                    tracker=Tracker(TrackerConfig(use_appearance=False)), make_engine=make_engine, sink=sink,
                    source_fps=lambda: 10.0, **kw)


def _lifecycle(events: List[dict]) -> Counter:
    entered, exited = {}, set()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "seq strictly increasing, no repeats"
    for e in events:
        if e["type"] == "enter":
            assert e["track_id"] not in entered
            entered[e["track_id"]] = e["class"]
        elif e["type"] == "exit":
            assert e["track_id"] in entered and e["track_id"] not in exited
            exited.add(e["track_id"])
    assert set(entered) == exited
    return Counter(entered.values())


def test_frames_through_both_stages_give_one_enter_and_exit_per_object(scene_frames):
    frames, dets, truth = scene_frames
    sink = ListSink()
    p = _pipeline(frames, dets, sink)
    for f in frames:
        p.process(f)
    p.finish()
    assert _lifecycle(sink.events) == truth
    assert sink.states and sink.states[-1]["total"] == 0  # the final state after the shutdown exits
    assert p.counters.frames_processed == len(frames) and p.counters.events == len(sink.events)
    frame, tracks, _ = p.latest()
    assert frame.index == frames[-1].index


def test_a_refusing_sink_loses_nothing_and_keeps_order(scene_frames):
    frames, dets, _ = scene_frames
    reference = ListSink()
    p = _pipeline(frames, dets, reference)
    for f in frames:
        p.process(f)
    p.finish()

    sink = ListSink()
    p = _pipeline(frames, dets, sink)
    failures = 0
    for f in frames:
        if f.index in (12, 40, 41):
            sink.fail_next = 1
        try:
            p.process(f)
        except OSError:
            failures += 1
    p.finish()
    assert failures == 3 and sink.refused == 3
    strip = lambda evs: [{k: v for k, v in e.items() if k not in ("event_id", "ts")} for e in evs]  # noqa: E731
    assert strip(sink.events) == strip(reference.events)
    assert p.undelivered == 0


def test_commands_run_between_frames_on_the_owning_stage(scene_frames):
    frames, dets, truth = scene_frames
    sink = ListSink()
    p = _pipeline(frames, dets, sink)
    half = len(frames) // 2
    for f in frames[:half]:
        p.process(f)
    live_before = {t.track_id for t in p.tracker.live_tracks()}
    assert live_before, "the scene has objects in view at half time"
    whole_frame = EventsConfig(zones=[ZoneConfig(name="all", polygon=[(0, 0), (1, 0), (1, 1), (0, 1)])])
    ran_on: List[str] = []

    def apply_zone():
        ran_on.append(threading.current_thread().name)
        return p.engine.set_config(whole_frame)

    cmd = p.tracking_commands.submit("events", apply_zone)
    assert not cmd.done  # nothing runs until the stage reaches the next frame
    n_before = len(sink.events)
    p.process(frames[half])
    assert cmd.done and cmd.error is None and ran_on == [threading.current_thread().name]
    later = sink.events[n_before:]
    # The new zone produces zone events for tracks already live, without exit/enter churn.
    assert any(e["type"] == "zone_enter" and e["zone"] == "all" for e in later)
    for f in frames[half + 1:]:
        p.process(f)
    p.finish()
    assert _lifecycle(sink.events) == truth  # still exactly one enter and exit per object


def test_a_failing_command_is_reported_and_the_stage_keeps_going(scene_frames):
    frames, dets, _ = scene_frames
    sink = ListSink()
    p = _pipeline(frames[:5], dets, sink)

    def broken():
        raise ValueError("no such model")

    cmd = p.inference_commands.submit("detector", broken)
    p.process(frames[0])
    assert cmd.done and isinstance(cmd.error, ValueError)
    with pytest.raises(ValueError):
        cmd.result()
    p.process(frames[1])
    assert p.counters.frames_processed == 2


def test_stage_loops_drive_the_same_way_and_resume_after_a_failure(scene_frames):
    """The loops the daemon runs in threads, here on one thread: inference fills the hand-off,
    tracking drains it; a sink failure ends the tracking loop (the supervisor would restart it) and
    calling it again delivers everything."""
    frames, dets, truth = scene_frames
    sink = ListSink()
    p = _pipeline(frames, dets, sink, handoff_size=len(frames) + 1)
    stop = threading.Event()
    p.run_inference(stop)
    assert p.inference_done and p.counters.frames_in == len(frames)
    sink.fail_next = 1
    with pytest.raises(OSError):
        p.run_tracking(stop)
    assert not p.tracking_done
    p.run_tracking(stop)  # the restart
    assert p.tracking_done and p.counters.frames_processed == len(frames)
    p.finish()
    assert _lifecycle(sink.events) == truth


def test_max_frames_ends_the_stream(scene_frames):
    frames, dets, _ = scene_frames
    sink = ListSink()
    p = _pipeline(frames, dets, sink, handoff_size=64, max_frames=7)
    stop = threading.Event()
    p.run_inference(stop)
    p.run_tracking(stop)
    assert p.tracking_done and p.counters.frames_processed == 7


def test_command_queue_runs_in_order_and_counts():
    q = CommandQueue()
    order: List[int] = []
    cmds = [q.submit(f"c{i}", lambda i=i: order.append(i) or i) for i in range(3)]
    assert len(q) == 3 and q.run_pending() == 3 and len(q) == 0
    assert order == [0, 1, 2] and [c.result() for c in cmds] == [0, 1, 2]
    with pytest.raises(RuntimeError):
        q.submit("late", lambda: None).result()


class PlanningDetector(GroundTruthDetector):
    """Like the motion-gated detector, plans from the live tracks: records the frame of the track view
    it was given for each frame it detected."""

    plans_from_tracks = True

    def __init__(self, by_frame, fail_on: int = -1):
        super().__init__(by_frame)
        self.pipeline: Optional[Pipeline] = None
        self.view_of: Dict[int, int] = {}
        self.fail_on = fail_on

    def detect_frame(self, frame: Frame) -> Detections:
        view = self.pipeline.track_view()
        if frame.index == self.fail_on:
            raise RuntimeError("detection failed (injected)")
        self.view_of[frame.index] = view.frame_index
        found = super().detect_frame(frame)
        if frame.index % 8 == 0 or not len(found):
            return found  # a whole-frame look now and then
        # Otherwise only near the tracks (what the tracker gets depends on the view it was planned on).
        near = view.at(frame.index)
        cx, cy = (found.boxes[:, 0] + found.boxes[:, 2]) / 2, (found.boxes[:, 1] + found.boxes[:, 3]) / 2
        keep = ((cx[:, None] > near[:, 0] - 20) & (cx[:, None] < near[:, 2] + 20)
                & (cy[:, None] > near[:, 1] - 20) & (cy[:, None] < near[:, 3] + 20)).any(axis=1)
        return found.subset(np.flatnonzero(keep))


def _threaded_run(p: Pipeline) -> None:
    """The two stage loops on their own threads, as the daemon runs them; the tracking loop restarted
    after a failure as the supervisor would."""
    stop = threading.Event()

    def tracking():
        while not p.tracking_done:
            try:
                p.run_tracking(stop)
            except RuntimeError:
                continue

    def inference():
        while not p.inference_done:
            try:
                p.run_inference(stop)
            except RuntimeError:
                continue

    threads = [threading.Thread(target=inference), threading.Thread(target=tracking)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("fail_in", ["nothing", "tracking", "detection"])
def test_a_planning_detector_sees_the_tracks_as_of_the_previous_frame(scene_frames, threaded, fail_in):
    """Threads or not, a detector that plans from the tracks plans frame N on the tracks as updated on
    frame N - 1, so the daemon tracks exactly as synchronous driving does; a frame whose tracking
    stage failed (after the tracker took it) or whose detection failed does not make detection wait."""
    frames, dets, _ = scene_frames

    fail_on = 5

    def observe(frame, step, detections):
        if fail_in == "tracking" and frame.index == fail_on:
            raise RuntimeError("tracking failed (injected)")

    detector = PlanningDetector(dets, fail_on if fail_in == "detection" else -1)
    p = _pipeline(frames, dets, ListSink(), observers=[observe])
    detector.pipeline = p
    p.detector = detector
    if threaded:
        _threaded_run(p)
    else:
        for frame in frames:
            try:
                p.process(frame)
            except RuntimeError:
                pass
    want = {f.index: max(f.index - 1, -1) for f in frames}
    if fail_in == "detection":  # frame 5 was never tracked: frame 6 plans on frame 4's tracks
        del want[fail_on]
        want[fail_on + 1] = fail_on - 1
    assert detector.view_of == want
    assert p.counters.stale_track_views == 0
    assert p.counters.frames_processed == len(frames) - (0 if fail_in == "nothing" else 1)


def test_threads_do_not_change_what_is_tracked(scene_frames):
    """The same frames, synchronously and on the daemon's two threads: the same tracks on every frame."""
    runs = []
    for threaded in (False, True):
        frames, dets, _ = scene_frames
        detector = PlanningDetector(dets)
        p = _pipeline(frames, dets, ListSink())
        detector.pipeline = p
        p.detector = detector
        by_frame: Dict[int, list] = {}
        p.observers.append(lambda frame, step, _d: by_frame.update(
            {frame.index: sorted((t.track_id, tuple(np.round(t.box, 3))) for t in step.tracks)}))
        if threaded:
            _threaded_run(p)
        else:
            for frame in frames:
                p.process(frame)
        runs.append(by_frame)
    assert runs[0] == runs[1] and len(runs[0]) == len(scene_frames[0])
