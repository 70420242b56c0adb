"""The committed models: what edged/models/README.md says about them (sha256, GMAC) is true, and the
lighter YOLOv3-tiny 320 detects people on real video."""

from __future__ import annotations

import hashlib
import re

import pytest

from conftest import ROOT
from edged.config import DetectorConfig
from edged.inference import runtime
from edged.inference.yolo import YoloDetector
from tests._detection import tud_recall_precision

MODELS = ROOT / "edged" / "models"
DETECTOR_320 = MODELS / "yolov3-tiny-320-int8.tflite"


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
    det = YoloDetector(DETECTOR_320, classes=["person"], score_threshold=0.3)
    recall, precision, frames, n_gt = tud_recall_precision(det)
    assert frames == 179 and n_gt > 300
    # Measured on all 179 frames: recall 0.769, precision 0.871 (the 416 model: 0.781 / 0.948).
    assert recall > 0.7
    assert precision > 0.8
