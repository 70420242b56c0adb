"""The demo scene: deterministic pixels, exact ground truth, video + MOT gt files, detectable objects."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from edged import cli
from edged.scene import (
    Scene,
    SceneObject,
    SceneSpec,
    Waypoint,
    _sprite,
    default_scene,
    render,
    write_gt,
    write_video,
)
from tests._opencv4_oracle import opencv4_darknet
from tests.conftest import missing, shared_path


def small_scene(seed: int = 0, n_frames: int = 30) -> SceneSpec:
    return default_scene(n_frames=n_frames, size=(320, 240), seed=seed)


def test_default_scene_story():
    spec = default_scene()
    assert (spec.width, spec.height, spec.fps, spec.n_frames) == (640, 480, 10.0, 200)
    assert [o.sprite for o in spec.objects] == ["astronaut", "cameraman", "cat", "cup"]
    persons = [o for o in spec.objects if o.class_name == "person"]
    assert len(persons) >= 2
    for o in persons:
        assert 120 <= o.height <= 250
    tracks = {}
    for i, boxes in Scene(spec).gt():
        for b in boxes:
            tracks.setdefault(b.track_id, []).append((i, b))
    assert set(tracks) == {o.track_id for o in spec.objects}
    for tid, rows in tracks.items():
        frames = [i for i, _ in rows]
        assert frames == list(range(frames[0], frames[-1] + 1)), f"object {tid} disappears mid-path"
        first, last = rows[0][1], rows[-1][1]
        # Enters through the side its path starts beyond and leaves through the opposite side (not
        # appearing or vanishing in the middle).
        path = next(o.path for o in spec.objects if o.track_id == tid)
        from_left = path[0].cx < 0
        assert from_left == (path[-1].cx > spec.width), f"object {tid} must cross the frame"
        if from_left:
            assert (first.x, last.x + last.w) == (0, spec.width), (tid, first, last)
        else:
            assert (first.x + first.w, last.x) == (spec.width, 0), (tid, first, last)
        assert first.visibility < 0.2 and last.visibility < 0.2
        assert max(b.visibility for _, b in rows) == 1.0
    # Some objects are in view at the same time.
    spans = [(rows[0][0], rows[-1][0]) for rows in tracks.values()]
    overlapping = sum(1 for a in spans for b in spans if a < b and a[0] <= b[1] and b[0] <= a[1])
    assert overlapping >= 2
    # One object stops a while: identical boxes on >= 10 consecutive frames.
    longest_stop = 0
    for rows in tracks.values():
        run = 1
        for (_, a), (_, b) in zip(rows, rows[1:]):
            run = run + 1 if a.xyxy == b.xyxy else 1
            longest_stop = max(longest_stop, run)
    assert longest_stop >= 10


def test_same_seed_same_bytes_other_seed_differs():
    a = [img.tobytes() for _, img, _ in render(small_scene(seed=3))]
    b = [img.tobytes() for _, img, _ in render(small_scene(seed=3))]
    c = [img.tobytes() for _, img, _ in render(small_scene(seed=4))]
    assert a == b
    assert a != c
    assert all(img.dtype == np.uint8 and img.shape == (240, 320, 3) for _, img, _ in render(small_scene(n_frames=2)))


def test_gt_is_the_pasted_pixels():
    """Without noise, the pixels inside a fully visible box are the scaled photograph, border excepted."""
    spec = replace(default_scene(), noise_sigma=0.0)
    scene = Scene(spec)
    by_id = {o.track_id: o for o in spec.objects}
    checked = 0
    for i in (40, 70, 100, 130):
        image, boxes = scene.frame(i)
        for b in boxes:
            if b.visibility < 1.0:
                continue
            obj = by_id[b.track_id]
            patch, alpha = _sprite(obj.sprite, obj.height, obj.flip)
            assert (b.w, b.h) == (patch.shape[1], patch.shape[0])
            inner = alpha[:, :, 0] >= 1.0  # the feathered rim is blended with the background
            np.testing.assert_array_equal(image[b.y:b.y + b.h, b.x:b.x + b.w][inner], patch[inner])
            checked += 1
    assert checked >= 4
    # gt from the renderer and from the geometry-only pass agree.
    assert [bx for _, _, bx in Scene(small_scene()).frames()] == [bx for _, bx in Scene(small_scene()).gt()]


def test_visibility_counts_occlusion_and_clipping():
    a = SceneObject(1, "astronaut", 100, (Waypoint(0, 100, 100),))
    b = SceneObject(2, "cat", 60, (Waypoint(0, 100, 100),))  # centred on top of a
    edge = SceneObject(3, "cup", 50, (Waypoint(0, 0, 30),))  # half outside the left edge
    spec = SceneSpec(width=320, height=240, n_frames=1, objects=(a, b, edge))
    _, boxes = Scene(spec).frame(0)
    by = {x.track_id: x for x in boxes}
    wa, ha = _sprite("astronaut", 100, False)[0].shape[1], 100
    wb, hb = _sprite("cat", 60, False)[0].shape[1], 60
    # Both centred on the same point: the cat covers min(widths) x min(heights) of the astronaut.
    assert by[1].visibility == pytest.approx(1 - min(wa, wb) * min(ha, hb) / (wa * ha), abs=2e-2)
    assert by[2].visibility == 1.0
    assert by[3].x == 0 and 0.4 < by[3].visibility < 0.6


def test_bad_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown sprite 'dog'"):
        Scene(SceneSpec(objects=(SceneObject(1, "dog", 50, (Waypoint(0, 1, 1),)),)))
    with pytest.raises(ValueError, match="unique"):
        o = SceneObject(1, "cat", 50, (Waypoint(0, 1, 1),))
        Scene(SceneSpec(objects=(o, o)))
    with pytest.raises(ValueError, match="frame order"):
        Scene(SceneSpec(objects=(SceneObject(1, "cat", 50, (Waypoint(5, 1, 1), Waypoint(2, 1, 1))),)))


def test_write_video_and_gt(tmp_path: Path):
    spec = small_scene(n_frames=20)
    video = write_video(spec, tmp_path / "scene.mp4")
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == 20 and frames[0].shape == (240, 320, 3)
    # Lossy codec, but the decoded frame is close to the rendered one.
    _, first, _ = next(iter(render(spec)))
    assert np.abs(frames[5].astype(int) - Scene(spec).frame(5)[0].astype(int)).mean() < 12

    gt = write_gt(spec, tmp_path / "gt.txt")
    rows = [line.split(",") for line in gt.read_text().splitlines()]
    expected = [(i, b) for i, boxes in Scene(spec).gt() for b in boxes]
    assert len(rows) == len(expected) > 0
    for row, (i, b) in zip(rows, expected):
        assert len(row) == 9
        assert int(row[0]) == i + 1  # MOT frames are 1-based
        assert (int(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5])) == (b.track_id, b.x, b.y, b.w, b.h)
        assert row[6] == "1" and int(row[7]) == b.class_id + 1
    person_ids = {int(r[1]) for r in rows if r[7] == "1"}
    assert person_ids == {o.track_id for o in spec.objects if o.class_name == "person"}


def test_cli_demo_scene(tmp_path: Path, capsys):
    rc = cli.main(["demo-scene", "--out", str(tmp_path / "out"), "--frames", "12", "--size", "160x120", "--seed", "2"])
    assert rc == 0
    out = tmp_path / "out"
    assert (out / "gt.txt").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "12 frames" in printed
    # The file the command reports (.mp4, or .avi where OpenCV cannot write mp4) holds the 12 frames.
    video = Path(printed.split("wrote ", 1)[1].split(" (", 1)[0])
    assert video.parent == out and video.stem == "scene"
    reader = cv2.VideoCapture(str(video))
    assert int(reader.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    reader.release()
    with pytest.raises(SystemExit):
        cli.main(["demo-scene", "--out", str(out), "--size", "big"])
    assert "size must look like 640x480" in capsys.readouterr().err


@pytest.mark.slow
def test_real_yolov3_tiny_sees_the_objects():
    """OpenCV 4 DNN runs the official Darknet YOLOv3-tiny (fp32, 416): every sprite is found as its class.
    (OpenCV 5 has no Darknet importer: OpenCV 4 runs in the oracle venv, tests/_opencv4_oracle.py.)"""
    folder = shared_path("models", "yolov3-tiny")
    with opencv4_darknet(folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights") as net:
        found = _sprites_found(net, (folder / "coco.names").read_text().split("\n"))
    spec = default_scene()
    for o in spec.objects:
        hits, total = found[o.track_id]
        assert total >= 10
        need = 0.9 if o.class_name == "person" else 0.8
        assert hits / total >= need, f"{o.sprite}: {hits}/{total} fully visible frames detected"


def _sprites_found(net, names: list) -> dict:
    layers = net.getUnconnectedOutLayersNames()
    found: dict = {}
    for i, image, boxes in render(default_scene()):
        if i % 2:  # every other frame keeps this test short; the story is the same
            continue
        h, w = image.shape[:2]
        net.setInput(cv2.dnn.blobFromImage(image, 1 / 255.0, (416, 416), swapRB=True, crop=False))
        out = np.vstack(net.forward(layers))
        cls = out[:, 5:].argmax(1)
        score = out[:, 5:].max(1) * out[:, 4]
        xyxy = np.stack([(out[:, 0] - out[:, 2] / 2) * w, (out[:, 1] - out[:, 3] / 2) * h,
                         (out[:, 0] + out[:, 2] / 2) * w, (out[:, 1] + out[:, 3] / 2) * h], 1)
        for b in boxes:
            if b.visibility < 1.0:
                continue
            x1, y1, x2, y2 = b.xyxy
            iw = np.clip(np.minimum(xyxy[:, 2], x2) - np.maximum(xyxy[:, 0], x1), 0, None)
            ih = np.clip(np.minimum(xyxy[:, 3], y2) - np.maximum(xyxy[:, 1], y1), 0, None)
            inter = iw * ih
            iou = inter / ((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) + b.w * b.h - inter)
            ok = (iou >= 0.5) & (score > 0.5) & (np.array(names)[cls] == b.class_name)
            hits, total = found.get(b.track_id, (0, 0))
            found[b.track_id] = (hits + bool(ok.any()), total + 1)
    return found


@pytest.mark.slow
def test_edged_int8_detector_sees_the_persons():
    """The project's default full-int8 YOLOv3-tiny finds both persons on the fully visible frames."""
    from edged.config import DetectorConfig, resolve_path

    model = resolve_path(DetectorConfig().model)
    if not model.is_file():
        missing(f"needs {model} (build it with scripts/build_models.sh)")
    from edged.inference.yolo import YoloDetector

    detector = YoloDetector.from_config(DetectorConfig(classes=["person"], score_threshold=0.3))
    found: dict = {}
    for i, image, boxes in render(default_scene()):
        persons = [b for b in boxes if b.class_name == "person" and b.visibility >= 1.0]
        if i % 2 or not persons:
            continue
        det = detector.detect(image)
        for b in persons:
            x1, y1, x2, y2 = b.xyxy
            d = det.boxes
            inter = (np.clip(np.minimum(d[:, 2], x2) - np.maximum(d[:, 0], x1), 0, None)
                     * np.clip(np.minimum(d[:, 3], y2) - np.maximum(d[:, 1], y1), 0, None))
            iou = inter / ((d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]) + b.w * b.h - inter)
            hits, total = found.get(b.track_id, (0, 0))
            found[b.track_id] = (hits + bool(((iou >= 0.5) & (det.scores > 0.5)).any()), total + 1)
    assert len(found) >= 2
    for track_id, (hits, total) in found.items():
        assert total >= 10 and hits / total >= 0.9, f"person {track_id}: {hits}/{total} frames detected"
