"""Darknet -> TFLite converter, for real: generated cfgs with random weights (no shared data needed),
Yolo-Fastest 1.1 and YOLOv3-tiny from ../shared; float32 parity with OpenCV 4.x's Darknet importer
(OpenCV 5 dropped it: the oracle runs in a cached OpenCV 4 venv, tests/_opencv4_oracle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest

from edged.inference import darknet, runtime
from edged.inference.darknet import DarknetError
from edged.inference.yolo import YoloDetector, decode_heads

from conftest import need_module, shared_path
from _opencv4_oracle import opencv4_darknet

tf = need_module("tensorflow")
from edged.inference import convert  # noqa: E402  (imports TF lazily, but needs it here)

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = "10,14, 23,27, 37,58, 81,82, 135,169, 344,319"


def conv(filters: int, size: int = 3, stride: int = 1, bn: int = 1, act: str = "leaky", groups: int = 1, pad: int = 1):
    opts = {"batch_normalize": bn, "filters": filters, "size": size, "stride": stride, "pad": pad, "activation": act}
    if groups != 1:
        opts["groups"] = groups
    if not bn:
        del opts["batch_normalize"]
    return ("convolutional", opts)


def yolo(mask: str, classes: int):
    return ("yolo", {"mask": mask, "anchors": ANCHORS, "classes": classes, "num": 6})


def tiny_cfg(size: int = 96, classes: int = 3) -> str:
    """Every layer kind and padding case: stride-2 convs (odd/even inputs), size-2 stride-1 maxpool,
    a 3x3 stride-2 maxpool (Darknet pads top-left), grouped and depthwise convs, route with groups,
    shortcut, upsample, two yolo heads."""
    out = 3 * (5 + classes)
    layers = [
        ("net", {"width": size, "height": size, "channels": 3}),
        conv(8),                                   # 0
        conv(16, stride=2),                        # 1  96 -> 48
        ("maxpool", {"size": 2, "stride": 1}),     # 2  keeps 48
        conv(16, groups=16, act="linear"),         # 3  depthwise
        conv(16, size=1, groups=4),                # 4  grouped 1x1
        ("shortcut", {"from": -3, "activation": "linear"}),  # 5
        ("route", {"layers": -1, "groups": 2, "group_id": 1}),  # 6  second half of the channels
        ("maxpool", {"size": 3, "stride": 2}),     # 7  48 -> 24, Darknet padding
        conv(32, stride=2),                        # 8  24 -> 12
        conv(32, stride=2),                        # 9  12 -> 6
        conv(16, size=1),                          # 10
        conv(out, size=1, bn=0, act="linear"),     # 11
        yolo("3,4,5", classes),                    # 12
        ("route", {"layers": -3}),                 # 13
        conv(8, size=1),                           # 14
        ("upsample", {"stride": 2}),               # 15 6 -> 12
        ("route", {"layers": "-1, 8"}),            # 16
        conv(out, size=1, bn=0, act="linear"),     # 17
        yolo("0,1,2", classes),                    # 18
    ]
    return darknet.write_cfg(layers)


def fastest_cfg(size: int = 128, classes: int = 2) -> str:
    """A Yolo-Fastest-class network, block for block as yolo-fastest-1.1.cfg builds it, at toy widths:
    a stride-2 stem, inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear projection, dropout,
    shortcut from=-5), stride-2 depthwise downsampling, a depthwise conv with multiplier 2, a grouped
    (not depthwise) 1x1 conv, a CSP-style route with groups, the SPP block (stride-1 maxpools 3/5/9 and
    routes), heads of 5x5 depthwise convs written `pad=1` (Darknet pads size/2 = 2), and a second head
    fed by upsample + route to an earlier layer."""
    out = 3 * (5 + classes)

    def block(expand: int, project: int) -> List[Tuple[str, Dict]]:
        return [conv(expand, size=1, pad=0), conv(expand, groups=expand), conv(project, size=1, pad=0, act="linear"),
                ("dropout", {"probability": 0.15}), ("shortcut", {"from": -5, "activation": "linear"})]

    def down(expand: int, project: int) -> List[Tuple[str, Dict]]:
        return [conv(expand, size=1, pad=0), conv(expand, stride=2, groups=expand), conv(project, size=1, pad=0, act="linear")]

    L: List[Tuple[str, Dict]] = [("net", {"width": size, "height": size, "channels": 3}), conv(8, stride=2)]  # 0: /2
    L += [conv(8, size=1, pad=0), conv(8, groups=8), conv(4, size=1, pad=0, act="linear")]  # 1-3
    L += block(8, 4)  # 4-8
    L += down(12, 8) + block(16, 8)  # 9-11 /4, 12-16
    L += down(16, 12) + block(24, 12)  # 17-19 /8, 20-24
    L += [conv(24, groups=12, size=3)]  # 25: depthwise, multiplier 2
    L += [conv(24, size=1, pad=0, groups=2, act="leaky")]  # 26: grouped 1x1
    L += [("route", {"layers": -1, "groups": 2, "group_id": 1}), conv(12, size=1, pad=0), ("route", {"layers": "-1, -3"})]  # 27-29
    L += down(32, 16) + block(32, 16)  # 30-32 /16, 33-37
    L += [("maxpool", {"stride": 1, "size": 3}), ("route", {"layers": -2}), ("maxpool", {"stride": 1, "size": 5}),
          ("route", {"layers": -4}), ("maxpool", {"stride": 1, "size": 9}), ("route", {"layers": "-1,-3,-5,-6"})]  # 38-43 SPP
    L += [conv(24, size=1, pad=0), conv(24, size=5, groups=24, pad=1), conv(24, size=1, act="linear"),
          conv(24, size=5, groups=24, pad=1), conv(24, size=1, act="linear"),
          conv(out, size=1, bn=0, act="linear"), yolo("3,4,5", classes)]  # 44-50
    L += [("route", {"layers": -7}), ("upsample", {"stride": 2}), ("route", {"layers": "-1, 29"}),
          conv(60, size=5, groups=60, pad=1), conv(24, size=1, act="linear"),
          conv(out, size=1, bn=0, act="linear"), yolo("0,1,2", classes)]  # 51-57
    return darknet.write_cfg(L)


def yolov3_cfg(size: int = 128, classes: int = 2, div: int = 16) -> str:
    """The full YOLOv3 topology (Darknet-53 with 1/2/8/8/4 residual blocks, three heads, upsample +
    route), channels divided by `div`."""
    f = lambda c: max(2, c // div)  # noqa: E731
    out = 3 * (5 + classes)
    L: List[Tuple[str, Dict]] = [("net", {"width": size, "height": size, "channels": 3}), conv(f(32))]

    def stage(ch: int, blocks: int) -> None:
        L.append(conv(f(ch), stride=2))
        for _ in range(blocks):
            L.append(conv(f(ch // 2), size=1))
            L.append(conv(f(ch)))
            L.append(("shortcut", {"from": -3, "activation": "linear"}))

    for ch, n in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        stage(ch, n)
    route36, route61 = 36, 61  # outputs of the 256- and 512-channel stages, as in yolov3.cfg

    def head(ch: int, mask: str) -> None:
        for _ in range(2):
            L.append(conv(f(ch // 2), size=1))
            L.append(conv(f(ch)))
        L.append(conv(f(ch // 2), size=1))
        L.append(conv(f(ch)))
        L.append(conv(out, size=1, bn=0, act="linear"))
        L.append(yolo(mask, classes))

    head(1024, "6,7,8")
    L += [("route", {"layers": -4}), conv(f(256), size=1), ("upsample", {"stride": 2}), ("route", {"layers": f"-1, {route61}"})]
    head(512, "3,4,5")
    L += [("route", {"layers": -4}), conv(f(128), size=1), ("upsample", {"stride": 2}), ("route", {"layers": f"-1, {route36}"})]
    head(256, "0,1,2")
    text = darknet.write_cfg(L)
    return text.replace(f"anchors={ANCHORS}", "anchors=10,13, 16,30, 33,23, 30,61, 62,45, 59,119, 116,90, 156,198, 373,326").replace("num=6", "num=9")


def make_net(tmp_path: Path, text: str, name: str, seed: int = 0) -> Tuple[Path, Path]:
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(text)
    weights = tmp_path / f"{name}.weights"
    darknet.write_random_weights(darknet.parse_cfg(cfg), weights, seed=seed)
    return cfg, weights


def photo(name: str = "astronaut") -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else np.ascontiguousarray(img[..., ::-1])


def opencv_heads(cfg: Path, weights: Path, x: np.ndarray) -> List[np.ndarray]:
    """OpenCV's raw head tensors (the linear convs feeding each yolo layer) as NHWC."""
    net = darknet.parse_cfg(cfg, (x.shape[1], x.shape[2]))
    with opencv4_darknet(cfg, weights) as cv_net:
        cv_net.setInput(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        outs = cv_net.forward([f"conv_{h.source}" for h in net.heads])
    return [o.transpose(0, 2, 3, 1) for o in outs]


def tflite_heads(path: Path, x: np.ndarray) -> List[np.ndarray]:
    meta = runtime.read_metadata(path)
    it = runtime.load_interpreter(path, threads=2)
    spec = runtime.input_specs(it)[0]
    it.set_tensor(spec.index, runtime.quantize(x, spec))
    it.invoke()
    outs = {s.name: s for s in runtime.output_specs(it)}
    return [runtime.dequantize(it.get_tensor(outs[h["tensor"]].index), outs[h["tensor"]]) for h in meta["heads"]]


def assert_parity(cfg: Path, weights: Path, model: Path, images: List[np.ndarray], tol: float = 1e-3) -> float:
    meta = runtime.read_metadata(model)
    h, w = meta["input_size"]
    worst = 0.0
    for img in images:
        x = convert.network_input(img, h, w)
        for ours, ref in zip(tflite_heads(model, x), opencv_heads(cfg, weights, x)):
            assert ours.shape == ref.shape
            worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < tol, f"float32 TFLite differs from OpenCV's Darknet by {worst}"
    return worst


# ---------------------------------------------------------------------------------------------- generated nets
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg, weights = make_net(d, tiny_cfg(), "tiny")
    names = d / "tiny.names"
    names.write_text("person\ncar\ndog\n")
    out = d / "tiny-f32.tflite"
    convert.convert_darknet(cfg, weights, out, names_path=names, quant="float32")
    return cfg, weights, names, out


def test_tiny_generated_net_float_parity_with_opencv(tiny):
    cfg, weights, _, out = tiny
    assert_parity(cfg, weights, out, [photo("astronaut"), photo("coffee"), photo("camera")])


def test_tiny_generated_net_metadata(tiny):
    cfg, weights, _, out = tiny
    meta = runtime.read_metadata(out)
    assert meta["classes"] == ["person", "car", "dog"]
    assert meta["input_size"] == [96, 96] and meta["quantization"] == "float32"
    assert [h["grid"] for h in meta["heads"]] == [[6, 6], [12, 12]]
    assert meta["heads"][0]["anchors"] == [[81.0, 82.0], [135.0, 169.0], [344.0, 319.0]]
    assert meta["source"]["weights_sha256"] == darknet.sha256_file(weights)


def test_decoding_matches_opencv_region_output(tiny):
    """Our numpy decoding (sigmoid/exp/anchors/grid, objectness * class prob) equals OpenCV's yolo layer."""
    cfg, weights, _, out = tiny
    det = YoloDetector(out, score_threshold=0.0, classes=None)
    img = photo("astronaut")
    x = convert.network_input(img, 96, 96)
    raw, _ = det.raw_outputs(img)
    boxes, scores, cls = decode_heads(raw, det._heads, 96, 96, 0.0, None)
    with opencv4_darknet(cfg, weights) as cv_net:
        cv_net.setInput(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        o = np.concatenate(cv_net.forward(cv_net.getUnconnectedOutLayersNames()))
    # OpenCV rows: cx, cy, w, h (fractions of the input), objectness, per-class obj * p (0 below its thresh).
    cv_boxes = np.concatenate([(o[:, :2] - o[:, 2:4] / 2), (o[:, :2] + o[:, 2:4] / 2)], 1) * 96
    # Our rows come per (box, class) with every class kept at threshold 0: 3 classes per box.
    ours = boxes.reshape(-1, 3, 4)[:, 0]
    ours_scores = scores.reshape(-1, 3)
    # Same boxes in the same order (head 0 then head 1, cell-major, anchor-minor) as OpenCV's rows.
    np.testing.assert_allclose(ours, cv_boxes, atol=2e-3)
    shown = o[:, 5:] > 0
    np.testing.assert_allclose(ours_scores[shown], o[:, 5:][shown], atol=1e-4)


def test_tiny_int8_and_uint8_conversion(tiny, tmp_path):
    cfg, weights, names, f32 = tiny
    frames = [photo(n) for n in ("astronaut", "coffee", "chelsea", "camera")]
    for quant, dtype in (("uint8", np.uint8), ("int8", np.int8)):
        out = tmp_path / f"tiny-{quant}.tflite"
        res = convert.convert_darknet(cfg, weights, out, names_path=names, quant=quant, calib=frames,
                                      report=quant == "uint8")
        it = runtime.load_interpreter(out)
        spec = runtime.input_specs(it)[0]
        assert spec.dtype == dtype and spec.scale * 255 == pytest.approx(1.0, abs=1e-3)
        assert all(s.dtype == dtype for s in runtime.output_specs(it))
        assert res.metadata["quantization"] == quant and res.metadata["calibration"]["frames"] == 4
        if quant == "uint8":  # the agreement report (one extra float conversion) once is enough
            a = res.agreement
            assert a is not None and a["frames"] == 4
            assert a["objectness_mean_abs_diff"] < 0.05
        # Raw heads of int8 track the float ones (random weights: judge by correlation).
        x = convert.network_input(frames[0], 96, 96)
        for q, f in zip(tflite_heads(out, x), tflite_heads(f32, x)):
            assert np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.98
        d = YoloDetector(out, classes=["person", "dog"], score_threshold=0.01).detect(frames[0])
        assert set(d.class_ids.tolist()) <= {0, 2}


def test_yolo_fastest_class_generated_net_float_parity_macs_and_int8(tmp_path):
    cfg, weights = make_net(tmp_path, fastest_cfg(), "fastest", seed=3)
    net = darknet.parse_cfg(cfg)
    assert [h.grid for h in net.heads] == [(8, 8), (16, 16)]
    assert {ly.kind for ly in net.layers} == {"convolutional", "dropout", "shortcut", "route", "maxpool", "upsample", "yolo"}
    f32 = tmp_path / "fastest-f32.tflite"
    convert.convert_darknet(cfg, weights, f32, quant="float32")
    # Darknet's float output (OpenCV 4's importer of the same cfg + weights) is the reference.
    assert_parity(cfg, weights, f32, [photo("astronaut"), photo("coffee")])
    # The graph's multiply-accumulates equal Darknet's count of the cfg: depthwise (with a multiplier)
    # and grouped convolutions counted per group, nothing else counted.
    cost = runtime.model_cost(f32)
    assert cost.macs == net.macs()
    ops = cost.by_op()
    assert ops["DEPTHWISE_CONV_2D"][0] == 12 and ops["CONV_2D"][1] > 0
    # int8 with uint8 I/O: the raw heads follow the float ones, and the detector runs on it.
    frames = [photo(n) for n in ("astronaut", "coffee", "chelsea", "camera")]
    q = tmp_path / "fastest-uint8.tflite"
    res = convert.convert_darknet(cfg, weights, q, quant="uint8", calib=frames, report=False)
    assert runtime.model_macs(q) == net.macs() and res.metadata["input_size"] == [128, 128]
    x = convert.network_input(frames[1], 128, 128)
    for a, b in zip(tflite_heads(q, x), tflite_heads(f32, x)):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    YoloDetector(q, score_threshold=0.01).detect(frames[1])


@pytest.mark.slow
def test_full_yolov3_structure_converts_and_matches_opencv(tmp_path):
    cfg, weights = make_net(tmp_path, yolov3_cfg(), "yolov3-small", seed=1)
    net = darknet.parse_cfg(cfg)
    assert len(net.layers) == 107 and [h.grid for h in net.heads] == [(4, 4), (8, 8), (16, 16)]
    out = tmp_path / "y3.tflite"
    convert.convert_darknet(cfg, weights, out, quant="float32")
    assert_parity(cfg, weights, out, [photo("astronaut")])
    # The same cfg at 160x160 (other input sizes work too).
    out160 = tmp_path / "y3-160.tflite"
    convert.convert_darknet(cfg, weights, out160, quant="float32", input_size=160)
    assert runtime.read_metadata(out160)["input_size"] == [160, 160]
    det = YoloDetector(out160, score_threshold=0.5)
    assert det.input_size == (160, 160)
    det.detect(photo("coffee"))


def test_darknet_to_keras_upto_layer(tmp_path):
    cfg, weights = make_net(tmp_path, tiny_cfg(), "tiny")
    model = convert.darknet_to_keras(cfg, weights, upto_layer=8, input_size=64)
    x = convert.network_input(photo("astronaut"), 64, 64)
    y = np.asarray(model(x))
    assert y.shape == (1, 8, 8, 32)
    # The truncated model (a feature extractor, e.g. for a re-ID encoder) converts and runs the same in TFLite.
    flat = convert.keras_to_tflite(model, "float32")
    p = tmp_path / "f.tflite"
    p.write_bytes(flat)
    it = runtime.load_interpreter(p)
    it.set_tensor(runtime.input_specs(it)[0].index, x)
    it.invoke()
    np.testing.assert_allclose(it.get_tensor(runtime.output_specs(it)[0].index), y, atol=1e-4)


# ---------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
def test_yolo_fastest_float_parity_and_detects_people(tmp_path):
    d = shared_path("models", "yolo-fastest", "yolo-fastest-1.1_coco")
    cfg, weights, names = d / "yolo-fastest-1.1.cfg", d / "yolo-fastest-1.1.weights", d / "coco.names"
    out = tmp_path / "yf.tflite"
    convert.convert_darknet(cfg, weights, out, names_path=names, quant="float32")
    # 0.2509 G FLOPs of convolutions; Yolo-Fastest's README says 0.252 BFLOPs, which adds Darknet's
    # count for the SPP maxpools (0.0011).
    assert runtime.model_macs(out) == darknet.parse_cfg(cfg).macs() == 125_437_600
    frame = cv2.imread(str(shared_path("data", "MOT17-mini", "MOT17-05-FRCNN", "img1", "000001.jpg")))
    assert_parity(cfg, weights, out, [frame, photo("astronaut")])
    det = YoloDetector(out, classes=["person"], score_threshold=0.3)
    assert len(det.detect(frame)) >= 2


@pytest.mark.slow
def test_yolo_fastest_int8_agrees_with_float(tmp_path):
    d = shared_path("models", "yolo-fastest", "yolo-fastest-1.1_body")
    cfg, weights, names = d / "yolo-fastest-1.1_body.cfg", d / "yolo-fastest-1.1_body.weights", d / "body.names"
    frames = [cv2.imread(str(p)) for p in sorted(shared_path("data", "MOT17-mini").glob("*/img1/000001.jpg"))]
    res = convert.convert_darknet(cfg, weights, tmp_path / "body.tflite", names_path=names, quant="uint8", calib=frames)
    a = res.agreement
    assert a["float_detections"] > 10
    # Depthwise Yolo-Fastest is more quantization-sensitive than YOLOv3-tiny: measured recall 1.0,
    # precision 0.79 of the float detections on these 7 frames.
    assert a["int8_recall_of_float"] > 0.85 and a["int8_precision_vs_float"] > 0.65


# ---------------------------------------------------------------------------------------------- bad input
def test_names_file_of_wrong_length(tiny, tmp_path):
    cfg, weights, _, _ = tiny
    names = tmp_path / "two.names"
    names.write_text("a\nb\n")
    with pytest.raises(DarknetError, match=r"two\.names: has 2 class names, the model's yolo layers have 3 classes"):
        convert.convert_darknet(cfg, weights, tmp_path / "x.tflite", names_path=names, quant="float32")


def test_truncated_weights(tiny, tmp_path):
    cfg, weights, _, _ = tiny
    bad = tmp_path / "short.weights"
    bad.write_bytes(weights.read_bytes()[:-400])
    with pytest.raises(DarknetError, match=r"short\.weights: holds \d+ floats .* needs \d+"):
        convert.darknet_to_keras(cfg, bad)


def test_cfg_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.cfg"
    p.write_text("[net]\nwidth=64\nheight=64\n\n[convolutional]\nfilters=8\nsize=3\n\n[reorg]\nstride=2\n")
    with pytest.raises(DarknetError, match=r"bad\.cfg: layer 1 \[reorg\] at line 9: layer type not supported"):
        darknet.parse_cfg(p)
    p.write_text("[convolutional]\nfilters=8\n")
    with pytest.raises(DarknetError, match="first section must be \\[net\\]"):
        darknet.parse_cfg(p)
    p.write_text("[net]\nwidth=64\nheight=64\n[convolutional]\nfilters=eight\n")
    with pytest.raises(DarknetError, match="filters='eight' is not a valid int"):
        darknet.parse_cfg(p)
    p.write_text("[net]\nwidth=64\nheight=64\n[convolutional]\nfilters=8\nactivation=leaky\n[yolo]\nmask=0\nanchors=1,2\nclasses=1\nnum=1\n")
    with pytest.raises(DarknetError, match=r"input has 8 channels, 1 anchors x \(5 \+ 1 classes\) = 6 expected"):
        darknet.parse_cfg(p)


def test_calibration_source_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(convert.ConvertError, match="no images"):
        convert.load_frames(empty)
    with pytest.raises(convert.ConvertError, match="calibration source not found"):
        convert.load_frames(tmp_path / "missing")
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("not a video")
    with pytest.raises(convert.ConvertError, match="clip.mp4"):
        convert.load_frames(not_video)


def test_int8_without_calibration_is_refused(tiny, tmp_path):
    cfg, weights, names, _ = tiny
    with pytest.raises(convert.ConvertError, match="needs calibration frames"):
        convert.convert_darknet(cfg, weights, tmp_path / "x.tflite", names_path=names, quant="uint8")


def test_calibration_from_folder_and_video(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, n in enumerate(("astronaut", "coffee", "camera")):
        cv2.imwrite(str(folder / f"{i}.png"), photo(n))
    assert [f.shape for f in convert.load_frames(folder)] == [(512, 512, 3), (400, 600, 3), (512, 512, 3)]
    video = tmp_path / "v.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(20):
        w.write(np.full((48, 64, 3), i * 10, np.uint8))
    w.release()
    frames = convert.load_frames(video, max_frames=5)
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_convert_info_detect(tiny, tmp_path, capsys):
    from edged.cli import main

    cfg, weights, names, _ = tiny
    out = tmp_path / "cli.tflite"
    imgs = tmp_path / "calib"
    imgs.mkdir()
    cv2.imwrite(str(imgs / "a.png"), photo("astronaut"))
    cv2.imwrite(str(imgs / "b.png"), photo("coffee"))
    rc = main(["models", "convert", "--cfg", str(cfg), "--weights", str(weights), "--names", str(names),
               "--out", str(out), "--quant", "uint8", "--calib", str(imgs), "--size", "64"])
    text = capsys.readouterr().out
    assert rc == 0 and "wrote" in text and "int8 vs float32 on 2 calibration frames" in text
    assert main(["models", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[1, 64, 64, 3] uint8" in text and "family: yolo" in text
    assert main(["models", "detect", str(out), str(imgs / "a.png"), "--score", "0.0", "--classes", "dog"]) == 0
    text = capsys.readouterr().out
    assert "a.png:" in text and "detections" in text and "person" not in text
    # Bad input reaches the user as one line naming the file.
    bad = tmp_path / "bad.names"
    bad.write_text("x\n")
    assert main(["models", "convert", "--cfg", str(cfg), "--weights", str(weights), "--names", str(bad),
                 "--out", str(out), "--quant", "float32"]) == 1
    assert "bad.names: has 1 class names" in capsys.readouterr().err
