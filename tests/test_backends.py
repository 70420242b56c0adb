"""The detector seam (edged.inference.backends): the registry behind `detector.backend`, its errors,
and that a backend only runs the network while decoding stays shared. Real models and frames; the
Edge TPU is what this machine lacks, so its path is checked up to the missing library."""

from __future__ import annotations

import ctypes.util
import platform
from pathlib import Path
from typing import List

import numpy as np
import pytest
import yaml

from conftest import ROOT
from edged import exitcodes
from edged.config import ConfigError, DetectorConfig, load_config
from edged.inference import backends, runtime
from edged.inference.backends import TFLiteBackend, canvas_feed
from edged.inference.runtime import DelegateError, ModelError, TensorSpec
from edged.inference.yolo import YoloDetector
from edged.preflight import preflight

DETECTOR = ROOT / "edged" / "models" / "yolov3-tiny-416-int8.tflite"


def _frame() -> np.ndarray:
    from edged.scene import Scene, default_scene

    for index, image, gt in Scene(default_scene(n_frames=60)).frames(20):
        if gt:
            return image
    raise AssertionError("the demo scene has nobody in it")


@pytest.fixture
def no_libedgetpu(monkeypatch):
    if ctypes.util.find_library("edgetpu"):  # installed here: name a library that is not
        monkeypatch.setitem(runtime.EDGETPU_LIBRARY, platform.system(), "libedgetpu-absent.so.1")


def _write_config(tmp_path: Path, detector: dict) -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "capture": {"source": "demo"},
                                    "web": {"enabled": False}, "detector": detector}))
    return path


# ---------------------------------------------------------------------------------------------- registry
def test_registry_knows_tflite_and_edgetpu():
    assert backends.known() == ["edgetpu", "tflite"]
    assert DetectorConfig().backend == "tflite"


def test_unknown_backend_names_the_key_and_the_known_ones():
    with pytest.raises(ValueError) as ei:
        backends.create("onnx", DETECTOR)
    assert str(ei.value) == "detector.backend: unknown detector backend 'onnx'; known backends: edgetpu, tflite"
    with pytest.raises(ValueError, match="known backends: edgetpu, tflite"):
        YoloDetector(DETECTOR, backend="hailo")


