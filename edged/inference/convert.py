"""Darknet `.cfg` + `.weights` -> Keras -> TFLite (float32, or full int8 with uint8/int8 I/O).

Needs TensorFlow (the `convert` extra); imported lazily so the daemon never loads it. The Keras graph
reproduces Darknet layer by layer: explicit top-left padding for strided convolutions (not TF 'SAME'),
batch norm folded into the kernels, leaky ReLU 0.1, nearest upsample, Darknet maxpool padding (size 2
stride 1 keeps the size), route (with groups) and shortcut. The model outputs the raw head tensors;
decoding stays in numpy (edged.inference.yolo) so every model is decoded identically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from edged.inference import darknet, runtime
from edged.inference.darknet import DarknetError, DarknetNet
from edged.inference.yolo import check_image, letterbox

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
QUANT_CHOICES = ("int8", "uint8", "float32")


class ConvertError(Exception):
    """Conversion cannot proceed; the message names the file and the problem."""


def _tf() -> Any:
    # TensorFlow's C++ start-up chatter buries the converter's own report.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # type: ignore
    except ImportError:
        raise ConvertError("model conversion needs TensorFlow: pip install 'edged[convert]'") from None
    return tf


# ---------------------------------------------------------------------------------------------- Keras graph
def _make_edge_pad_layer(keras: Any) -> Any:
    class EdgePad2D(keras.layers.Layer):
        """Replicate the border rows/columns: max pooling over it equals Darknet's pooling that ignores
        out-of-image positions (every window holding padding also holds the border value it copies)."""

        def __init__(self, pads: Tuple[Tuple[int, int], Tuple[int, int]], **kw: Any):
            super().__init__(**kw)
            self.pads = pads

        def call(self, x: Any) -> Any:
            ops = keras.ops
            (t, b), (l, r) = self.pads
            parts = [x[:, :1]] * t + [x] + [x[:, -1:]] * b
            x = ops.concatenate(parts, axis=1) if len(parts) > 1 else x
            parts = [x[:, :, :1]] * l + [x] + [x[:, :, -1:]] * r
            return ops.concatenate(parts, axis=2) if len(parts) > 1 else x

    return EdgePad2D


def _activation(keras: Any, x: Any, act: str, name: str) -> Any:
    L = keras.layers
    if act == "linear":
        return x
    if act == "leaky":
        return L.LeakyReLU(negative_slope=0.1, name=name)(x)
    if act == "relu":
        return L.ReLU(name=name)(x)
    if act == "relu6":
        return L.ReLU(max_value=6.0, name=name)(x)
    if act == "logistic":
        return L.Activation("sigmoid", name=name)(x)
    if act == "swish":
        return L.Activation("silu", name=name)(x)
    if act == "mish":
        return L.Activation("mish", name=name)(x)
    raise DarknetError(f"activation {act!r} not supported")


def _conv(keras: Any, x: Any, ly: darknet.Layer, w: Dict[str, np.ndarray], in_shape: Tuple[int, int, int]) -> Any:
    L = keras.layers
    p = ly.params
    i = ly.index
    k, s, pad, groups, filters = p["size"], p["stride"], p["pad"], p["groups"], p["filters"]
    ih, iw, ic = in_shape
    oh, ow = ly.out_shape[:2]
    kernel, bias = darknet.fold_batchnorm(w)
    # Darknet pads `pad` on every side but only reads what the output size needs: pad the bottom/right
    # just that much and run a 'valid' convolution (a stride-2 3x3 pads top-left only).
    pad_b = max(0, (oh - 1) * s + k - ih - pad)
    pad_r = max(0, (ow - 1) * s + k - iw - pad)
    if s == 1 and pad == pad_b == pad_r and 2 * pad == k - 1:
        padding = "same"
    else:
        padding = "valid"
        if pad or pad_b or pad_r:
            x = L.ZeroPadding2D(((pad, pad_b), (pad, pad_r)), name=f"pad_{i}")(x)
    if groups == 1:
        conv = L.Conv2D(filters, k, strides=s, padding=padding, name=f"conv_{i}")
        y = conv(x)
        conv.set_weights([kernel.transpose(2, 3, 1, 0), bias])
    elif groups == ic:
        mult = filters // ic
        conv = L.DepthwiseConv2D(k, strides=s, padding=padding, depth_multiplier=mult, name=f"dwconv_{i}")
        y = conv(x)
        # Darknet filter f reads input channel f // mult: (filters,1,k,k) -> (k,k,in,mult).
        conv.set_weights([kernel.reshape(ic, mult, k, k).transpose(2, 3, 0, 1), bias])
    else:
        cin, cout = ic // groups, filters // groups
        ys = []
        for g in range(groups):
            conv = L.Conv2D(cout, k, strides=s, padding=padding, name=f"conv_{i}_g{g}")
            ys.append(conv(x[..., g * cin : (g + 1) * cin]))
            conv.set_weights([kernel[g * cout : (g + 1) * cout].transpose(2, 3, 1, 0), bias[g * cout : (g + 1) * cout]])
        y = L.Concatenate(axis=-1, name=f"groupcat_{i}")(ys)
    return _activation(keras, y, p["activation"], f"act_{i}")


def _maxpool(keras: Any, x: Any, ly: darknet.Layer, in_shape: Tuple[int, int, int], EdgePad: Any) -> Any:
    L = keras.layers
    p = ly.params
    k, s, padding = p["size"], p["stride"], p["padding"]
    ih, iw, _ = in_shape
    oh, ow = ly.out_shape[:2]
    if k == 1 and s == 1:
        return x
    before = padding // 2
    pads = []
    same_ok = True
    for n_in, n_out in ((ih, oh), (iw, ow)):
        after = max(0, (n_out - 1) * s + k - n_in - before)
        pads.append((before, after))
        tf_out = -(-n_in // s)
        tf_total = max((tf_out - 1) * s + k - n_in, 0)
        same_ok &= tf_out == n_out and tf_total // 2 == before
    if same_ok:  # TF 'SAME' pooling ignores padding, like Darknet: the cheapest exact form
        return L.MaxPooling2D(k, s, padding="same", name=f"maxpool_{ly.index}")(x)
    if any(a or b for a, b in pads):
        x = EdgePad(tuple(pads), name=f"edgepad_{ly.index}")(x)
    return L.MaxPooling2D(k, s, padding="valid", name=f"maxpool_{ly.index}")(x)


def build_keras(net: DarknetNet, weights: Dict[int, Dict[str, np.ndarray]], upto_layer: Optional[int] = None) -> Any:
    tf = _tf()
    keras = tf.keras
    L = keras.layers
    EdgePad = _make_edge_pad_layer(keras)
    inp = keras.Input(shape=net.input_shape, batch_size=1, name="image")
    outs: Dict[int, Any] = {}
    last = len(net.layers) - 1 if upto_layer is None else upto_layer
    for ly in net.layers[: last + 1]:
        x = inp if ly.inputs[0] < 0 else outs[ly.inputs[0]]
        in_shape = net.input_shape if ly.inputs[0] < 0 else net.layers[ly.inputs[0]].out_shape
        if ly.kind == "convolutional":
            y = _conv(keras, x, ly, weights[ly.index], in_shape)
        elif ly.kind == "maxpool":
            y = _maxpool(keras, x, ly, in_shape, EdgePad)
        elif ly.kind == "route":
            g, gid = ly.params["groups"], ly.params["group_id"]
            parts = []
            for r in ly.inputs:
                t = outs[r]
                if g > 1:
                    c = net.layers[r].out_shape[2] // g
                    t = t[..., gid * c : (gid + 1) * c]
                parts.append(t)
            y = parts[0] if len(parts) == 1 else L.Concatenate(axis=-1, name=f"route_{ly.index}")(parts)
        elif ly.kind == "shortcut":
            y = L.Add(name=f"shortcut_{ly.index}")([x, outs[ly.inputs[1]]])
            y = _activation(keras, y, ly.params["activation"], f"act_{ly.index}")
        elif ly.kind == "upsample":
            st = ly.params["stride"]
            y = L.UpSampling2D(size=(st, st), interpolation="nearest", name=f"upsample_{ly.index}")(x)
        else:  # dropout (inference: identity), yolo (decoded outside the graph)
            y = x
        outs[ly.index] = y
    if upto_layer is None:
        heads = net.heads
        if not heads:
            raise DarknetError(f"{net.cfg_path}: no [yolo] layers; pass upto_layer to export a feature layer")
        outputs = [outs[h.source] for h in heads]
        names = [f"head_{k}" for k in range(len(heads))]
    else:
        outputs, names = [outs[upto_layer]], ["features"]
    outputs = [L.Identity(name=n)(o) for o, n in zip(outputs, names)]
    return keras.Model(inp, outputs if len(outputs) > 1 else outputs[0], name=net.cfg_path.stem.replace("-", "_").replace(".", "_"))


def darknet_to_keras(cfg_path: PathLike, weights_path: PathLike, upto_layer: Optional[int] = None,
                     input_size: Union[int, Tuple[int, int], None] = None) -> Any:
    """A tf.keras.Model equal to the Darknet network (input: (1, H, W, 3) RGB float in 0..1, NHWC).

    Outputs the raw tensors feeding each [yolo] layer, or, with `upto_layer` (0-based Darknet layer
    index), that layer's output only. The parsed net is attached as `model.darknet_net`."""
    if upto_layer is not None and upto_layer < 0:
        raise DarknetError(f"upto_layer must be >= 0, got {upto_layer}")
    net = darknet.parse_cfg(cfg_path, input_size)
    if upto_layer is not None and upto_layer >= len(net.layers):
        raise DarknetError(f"{cfg_path}: upto_layer {upto_layer} but the cfg has {len(net.layers)} layers")
    weights = darknet.read_weights(net, weights_path, upto_layer)
    model = build_keras(net, weights, upto_layer)
    model.darknet_net = net
    return model


