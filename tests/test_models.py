"""The committed models: what edged/models/README.md says about them (sha256, GMAC) is true, and the
lighter YOLOv3-tiny 320 detects people on real video."""

from __future__ import annotations

import hashlib
import re

import cv2
import numpy as np
import pytest

from conftest import ROOT, shared_path
from edged.config import DetectorConfig
from edged.inference import runtime
from edged.inference.yolo import YoloDetector

MODELS = ROOT / "edged" / "models"
DETECTOR_320 = MODELS / "yolov3-tiny-320-int8.tflite"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", ["yolov3-tiny-416-int8.tflite", "yolov3-tiny-320-int8.tflite", "encoder.tflite"])
def test_readme_states_the_sha256_and_size_of_each_model(name):
    readme = (MODELS / "README.md").read_text()
    data = (MODELS / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest in readme, f"edged/models/README.md does not give the sha256 {digest} of {name}"
    sizes = {int(s.replace(",", "").replace(" ", "")) for s in re.findall(r"(\d[\d, ]*\d) bytes", readme)}
    assert len(data) in sizes


def test_320_model_metadata():
    meta = runtime.read_metadata(DETECTOR_320)
    assert meta["input_size"] == [320, 320] and meta["quantization"] == "uint8"
    assert [h["grid"] for h in meta["heads"]] == [[10, 10], [20, 20]]
    # The anchor-mask fix of the official weights, as for the 416 model.
    assert meta["mask_overrides"] == {"1": [1, 2, 3]} and meta["heads"][1]["mask"] == [1, 2, 3]
    assert meta["source"]["weights_sha256"].startswith("dccea06f")


def test_320_model_is_selectable_by_config():
    det = YoloDetector.from_config(DetectorConfig(model="models/yolov3-tiny-320-int8.tflite", input_size=320))
    assert det.input_size == (320, 320) and det.macs == 1_646_438_400


@pytest.mark.slow
def test_320_model_detects_people_on_tud_stadtmitte():
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    gt = np.loadtxt(shared_path("data", "mot15", "TUD-Stadtmitte", "gt", "gt.txt"), delimiter=",", ndmin=2)
    det = YoloDetector(DETECTOR_320, classes=["person"], score_threshold=0.3)
    cap = cv2.VideoCapture(str(video))
    tp = fp = n_gt = index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % 3 == 0:  # every third frame keeps the test short; bench_detector uses all 179
            rows = gt[gt[:, 0] == index + 1]  # video frame i = gt frame i + 1
            boxes = np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1)
            n_gt += len(boxes)
            used = set()
            for box in det.detect(frame).boxes:  # best first, greedy
                ious = [_iou(box, g) if k not in used else 0.0 for k, g in enumerate(boxes)]
                k = int(np.argmax(ious)) if ious else -1
                if k >= 0 and ious[k] >= 0.5:
                    used.add(k)
                    tp += 1
                else:
                    fp += 1
        index += 1
    cap.release()
    assert index == 179 and n_gt > 300
    # Measured on all 179 frames: recall 0.769, precision 0.871 (the 416 model: 0.781 / 0.948).
    assert tp / n_gt > 0.7
    assert tp / (tp + fp) > 0.8
