"""Multiply-accumulates read from TFLite graphs (runtime.model_cost / model_macs), checked against
independent counts: a hand computation of YOLOv3-tiny's layers, the Darknet cfg (Darknet's own
formula), and TensorFlow's FLOP statistics on Keras models holding every counted operator type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, need_module, shared_path
from edged.inference import darknet, runtime
from edged.inference.runtime import ModelError

MODELS = ROOT / "edged" / "models"
DETECTOR_416 = MODELS / "yolov3-tiny-416-int8.tflite"
DETECTOR_320 = MODELS / "yolov3-tiny-320-int8.tflite"
ENCODER = MODELS / "encoder.tflite"

# YOLOv3-tiny's convolutions at input S (S/32 = g): (output side in units of g, kernel, in, out).
YOLOV3_TINY = [
    (32, 3, 3, 16), (16, 3, 16, 32), (8, 3, 32, 64), (4, 3, 64, 128), (2, 3, 128, 256), (1, 3, 256, 512),
    (1, 3, 512, 1024), (1, 1, 1024, 256), (1, 3, 256, 512), (1, 1, 512, 255), (1, 1, 256, 128),
    (2, 3, 384, 256), (2, 1, 256, 255),
]


def hand_count(size: int) -> int:
    g = size // 32
    return sum((side * g) ** 2 * k * k * cin * cout for side, k, cin, cout in YOLOV3_TINY)


def test_yolov3_tiny_416_is_2_78_gmac_like_darknet_says():
    macs = runtime.model_macs(DETECTOR_416)
    assert macs == hand_count(416) == 2_782_480_896
    # Darknet prints 5.56 BFLOPs for this network: 2 FLOPs per multiply-accumulate.
    assert 2 * macs / 1e9 == pytest.approx(5.56, abs=0.01)
    cost = runtime.model_cost(DETECTOR_416)
    assert cost.by_op()["CONV_2D"] == (13, macs)
    assert cost.custom == [] and cost.input_batch == 1
    assert sorted(o.macs for o in cost.ops if o.macs)[-1] == 13 * 13 * 9 * 512 * 1024  # the 512->1024 3x3


def test_yolov3_tiny_320_costs_what_its_grid_says():
    assert runtime.model_macs(DETECTOR_320) == hand_count(320) == 1_646_438_400
    # Every layer scales with the grid area: (10/13)^2 of the 416 model.
    assert runtime.model_macs(DETECTOR_320) * 169 == runtime.model_macs(DETECTOR_416) * 100


def test_tflite_count_equals_the_darknet_cfg_count():
    cfg = shared_path("models", "yolov3-tiny", "yolov3-tiny.cfg")
    for size, model in ((416, DETECTOR_416), (320, DETECTOR_320)):
        assert runtime.model_macs(model) == darknet.parse_cfg(cfg, size).macs()
    # The encoder is YOLOv3-tiny's layers 0-8 on a 128x64 crop.
    assert runtime.model_cost(ENCODER).macs_per_sample == darknet.parse_cfg(cfg, (128, 64)).macs(upto_layer=8)


def test_encoder_macs_per_crop():
    from edged.inference.encoder import AppearanceEncoder

    # 5 3x3 convolutions of YOLOv3-tiny on 128x64: 3->16 at full size, then 16->32 ... 128->256, each
    # at a quarter of the previous positions with 4x the channel product.
    per_crop = 128 * 64 * 9 * 3 * 16 + 4 * (64 * 32 * 9 * 16 * 32)
    enc = AppearanceEncoder(ENCODER)
    assert enc.macs == per_crop == runtime.model_macs(ENCODER)


def test_detector_exposes_macs_per_call():
    from edged.inference.yolo import YoloDetector

    assert YoloDetector(DETECTOR_320).macs == 1_646_438_400


def test_model_bytes_and_bad_files(tmp_path):
    assert runtime.model_macs(DETECTOR_416.read_bytes()) == 2_782_480_896
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(DETECTOR_416.read_bytes()[:4096])
    with pytest.raises(ModelError, match=r"cut\.tflite: not a valid TFLite model"):
        runtime.model_macs(truncated)
    with pytest.raises(ModelError, match=r"missing\.tflite: model file not found"):
        runtime.model_macs(tmp_path / "missing.tflite")


def _as_custom_ops(src: Path, dst: Path, custom_code: str) -> None:
    """A copy of `src` whose CONV_2D operators are custom ops, like an edgetpu_compiler output hides
    its convolutions in `edgetpu-custom-op`."""
    import flatbuffers

    schema = runtime._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(src.read_bytes(), 0))
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = custom_code
    code.version = 1
    model.operatorCodes.append(code)
    conv = [i for i, c in enumerate(model.operatorCodes) if c.builtinCode == schema.BuiltinOperator.CONV_2D]
    for op in model.subgraphs[0].operators:
        if op.opcodeIndex in conv:
            op.opcodeIndex = len(model.operatorCodes) - 1
            op.builtinOptionsType, op.builtinOptions = 0, None
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=runtime.TFLITE_IDENTIFIER)
    dst.write_bytes(bytes(builder.Output()))


def test_custom_ops_are_listed_not_counted(tmp_path):
    compiled = tmp_path / "compiled.tflite"
    _as_custom_ops(ENCODER, compiled, "edgetpu-custom-op")
    cost = runtime.model_cost(compiled)
    assert cost.macs == 0
    assert cost.custom == ["CUSTOM:edgetpu-custom-op"] * 5
    # The CPU backend cannot run it, and says which setting can.
    from edged.inference.backends import TFLiteBackend

    with pytest.raises(ModelError, match=r"compiled\.tflite: .*Edge TPU compiled model needs detector\.backend: edgetpu"):
        TFLiteBackend(compiled)


def test_models_info_prints_gmac(capsys):
    from edged.cli import main

    assert main(["models", "info", str(DETECTOR_320), "--ops"]) == 0
    out = capsys.readouterr().out
    assert "compute: 1.646 GMAC per image (one invocation) (CONV_2D x13 1.646)" in out
    assert "3x3/1 512->1024" in out and "-> [1, 10, 10, 1024]" in out
    assert main(["models", "info", str(ENCODER)]) == 0
    assert "compute: 0.041 GMAC per image" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- every op type
def _tensorflow_macs(tf, model, input_shape) -> int:
    """TensorFlow's own FLOP statistics (the ones its profiler sums) of the traced Keras graph, over
    the multiply-accumulate ops, halved."""
    from tensorflow.python.framework import ops

    graph = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec(input_shape, tf.float32)).graph
    mac_ops = {"Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "MatMul", "BatchMatMulV2", "BatchMatMulV3"}
    flops = [int(ops.get_stats_for_node_def(graph, op.node_def, "flops").value)
             for op in graph.get_operations() if op.type in mac_ops]
    assert flops, "no MAC op found in the traced graph"
    return sum(flops) // 2


def test_every_counted_op_type_against_tensorflow_flop_stats(tmp_path):
    tf = need_module("tensorflow")
    keras = tf.keras
    L = keras.layers
    x = inp = keras.Input((24, 32, 8), batch_size=1)
    x = L.Conv2D(16, 3, strides=2, padding="same")(x)  # 12x16x16
    x = L.DepthwiseConv2D(5, padding="valid", depth_multiplier=2)(x)  # 8x12x32
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same")(x)  # 16x24x8
    a = L.Reshape((16, 24 * 8))(x)
    x = L.Lambda(lambda t: tf.linalg.matmul(t, t, transpose_b=True))(a)  # (16, 16), K = 192
    x = L.Flatten()(x)
    x = L.Dense(10)(x)
    model = keras.Model(inp, x)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    path = tmp_path / "ops.tflite"
    path.write_bytes(conv.convert())

    cost = runtime.model_cost(path)
    got = {k: m for k, (n, m) in cost.by_op().items() if m}
    hand = {
        "CONV_2D": 12 * 16 * 16 * 9 * 8,
        "DEPTHWISE_CONV_2D": 8 * 12 * 32 * 25,
        "TRANSPOSE_CONV": 8 * 12 * 32 * 9 * 8,
        "BATCH_MATMUL": 16 * 16 * 192,
        "FULLY_CONNECTED": 256 * 10,
    }
    assert got == hand
    assert cost.macs == _tensorflow_macs(tf, model, (1, 24, 32, 8))


def test_grouped_convolution_counts_its_groups(tmp_path):
    tf = need_module("tensorflow")
    keras = tf.keras
    inp = keras.Input((16, 16, 8), batch_size=1)
    model = keras.Model(inp, keras.layers.Conv2D(16, 3, padding="same", groups=4)(inp))
    path = tmp_path / "grouped.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    # Each output channel reads in/groups = 2 input channels (TF traces a grouped convolution into an
    # XLA function its statistics do not reach: the hand count is the reference here).
    assert runtime.model_macs(path) == 16 * 16 * 16 * 9 * 2


def test_resizable_batch_counts_per_image(tmp_path):
    tf = need_module("tensorflow")
    keras = tf.keras
    inp = keras.Input((8, 8, 3), batch_size=4)
    model = keras.Model(inp, keras.layers.Conv2D(4, 1)(inp))
    path = tmp_path / "batch4.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    cost = runtime.model_cost(path)
    assert cost.input_batch == 4
    assert cost.macs == 4 * 64 * 3 * 4 and cost.macs_per_sample == 64 * 3 * 4
    assert np.isclose(cost.macs_per_sample * 4, cost.macs)


# ---------------------------------------------------------------------------------------------- edged bench compute
def test_bench_compute_reports_gmac_beside_ms(tmp_path, capsys):
    import json

    from edged.cli import main

    assert main(["bench"]) == 0
    assert "compute" in capsys.readouterr().out
    out = tmp_path / "compute.json"
    # The model on every whole frame, every detection encoded: the cost of edged 0.1.
    assert main(["bench", "compute", "--frames", "12", "--json", str(out), "--set", "detector.motion.enabled=false",
                 "--set", "encoder.mode=always"]) == 0
    text = capsys.readouterr().out
    assert "GMAC/frame" in text and "ms/frame" in text and "12 calls (at most 2.782 GMAC each)" in text
    r = json.loads(out.read_text())
    assert r["frames"] == r["detector_calls"] == 12
    assert r["gmac_per_frame"]["detector"] == pytest.approx(2.782480896)
    # The demo scene has people in it: the encoder ran on their crops, 0.0413 GMAC each.
    assert r["encoder_crops"] > 0
    assert r["gmac_per_frame"]["encoder"] == pytest.approx(r["encoder_crops"] * 41_287_680 / 12 / 1e9)
    assert r["ms_per_frame"]["model"] > 0 and r["ms_per_frame"]["total"] >= r["ms_per_frame"]["model"]
    # The defaults: motion-gated regions and lazy appearance execute less (the demo scene's first 40 frames).
    assert main(["bench", "compute", "--frames", "40", "--json", str(out)]) == 0
    gated = json.loads(out.read_text())
    assert gated["detection"] == "motion-gated regions" and gated["gmac_per_frame"]["total"] < 2.782480896
    # The lighter model, detector only.
    assert main(["bench", "compute", "--frames", "3", "--no-encoder", "--model", "models/yolov3-tiny-320-int8.tflite",
                 "--set", "detector.motion.enabled=false", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["gmac_per_frame"] == {"detector": pytest.approx(1.6464384), "encoder": 0.0, "total": pytest.approx(1.6464384)}
    assert main(["bench", "compute", "--source", str(tmp_path / "absent.mp4")]) != 0