# ---------------------------------------------------------------------------------------------- calibration frames
def skimage_photos() -> List[np.ndarray]:
    """BGR colour photographs bundled with scikit-image (offline, from a registry package)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise ConvertError("calibration source 'skimage' needs scikit-image: pip install scikit-image") from None
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "motorcycle_left", "retina", "cat", "colorwheel", "logo", "skin", "lily", "kodim23"]
    out = []
    for n in names:
        fn = getattr(skdata, n, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception:  # some samples need pooch downloads; bundled ones always load
            continue
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
            continue
        out.append(np.ascontiguousarray(img[..., 2::-1]))
    return out


def load_frames(source: PathLike, max_frames: int = 64) -> List[np.ndarray]:
    """BGR frames from a folder of images (recursive, sorted), a video (evenly spaced frames) or the
    word 'skimage' (scikit-image sample photos)."""
    if str(source) == "skimage":
        return skimage_photos()[:max_frames]
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ConvertError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
        if len(files) > max_frames:
            files = [files[int(i)] for i in np.linspace(0, len(files) - 1, max_frames)]
        frames = []
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise ConvertError(f"{f}: cannot decode this image")
            frames.append(img)
        return frames
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTS:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ConvertError(f"{p}: cannot decode this image")
            return [img]
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            raise ConvertError(f"{p}: cannot open as a video (or image)")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        want = set(np.linspace(0, max(n - 1, 0), min(max_frames, max(n, 1))).astype(int).tolist()) if n > 0 else None
        frames, i = [], 0
        while len(frames) < max_frames:
            ok, img = cap.read()
            if not ok:
                break
            if want is None or i in want:
                frames.append(img)
            i += 1
        cap.release()
        if not frames:
            raise ConvertError(f"{p}: no frames could be read from this video")
        return frames
    raise ConvertError(f"{p}: calibration source not found (give a folder of images, a video or 'skimage')")


def network_input(frame_bgr: np.ndarray, net_h: int, net_w: int) -> np.ndarray:
    """(1, H, W, 3) float32 RGB 0..1, letterboxed exactly like the detector does at run time."""
    canvas, _ = letterbox(check_image(frame_bgr), net_h, net_w)
    return (canvas.astype(np.float32) * np.float32(1.0 / 255.0))[None]


# ---------------------------------------------------------------------------------------------- TFLite
def keras_to_tflite(model: Any, quant: str = "float32", calibration: Optional[Sequence[np.ndarray]] = None) -> bytes:
    """TFLite flatbuffer bytes. quant: 'float32', or full-integer 'int8' / 'uint8' (the I/O type; the
    weights and activations are int8 either way) calibrated on `calibration` (network inputs)."""
    tf = _tf()
    if quant not in QUANT_CHOICES:
        raise ConvertError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant != "float32":
        if not calibration:
            raise ConvertError("int8 conversion needs calibration frames (--calib)")
        samples = list(calibration)

        def representative() -> Iterable[List[np.ndarray]]:
            for x in samples:
                x = x.copy()
                # Pin the input range to exactly [0, 1] so the input scale is 1/255: raw uint8 pixels then
                # feed the model without any arithmetic.
                x[0, 0, 0, :] = 0.0
                x[0, 0, 1, :] = 1.0
                yield [x]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = tf.uint8 if quant == "uint8" else tf.int8
        conv.inference_input_type = io
        conv.inference_output_type = io
    try:
        return bytes(conv.convert())
    except Exception as exc:  # the converter raises many types; the message matters
        raise ConvertError(f"TFLite conversion failed: {exc}") from None


def _run_tflite(interp: Any, x: np.ndarray) -> List[np.ndarray]:
    """Dequantized float outputs for a float network input x (1,H,W,3)."""
    ins = runtime.input_specs(interp)[0]
    interp.set_tensor(ins.index, runtime.quantize(x, ins))
    interp.invoke()
    return [runtime.dequantize(interp.get_tensor(s.index), s) for s in runtime.output_specs(interp)]


def match_outputs(interp: Any, reference: Sequence[np.ndarray], x: np.ndarray) -> List[str]:
    """TFLite output tensor name of each reference (Keras) output: same shape and closest values."""
    specs = runtime.output_specs(interp)
    got = _run_tflite(interp, x)
    names: List[str] = []
    for ref in reference:
        best = None
        for s, g in zip(specs, got):
            if tuple(s.shape) != tuple(ref.shape) or s.name in names:
                continue
            d = float(np.mean(np.abs(g - ref)))
            if best is None or d < best[0]:
                best = (d, s.name)
        if best is None:
            raise ConvertError(f"no TFLite output has the shape {ref.shape} of a Keras output")
        names.append(best[1])
    return names


@dataclass
class ConvertResult:
    path: Path
    metadata: Dict[str, Any]
    agreement: Optional[Dict[str, float]] = None


def detector_metadata(net: DarknetNet, names: List[str], tensor_names: List[str], quant: str,
                      cfg_path: PathLike, weights_path: PathLike, calibration: Optional[Dict[str, Any]],
                      mask_overrides: Optional[Dict[int, Sequence[int]]] = None) -> Dict[str, Any]:
    heads = []
    for h, t in zip(net.heads, tensor_names):
        heads.append({
            "tensor": t, "grid": list(h.grid), "stride": net.input_shape[0] // h.grid[0],
            "anchors": [list(a) for a in h.anchors], "mask": list(h.mask),
            "num_classes": h.num_classes, "scale_x_y": h.scale_x_y,
        })
    return {
        "format": "edged-model/1", "kind": "detector", "family": "yolo",
        "architecture": Path(cfg_path).stem,
        "input_size": [net.input_shape[0], net.input_shape[1]], "layout": "NHWC", "color": "RGB",
        "pixel_scale": 1.0 / 255.0,
        "letterbox": {"mode": "darknet", "fill": 128},
        "classes": names, "heads": heads, "quantization": quant,
        "mask_overrides": {str(k): list(v) for k, v in (mask_overrides or {}).items()} or None,
        "source": {"cfg": Path(cfg_path).name, "cfg_sha256": darknet.sha256_file(cfg_path),
                   "weights": Path(weights_path).name, "weights_sha256": darknet.sha256_file(weights_path)},
        "calibration": calibration,
    }


def convert_darknet(
    cfg_path: PathLike,
    weights_path: PathLike,
    out_path: PathLike,
    *,
    names_path: Optional[PathLike] = None,
    input_size: Union[int, Tuple[int, int], None] = None,
    quant: str = "int8",
    calib: Union[PathLike, Sequence[np.ndarray], None] = None,
    calib_label: Optional[str] = None,
    max_calib: int = 64,
    report: bool = True,
    yolo_masks: Optional[Dict[int, Sequence[int]]] = None,
) -> ConvertResult:
    """Convert a Darknet YOLO to a TFLite detector with embedded edged metadata.

    calib: folder of images, a video, 'skimage', or a list of BGR frames. With report=True and an int8
    model, also builds the float32 reference and measures int8-vs-float agreement on the frames.
    yolo_masks: {head index: anchor mask} overriding the cfg (see darknet.override_masks)."""
    net = darknet.parse_cfg(cfg_path, input_size)
    if yolo_masks:
        darknet.override_masks(net, yolo_masks)
    heads = net.heads
    if not heads:
        raise DarknetError(f"{cfg_path}: no [yolo] layers: not a YOLO detector cfg")
    ncls = {h.num_classes for h in heads}
    if len(ncls) != 1:
        raise DarknetError(f"{cfg_path}: yolo layers disagree on classes: {sorted(ncls)}")
    n_classes = ncls.pop()
    if names_path is not None:
        names = darknet.read_names(names_path, n_classes)
    else:
        names = [f"class{i}" for i in range(n_classes)]
    weights = darknet.read_weights(net, weights_path)
    model = build_keras(net, weights)
    net_h, net_w = net.input_shape[:2]

    frames: List[np.ndarray] = []
    calib_info: Optional[Dict[str, Any]] = None
    if calib is not None:
        if isinstance(calib, (str, Path)):
            frames = load_frames(calib, max_calib)
            label = calib_label or (str(calib) if str(calib) == "skimage" else Path(calib).name)
        else:
            frames = [check_image(f, "calibration frame") for f in calib][:max_calib]
            label = calib_label or "frames"
        calib_info = {"source": label, "frames": len(frames)}
    if quant != "float32" and not frames:
        raise ConvertError("int8/uint8 conversion needs calibration frames: --calib FOLDER|VIDEO|skimage")
    inputs = [network_input(f, net_h, net_w) for f in frames]
    probe = inputs[0] if inputs else np.random.default_rng(0).uniform(0, 1, (1, net_h, net_w, 3)).astype(np.float32)

    flat = keras_to_tflite(model, quant, inputs if quant != "float32" else None)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".raw")
    tmp.write_bytes(flat)
    try:
        interp = runtime.load_interpreter(tmp, threads=2)
        ref = model(probe, training=False)
        ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
        tensor_names = match_outputs(interp, ref, probe)
        meta = detector_metadata(net, names, tensor_names, quant, cfg_path, weights_path,
                                 calib_info if quant != "float32" else None, yolo_masks)
        runtime.write_metadata(tmp, out_path, meta)
    finally:
        tmp.unlink(missing_ok=True)
    result = ConvertResult(out_path, meta)
    if report and quant != "float32" and frames:
        float_path = out_path.with_name(out_path.stem + ".float32-ref.tflite")
        ftmp = float_path.with_name(float_path.name + ".raw")
        ftmp.write_bytes(keras_to_tflite(model, "float32"))
        try:
            fi = runtime.load_interpreter(ftmp, threads=2)
            fmeta = dict(meta, heads=[dict(h, tensor=t) for h, t in zip(meta["heads"], match_outputs(fi, ref, probe))],
                         quantization="float32", calibration=None)
            runtime.write_metadata(ftmp, float_path, fmeta)
        finally:
            ftmp.unlink(missing_ok=True)
        try:
            result.agreement = agreement(float_path, out_path, frames)
        finally:
            float_path.unlink(missing_ok=True)
    return result


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.size == 0 or b.size == 0:
        return np.zeros((a.shape[0], b.shape[0]), np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def greedy_match(a: np.ndarray, b: np.ndarray, iou: float = 0.5) -> int:
    """Number of one-to-one matches with IoU >= iou (greedy by IoU)."""
    m = _iou_matrix(a, b)
    n = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        m[i, :] = -1
        m[:, j] = -1
        n += 1
    return n


def agreement(float_model: PathLike, quant_model: PathLike, frames: Sequence[np.ndarray],
              score_threshold: float = 0.3) -> Dict[str, float]:
    """int8 vs float32 on frames: mean |diff| of decoded objectness and box coordinates (network
    pixels) over all anchors, and detection agreement (all classes, IoU 0.5, same class)."""
    from edged.inference.yolo import YoloDetector, _sigmoid

    fd = YoloDetector(float_model, score_threshold=score_threshold)
    qd = YoloDetector(quant_model, score_threshold=score_threshold)
    obj_diff, box_diff, cls_diff = [], [], []
    n_f = n_q = n_match = 0
    for f in frames:
        fo, _ = fd.raw_outputs(f)
        qo, _ = qd.raw_outputs(f)
        for hf, hq, a, b in zip(fd._heads, qd._heads, fo, qo):
            ra = runtime.dequantize(a, hf.spec).reshape(-1, 5 + hf.num_classes)
            rb = runtime.dequantize(b, hq.spec).reshape(-1, 5 + hq.num_classes)
            obj_diff.append(np.abs(_sigmoid(ra[:, 4]) - _sigmoid(rb[:, 4])))
            cls_diff.append(np.abs(_sigmoid(ra[:, 4:5]) * _sigmoid(ra[:, 5:]) - _sigmoid(rb[:, 4:5]) * _sigmoid(rb[:, 5:])).ravel())
            gw = hf.grid[1]
            box_diff.append(np.abs(_sigmoid(ra[:, :2]) - _sigmoid(rb[:, :2])).ravel() * (fd.net_w / gw))
        da, db = fd.detect(f), qd.detect(f)
        n_f += len(da)
        n_q += len(db)
        for c in np.union1d(da.class_ids, db.class_ids):
            n_match += greedy_match(da.boxes[da.class_ids == c], db.boxes[db.class_ids == c])
    return {
        "frames": float(len(frames)),
        "objectness_mean_abs_diff": float(np.mean(np.concatenate(obj_diff))),
        "class_score_mean_abs_diff": float(np.mean(np.concatenate(cls_diff))),
        "xy_offset_mean_abs_diff_px": float(np.mean(np.concatenate(box_diff))),
        "float_detections": float(n_f),
        "int8_detections": float(n_q),
        "matched": float(n_match),
        "int8_recall_of_float": n_match / n_f if n_f else 1.0,
        "int8_precision_vs_float": n_match / n_q if n_q else 1.0,
    }
