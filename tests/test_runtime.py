"""TFLite runtime layer: loading, tensor specs, (de)quantization, embedded metadata, bad model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.inference import runtime
from edged.inference.runtime import ModelError, TensorSpec

from conftest import need_module, shared_path

ROOT = Path(__file__).resolve().parent.parent
DETECTOR = ROOT / "edged" / "models" / "yolov3-tiny-416-int8.tflite"


def _invoke(path: Path, x: np.ndarray) -> list:
    it = runtime.load_interpreter(path, threads=1)
    spec = runtime.input_specs(it)[0]
    it.set_tensor(spec.index, x)
    it.invoke()
    return [it.get_tensor(s.index) for s in runtime.output_specs(it)]


def test_committed_detector_loads_with_quantized_io():
    it = runtime.load_interpreter(DETECTOR, threads=2)
    (inp,) = runtime.input_specs(it)
    assert inp.shape == (1, 416, 416, 3)
    assert inp.dtype == np.uint8 and inp.quantized
    # The converter pins the input range to [0, 1]: raw pixels are the stored values.
    assert inp.scale * 255 == pytest.approx(1.0, abs=1e-3) and inp.zero_point == 0
    outs = runtime.output_specs(it)
    assert sorted(o.shape for o in outs) == [(1, 13, 13, 255), (1, 26, 26, 255)]
    assert all(o.dtype == np.uint8 and o.quantized for o in outs)


def test_committed_detector_metadata():
    meta = runtime.read_metadata(DETECTOR)
    assert meta is not None
    assert meta["family"] == "yolo" and meta["input_size"] == [416, 416]
    assert len(meta["classes"]) == 80 and meta["classes"][0] == "person"
    assert sorted(h["grid"][0] for h in meta["heads"]) == [13, 26]
    assert meta["source"]["weights_sha256"] == "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    # Anchors travel with the model (yolov3-tiny mask 3,4,5 on the 13x13 head).
    h13 = next(h for h in meta["heads"] if h["grid"][0] == 13)
    assert h13["anchors"] == [[81.0, 82.0], [135.0, 169.0], [344.0, 319.0]]


def test_write_metadata_round_trip_keeps_the_model_identical(tmp_path):
    out = tmp_path / "copy.tflite"
    meta = {"family": "test", "numbers": [1, 2.5], "text": "héllo"}
    runtime.write_metadata(DETECTOR, out, meta)
    assert runtime.read_metadata(out) == meta
    entries = runtime.metadata_entries(out)
    assert list(entries).count("edged") == 1
    # Replacing keeps exactly one entry.
    runtime.write_metadata(out, out, {"v": 2})
    assert runtime.read_metadata(out) == {"v": 2}
    # Weights untouched: same outputs bit for bit.
    x = np.random.default_rng(0).integers(0, 256, (1, 416, 416, 3), dtype=np.uint8)
    for a, b in zip(_invoke(DETECTOR, x), _invoke(out, x)):
        np.testing.assert_array_equal(a, b)
    # Removing it.
    runtime.write_metadata(out, out, None)
    assert runtime.read_metadata(out) is None


def test_model_without_edged_metadata_reads_none():
    osnet = shared_path("models", "nnio-osnet", "osnet_x1_0_quant.tflite")
    assert runtime.read_metadata(osnet) is None
    assert "min_runtime_version" in runtime.metadata_entries(osnet)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "model file not found"),
        (b"", "empty or truncated"),
        (b"model: yolov3\nthis is a YAML file, not a model\n", "not a TFLite model"),
    ],
)
def test_bad_model_files_name_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.tflite"
    if content is not None:
        path.write_bytes(content)
    for fn in (lambda: runtime.load_interpreter(path), lambda: runtime.read_metadata(path)):
        with pytest.raises(ModelError) as ei:
            fn()
        assert str(path) in str(ei.value) and problem in str(ei.value)


def test_truncated_model_is_reported(tmp_path):
    data = DETECTOR.read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"truncated\.tflite: not a valid TFLite model \(truncated or corrupt"):
        runtime.load_interpreter(path)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a regular file"):
        runtime.load_interpreter(tmp_path)


def test_unknown_delegate():
    with pytest.raises(ModelError, match="unknown delegate 'gpu'"):
        runtime.load_interpreter(DETECTOR, delegate="gpu")


def test_edgetpu_delegate_missing_is_a_clear_error(monkeypatch):
    import ctypes.util
    import platform

    if ctypes.util.find_library("edgetpu"):  # installed here: name a library that is not
        monkeypatch.setitem(runtime.EDGETPU_LIBRARY, platform.system(), "libedgetpu-absent.so.1")
    with pytest.raises(ModelError) as ei:
        runtime.load_interpreter(DETECTOR, delegate="edgetpu", edgetpu_device="usb:0")
    msg = str(ei.value)
    assert str(DETECTOR) in msg and "Edge TPU delegate" in msg and "libedgetpu" in msg


def test_quantize_dequantize_uint8_int8_float():
    u8 = TensorSpec("u", 0, (4,), np.dtype(np.uint8), 1 / 255, 0)
    i8 = TensorSpec("i", 0, (4,), np.dtype(np.int8), 0.05, -10)
    f32 = TensorSpec("f", 0, (4,), np.dtype(np.float32), 0.0, 0)
    x = np.array([0.0, 0.6, 1.0, 2.0], np.float32)
    q = runtime.quantize(x, u8)
    assert q.dtype == np.uint8 and q.tolist() == [0, 153, 255, 255]  # saturates at 255
    np.testing.assert_allclose(runtime.dequantize(q, u8), [0, 0.6, 1, 1], atol=1e-6)
    q = runtime.quantize(np.array([-7.0, 0.0, 0.05, 100.0]), i8)
    assert q.dtype == np.int8 and q.tolist() == [-128, -10, -9, 127]
    np.testing.assert_allclose(runtime.dequantize(q, i8), [-5.9, 0.0, 0.05, 6.85], atol=1e-5)
    assert runtime.quantize(x, f32).dtype == np.float32
    np.testing.assert_array_equal(runtime.dequantize(x, f32), x)
    assert runtime.pixel_affine(u8) == pytest.approx((1.0, 0.0))
    assert runtime.pixel_affine(f32) is None


def test_tensorflow_lite_backend_gives_the_same_outputs(monkeypatch):
    need_module("tensorflow")
    x = np.random.default_rng(1).integers(0, 256, (1, 416, 416, 3), dtype=np.uint8)
    litert = _invoke(DETECTOR, x)
    monkeypatch.setenv("EDGED_TFLITE_RUNTIME", "tensorflow")
    assert runtime.backend_name() == "tensorflow"
    for a, b in zip(litert, _invoke(DETECTOR, x)):
        # Same int8 kernels up to rounding in a few requantisation steps.
        assert np.mean(a.astype(int) == b.astype(int)) > 0.99
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EDGED_TFLITE_RUNTIME", "onnxruntime")
    with pytest.raises(ModelError, match="EDGED_TFLITE_RUNTIME='onnxruntime': expected one of"):
        runtime.load_interpreter(DETECTOR)