def test_config_refuses_an_unknown_backend_with_its_line(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(_write_config(tmp_path, {"threads": 2, "backend": "onnx"}))
    (problem,) = ei.value.problems
    assert problem.startswith("detector.backend (line ") and "known backends: edgetpu, tflite" in problem


def test_old_delegate_key_still_loads_as_backend(tmp_path, caplog):
    for old, new in (("cpu", "tflite"), ("edgetpu", "edgetpu")):
        cfg = load_config(_write_config(tmp_path, {"delegate": old}))
        assert cfg.detector.backend == new
        assert f"detector.delegate: {old} is deprecated, write detector.backend: {new}" in caplog.text
    with pytest.raises(ConfigError, match=r"detector.delegate: 'gpu' is not cpu or edgetpu"):
        load_config(_write_config(tmp_path, {"delegate": "gpu"}))
    with pytest.raises(ConfigError, match=r"contradicts detector.backend"):
        load_config(_write_config(tmp_path, {"delegate": "edgetpu", "backend": "tflite"}))
    assert "delegate" not in DetectorConfig.model_fields


# ---------------------------------------------------------------------------------------------- Edge TPU
def test_edgetpu_backend_without_libedgetpu_is_a_clear_error(no_libedgetpu):
    with pytest.raises(DelegateError) as ei:
        YoloDetector(DETECTOR, backend="edgetpu", edgetpu_device="usb:0")
    msg = str(ei.value)
    assert str(DETECTOR) in msg and "Edge TPU delegate" in msg and "libedgetpu" in msg
    assert "detector.backend: tflite" in msg
    # The old constructor argument takes the same path.
    with pytest.raises(DelegateError):
        YoloDetector(DETECTOR, delegate="edgetpu")


def test_preflight_reports_a_missing_edge_tpu_under_detector_backend(tmp_path, no_libedgetpu):
    path = _write_config(tmp_path, {"backend": "edgetpu"})
    problems = preflight(load_config(path), path)
    assert [(p.key, p.exit_code) for p in problems] == [("detector.backend", exitcodes.CONFIG)]
    assert "libedgetpu" in problems[0].message


# ---------------------------------------------------------------------------------------------- the seam
class ReversedOutputs:
    """A real backend (TFLite underneath) that lists its outputs in the opposite order: heads must be
    found by name, and decoding must not care which backend produced the tensors."""

    def __init__(self, model_path, *, threads: int = 2, edgetpu_device: str = ""):
        self.inner = TFLiteBackend(model_path, threads=threads)
        self.name, self.model_path, self.metadata = "reversed", self.inner.model_path, self.inner.metadata
        self.input_spec, self.macs = self.inner.input_spec, self.inner.macs
        self.output_specs = list(reversed(self.inner.output_specs))
        self.calls = 0

    def run(self, canvas: np.ndarray) -> List[np.ndarray]:
        self.calls += 1
        assert canvas.shape == self.input_spec.shape[1:] and canvas.dtype == np.uint8
        return list(reversed(self.inner.run(canvas)))


def test_a_registered_backend_detects_like_tflite(monkeypatch, tmp_path):
    monkeypatch.setitem(backends.REGISTRY, "reversed", ReversedOutputs)
    cfg = load_config(_write_config(tmp_path, {"backend": "reversed", "classes": []}))
    other = YoloDetector.from_config(cfg.detector, tmp_path / "edged.yaml")
    assert isinstance(other.backend, ReversedOutputs) and isinstance(other.backend, backends.DetectorBackend)
    base = YoloDetector(DETECTOR, classes=None)
    frame = _frame()
    a, b = base.detect(frame), other.detect(frame)
    assert len(a) >= 1 and other.backend.calls == 1
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    assert other.macs == base.macs == 2_782_480_896


def test_lazy_registry_entries(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "lazy", "edged.inference.backends:_tflite")
    assert backends.create("lazy", DETECTOR).macs == 2_782_480_896
    monkeypatch.setitem(backends.REGISTRY, "absent", "edged.inference.backend_absent:make")
    with pytest.raises(ModelError, match=r"detector.backend: absent: cannot load edged.inference.backend_absent:make"):
        backends.create("absent", DETECTOR)


def test_an_incomplete_backend_is_refused(monkeypatch):
    class NoMacs(ReversedOutputs):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            del self.macs

    monkeypatch.setitem(backends.REGISTRY, "incomplete", NoMacs)
    with pytest.raises(ModelError, match=r"detector.backend: incomplete: the backend lacks macs"):
        backends.create("incomplete", DETECTOR)


# ---------------------------------------------------------------------------------------------- input feed
def test_canvas_feed_for_each_input_kind():
    canvas = np.array([[[0, 1, 128], [200, 254, 255]]], np.uint8)  # (1, 2, 3)
    u8 = TensorSpec("u", 0, (1, 1, 2, 3), np.dtype(np.uint8), 1 / 255, 0)
    i8 = TensorSpec("i", 0, (1, 1, 2, 3), np.dtype(np.int8), 1 / 255, -128)
    other = TensorSpec("q", 0, (1, 1, 2, 3), np.dtype(np.uint8), 2 / 255, 10)
    f32 = TensorSpec("f", 0, (1, 1, 2, 3), np.dtype(np.float32), 0.0, 0)
    np.testing.assert_array_equal(canvas_feed(u8)(canvas), canvas[None])
    np.testing.assert_array_equal(canvas_feed(i8)(canvas), (canvas.astype(np.int16) - 128).astype(np.int8)[None])
    assert canvas_feed(other)(canvas).dtype == np.uint8
    np.testing.assert_allclose(canvas_feed(f32)(canvas), canvas[None] / 255.0, rtol=1e-6)
    # What each stores means the same real value, pixel / 255.
    for spec in (u8, i8, other):
        np.testing.assert_allclose(runtime.dequantize(canvas_feed(spec)(canvas), spec), canvas[None] / 255.0, atol=spec.scale / 2 + 1e-7)
