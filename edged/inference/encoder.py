"""Appearance (re-ID) encoder: person crops -> L2-normalised embeddings for DeepSORT's cosine metric.

Works with any TFLite re-ID model. How to feed it comes from the model's embedded edged metadata
(`kind: appearance_encoder`, written by `edged models build-encoder`), else it is inferred from the
tensors:

* float input  -> RGB, ImageNet mean/std (torchreid convention: OSNet float32 [1,256,128,3], 512-d);
* uint8 input that is not quantised (scale 0) -> raw BGR pixels (DeepSORT convention: [N,128,64,3]);
* quantised uint8/int8 input -> RGB pixels / 255 if the input scale is ~1/255, raw pixels if it is ~1,
  else ImageNet-normalised RGB.

An encoder may be a fused descriptor: the metadata's `colour` entry adds an HSV histogram over
horizontal stripes computed here in numpy; the learned vector and the histogram are each
L2-normalised, multiplied by their weights and concatenated, and the whole vector is L2-normalised.

Metadata (JSON, all keys optional except kind):
    {"kind": "appearance_encoder",
     "input": {"layout": "NHWC", "height": 256, "width": 128, "color": "RGB",
               "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},   # pixel units
     "output": {"name": "...", "weight": 1.0},
     "colour": {"weight": 2.0, "stripes": 6, "bins": [8, 4, 4], "width": 32, "height": 64,
                "margin": 0.15, "sqrt": true},
     "suggested_max_cosine_distance": 0.12}      # for DeepSORT, measured for this encoder
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from edged.inference.runtime import (
    ModelError,
    TensorSpec,
    dequantize,
    input_specs,
    load_interpreter,
    model_cost,
    output_specs,
    read_metadata,
)

log = logging.getLogger(__name__)

METADATA_KIND = "appearance_encoder"
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, pixel units
IMAGENET_STD = (58.395, 57.12, 57.375)


# ---------------------------------------------------------------------------------------------- colour
@dataclass(frozen=True)
class ColourSpec:
    """HSV histogram over horizontal stripes of the (resized) crop."""

    weight: float = 1.0
    stripes: int = 6
    bins: Tuple[int, int, int] = (8, 4, 4)  # hue, saturation, value; each histogrammed separately
    width: int = 32
    height: int = 64
    margin: float = 0.15  # fraction of the width dropped on each side (background at the box edges)
    sqrt: bool = True  # Hellinger mapping: cosine on sqrt-histograms behaves like the Bhattacharyya overlap

    @property
    def dim(self) -> int:
        return self.stripes * sum(self.bins)

    @classmethod
    def from_meta(cls, meta: Dict[str, Any], source: str) -> "ColourSpec":
        try:
            spec = cls(
                weight=float(meta.get("weight", 1.0)),
                stripes=int(meta.get("stripes", 6)),
                bins=tuple(int(b) for b in meta.get("bins", (8, 4, 4))),  # type: ignore[arg-type]
                width=int(meta.get("width", 32)),
                height=int(meta.get("height", 64)),
                margin=float(meta.get("margin", 0.15)),
                sqrt=bool(meta.get("sqrt", True)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid 'colour' entry in the edged metadata: {exc}") from None
        if (
            len(spec.bins) != 3
            or not all(1 <= b <= 256 for b in spec.bins)
            or not 1 <= spec.stripes <= spec.height
            or spec.width < 4
            or not 0.0 <= spec.margin < 0.5
            or spec.weight < 0
        ):
            raise ModelError(f"{source}: invalid 'colour' entry in the edged metadata: {meta}")
        return spec

    def to_meta(self) -> Dict[str, Any]:
        return {
            "weight": self.weight,
            "stripes": self.stripes,
            "bins": list(self.bins),
            "width": self.width,
            "height": self.height,
            "margin": self.margin,
            "sqrt": self.sqrt,
        }


# OpenCV's own 8-bit saturation table: S = round((V - min) * 255 / V) in 12-bit fixed point.
_HSV_SHIFT = 12
_SDIV = np.zeros(256, np.int32)
_SDIV[1:] = np.rint((255 << _HSV_SHIFT) / np.arange(1, 256, dtype=np.float64))


def bgr_to_hsv(bgr: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(bgr, COLOR_BGR2HSV) for uint8 (H 0..179), the same bytes on every platform.

    OpenCV's ARM build rounds S the other way at exact halves (6,582 of the 16.7 M colours, e.g. BGR
    (1, 1, 2): S 127 on ARM, 128 on x86 and in its scalar code), which moves pixels across histogram
    bins; S is recomputed here with OpenCV's scalar formula, H and V are exact on both."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    v = hsv[..., 2]
    diff = (v - np.minimum(np.minimum(bgr[..., 0], bgr[..., 1]), bgr[..., 2])).astype(np.int32)
    hsv[..., 1] = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    return hsv


def colour_histograms(crops_bgr: np.ndarray, spec: ColourSpec) -> np.ndarray:
    """(N, h, w, 3) uint8 BGR crops at spec.height x spec.width -> (N, spec.dim) float32, each stripe's
    H, S and V histograms normalised to sum 1 (sqrt-mapped when spec.sqrt); not L2-normalised."""
    n, h, w = crops_bgr.shape[:3]
    if n == 0:
        return np.zeros((0, spec.dim), np.float32)
    m = int(round(spec.margin * w))
    hsv = bgr_to_hsv(crops_bgr.reshape(n * h, w, 3)).reshape(n, h, w, 3)
    hsv = hsv[:, :, m : w - m] if m else hsv
    stripe_of_row = (np.arange(h) * spec.stripes // h).astype(np.int64)
    parts = []
    for channel, bins, top in zip(range(3), spec.bins, (180, 256, 256)):
        values = hsv[..., channel].astype(np.int64) * bins // top
        # One bincount for all crops and stripes: bin id = (crop, stripe, value bin).
        ids = (np.arange(n)[:, None, None] * spec.stripes + stripe_of_row[None, :, None]) * bins + values
        hist = np.bincount(ids.ravel(), minlength=n * spec.stripes * bins).reshape(n, spec.stripes, bins)
        parts.append(hist / np.maximum(hist.sum(-1, keepdims=True), 1))
    feats = np.concatenate(parts, axis=-1).reshape(n, -1).astype(np.float32)
    return np.sqrt(feats) if spec.sqrt else feats


# ---------------------------------------------------------------------------------------------- helpers
def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def crop_resized(image: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, height, width, 3) uint8 crops of `image`, boxes clipped to the frame (at least 1 pixel, so a
    box partly or wholly outside still yields a crop of the nearest border pixels)."""
    h_img, w_img = image.shape[:2]
    out = np.empty((len(boxes), height, width, 3), np.uint8)
    x1 = np.clip(np.floor(boxes[:, 0]), 0, w_img - 1).astype(int)
    y1 = np.clip(np.floor(boxes[:, 1]), 0, h_img - 1).astype(int)
    x2 = np.maximum(np.clip(np.ceil(boxes[:, 2]), 0, w_img).astype(int), x1 + 1)
    y2 = np.maximum(np.clip(np.ceil(boxes[:, 3]), 0, h_img).astype(int), y1 + 1)
    for i in range(len(boxes)):
        # Bit-exact across x86 and ARM, unlike INTER_LINEAR (see letterbox in yolo.py).
        out[i] = cv2.resize(image[y1[i] : y2[i], x1[i] : x2[i]], (width, height), interpolation=cv2.INTER_LINEAR_EXACT)
    return out


@dataclass(frozen=True)
class InputFormat:
    layout: str  # "NHWC" or "NCHW"
    height: int
    width: int
    color: str  # "RGB" or "BGR"
    mean: Tuple[float, float, float]  # pixel units, in `color` channel order
    std: Tuple[float, float, float]


def _triple(value: Any, what: str, source: str) -> Tuple[float, float, float]:
    try:
        vals = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ModelError(f"{source}: edged metadata input.{what} must be a number or 3 numbers, got {value!r}")
    return vals[0], vals[1], vals[2]


def _infer_input_format(spec: TensorSpec, meta_input: Dict[str, Any], source: str) -> InputFormat:
    shape = spec.shape
    if len(shape) != 4:
        raise ModelError(f"{source}: encoder input must be 4-D (batch, height, width, 3), got shape {list(shape)}")
    layout = str(meta_input.get("layout") or ("NCHW" if shape[1] == 3 and shape[3] != 3 else "NHWC")).upper()
    if layout not in ("NHWC", "NCHW"):
        raise ModelError(f"{source}: edged metadata input.layout must be NHWC or NCHW, got {layout!r}")
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    if c != 3:
        raise ModelError(f"{source}: encoder input must have 3 colour channels, got shape {list(shape)} ({layout})")
    if "height" in meta_input and int(meta_input["height"]) != h or "width" in meta_input and int(meta_input["width"]) != w:
        raise ModelError(
            f"{source}: edged metadata says input {meta_input.get('width')}x{meta_input.get('height')} "
            f"but the input tensor is {w}x{h} (shape {list(shape)})"
        )
    if spec.dtype == np.float32 or spec.dtype == np.float16:
        color, mean, std = "RGB", IMAGENET_MEAN, IMAGENET_STD
    elif not spec.quantized:
        color, mean, std = "BGR", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # DeepSORT: raw uint8 BGR pixels
    elif abs(spec.scale * 255.0 - 1.0) < 0.02:
        color, mean, std = "RGB", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    elif abs(spec.scale - 1.0) < 0.02:
        color, mean, std = "RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        color, mean, std = "RGB", IMAGENET_MEAN, IMAGENET_STD
    color = str(meta_input.get("color", color)).upper()
    if color not in ("RGB", "BGR"):
        raise ModelError(f"{source}: edged metadata input.color must be RGB or BGR, got {color!r}")
    mean = _triple(meta_input.get("mean", mean), "mean", source)
    std = _triple(meta_input.get("std", std), "std", source)
    if any(s == 0 for s in std):
        raise ModelError(f"{source}: edged metadata input.std must not be 0, got {list(std)}")
    return InputFormat(layout, h, w, color, mean, std)


# ---------------------------------------------------------------------------------------------- encoder
class AppearanceEncoder:
    """Embeds person boxes of a frame: `encode(image_bgr, boxes) -> (N, dim)` float32, rows L2-normalised."""

    def __init__(
        self,
        model_path: Union[str, Path],
        *,
        threads: int = 2,
        delegate: str = "cpu",
        edgetpu_device: str = "usb:0",
        batch_size: int = 16,
    ):
        self.model_path = Path(model_path)
        source = str(self.model_path)
        if batch_size < 1:
            raise ValueError(f"{source}: batch_size must be >= 1, got {batch_size}")
        meta = read_metadata(self.model_path) or {}
        if meta and meta.get("kind") not in (None, METADATA_KIND):
            raise ModelError(
                f"{source}: not an appearance encoder (its edged metadata says kind={meta.get('kind')!r}); "
                "set encoder.model to a re-ID model"
            )
        self.metadata: Dict[str, Any] = meta
        self._interp = load_interpreter(self.model_path, threads=threads, delegate=delegate, edgetpu_device=edgetpu_device)
        # Multiply-accumulates per crop (the model's, per batch item; the colour histogram is not counted).
        self.macs: int = model_cost(self.model_path).macs_per_sample
        inputs = input_specs(self._interp)
        if len(inputs) != 1:
            raise ModelError(f"{source}: an encoder has exactly one input tensor, this model has {len(inputs)}")
        self._in = inputs[0]
        if self._in.dtype not in (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int8)):
            raise ModelError(f"{source}: unsupported input dtype {self._in.dtype} (expected float32, uint8 or int8)")
        self.input = _infer_input_format(self._in, dict(meta.get("input") or {}), source)
        self._out = self._pick_output(output_specs(self._interp), dict(meta.get("output") or {}), source)
        self.learned_weight = float((meta.get("output") or {}).get("weight", 1.0))
        self.colour: Optional[ColourSpec] = (
            ColourSpec.from_meta(dict(meta["colour"]), source) if meta.get("colour") else None
        )
        self._learned_dim = int(np.prod(self._out.shape[1:])) if len(self._out.shape) > 1 else 1
        self.dim = self._learned_dim + (self.colour.dim if self.colour else 0)
        suggested = meta.get("suggested_max_cosine_distance")
        # The scale of cosine distances differs between encoders; the builder measures a threshold for its own.
        self.suggested_max_cosine_distance: Optional[float] = float(suggested) if isinstance(suggested, (int, float)) else None
        self._lut = self._pixel_lut()
        # uint8 input with scale 1/255 and pixels/255 normalisation stores the pixels unchanged: skip the lookup.
        self._lut_is_identity = self._lut.dtype == np.uint8 and bool((self._lut == np.arange(256, dtype=np.uint8)).all())
        self.batch_size = self._setup_batching(batch_size)

    @classmethod
    def from_config(cls, cfg: Any, config_path: Union[str, Path, None] = None) -> "AppearanceEncoder":
        from edged.config import resolve_path

        return cls(
            resolve_path(cfg.model, config_path),
            threads=cfg.threads,
            delegate=cfg.delegate,
            edgetpu_device=cfg.edgetpu_device,
            batch_size=cfg.batch_size,
        )

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _pick_output(outputs: List[TensorSpec], meta_out: Dict[str, Any], source: str) -> TensorSpec:
        if not outputs:
            raise ModelError(f"{source}: the model has no output tensor")
        name = meta_out.get("name")
        if name:
            for o in outputs:
                if o.name == name:
                    return o
            raise ModelError(f"{source}: edged metadata names output {name!r}, the model has {[o.name for o in outputs]}")
        if len(outputs) > 1:
            log.warning("%s: %d outputs, using the first (%s) as the embedding", source, len(outputs), outputs[0].name)
        return outputs[0]

    def _pixel_lut(self) -> np.ndarray:
        """(3, 256) table: pixel value of each channel (model colour order) -> what the input tensor stores.
        One table lookup replaces per-pixel normalise + quantise arithmetic."""
        pixels = np.arange(256, dtype=np.float32)
        real = (pixels[None, :] - np.asarray(self.input.mean, np.float32)[:, None]) / np.asarray(self.input.std, np.float32)[:, None]
        spec = self._in
        if spec.dtype == np.float32:
            return real.astype(np.float32)
        if not spec.quantized:  # raw integer pixels (DeepSORT uint8)
            info = np.iinfo(spec.dtype)
            return np.clip(np.rint(real), info.min, info.max).astype(spec.dtype)
        info = np.iinfo(spec.dtype)
        q = np.rint(real / np.float32(spec.scale)) + spec.zero_point
        return np.clip(q, info.min, info.max).astype(spec.dtype)

    def _tensor_shape(self, n: int) -> List[int]:
        f = self.input
        return [n, f.height, f.width, 3] if f.layout == "NHWC" else [n, 3, f.height, f.width]

    def _resize(self, n: int) -> bool:
        try:
            self._interp.resize_tensor_input(self._in.index, self._tensor_shape(n), strict=False)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError, TypeError):
            return False
        out_shape = tuple(self._interp.get_output_details()[self._out_pos]["shape"])
        return len(out_shape) >= 1 and out_shape[0] == n and int(np.prod(out_shape[1:])) == self._learned_dim

    def _setup_batching(self, batch_size: int) -> int:
        """Largest batch the model takes: its fixed batch dimension, or `batch_size` when the batch
        dimension can be resized, else 1 (crops are then run one by one)."""
        self._out_pos = [d["index"] for d in self._interp.get_output_details()].index(self._out.index)
        fixed = self._in.shape[0]
        if fixed > 1:
            return fixed  # fixed batch > 1: pad partial batches
        self._current_batch = 1
        if batch_size > 1 and self._resize(batch_size):
            self._current_batch = batch_size
            return batch_size
        if not self._resize(1):
            raise ModelError(f"{self.model_path}: cannot restore the model's input shape after a resize attempt")
        return 1

    # ------------------------------------------------------------------ encoding
    def _check(self, image: Any, boxes: Any) -> Tuple[np.ndarray, np.ndarray]:
        src = self.model_path.name
        if not isinstance(image, np.ndarray):
            raise ValueError(f"encoder {src}: image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"encoder {src}: image must be HxWx3 (BGR), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"encoder {src}: image must be uint8, got dtype {image.dtype}")
        b = np.asarray(boxes, dtype=np.float64)
        if b.size == 0:
            return image, np.zeros((0, 4))
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"encoder {src}: boxes must be (N, 4) x1,y1,x2,y2, got shape {b.shape}")
        if not np.isfinite(b).all():
            raise ValueError(f"encoder {src}: boxes contain NaN or infinite values")
        return image, b

    def _to_tensor(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops (BGR) -> the model's input tensor values via the per-channel lookup table."""
        if self.input.color == "RGB":
            crops = crops[..., ::-1]
        if self._lut_is_identity:
            x = np.ascontiguousarray(crops)
            return x if self.input.layout == "NHWC" else x.transpose(0, 3, 1, 2)
        x = np.empty(crops.shape, self._lut.dtype)
        for c in range(3):
            x[..., c] = self._lut[c][crops[..., c]]
        return x if self.input.layout == "NHWC" else x.transpose(0, 3, 1, 2)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        fixed = self._in.shape[0]
        if fixed > 1 and n < fixed:  # fixed batch: pad with the first crop, drop the padding after
            x = np.concatenate([x, np.repeat(x[:1], fixed - n, axis=0)])
        elif fixed <= 1 and n != self._current_batch:
            if not self._resize(n):
                raise ModelError(f"{self.model_path}: the model refused batch size {n}")
            self._current_batch = n
        self._interp.set_tensor(self._in.index, np.ascontiguousarray(x))
        self._interp.invoke()
        y = self._interp.get_tensor(self._out.index)
        return dequantize(y, self._out).reshape(len(y), -1)[:n]

    def embed_learned(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 BGR crops at the model's input size -> raw (N, learned dim) outputs."""
        out = np.empty((len(crops), self._learned_dim), np.float32)
        step = self.batch_size
        for start in range(0, len(crops), step):
            chunk = crops[start : start + step]
            out[start : start + len(chunk)] = self._invoke(self._to_tensor(chunk))
        return out

    def encode(self, image_bgr: np.ndarray, boxes: Union[np.ndarray, Sequence[Sequence[float]]]) -> np.ndarray:
        """Embeddings of `boxes` (N, 4) x1,y1,x2,y2 pixels in `image_bgr` (HxWx3 uint8): (N, dim) float32,
        each row L2-normalised; N = 0 gives (0, dim)."""
        image, b = self._check(image_bgr, boxes)
        if len(b) == 0:
            return np.zeros((0, self.dim), np.float32)
        crops = crop_resized(image, b, self.input.width, self.input.height)
        feats = l2_normalise(self.embed_learned(crops))
        if self.colour is None:
            return feats
        small = crop_resized(image, b, self.colour.width, self.colour.height)
        hist = l2_normalise(colour_histograms(small, self.colour))
        return l2_normalise(np.concatenate([feats * self.learned_weight, hist * self.colour.weight], axis=1))

    def describe(self) -> str:
        f = self.input
        parts = [
            f"{self.model_path.name}: input {self._in.dtype.name} {list(self._in.shape)} {f.layout} {f.color}",
            f"mean {list(f.mean)} std {list(f.std)}",
            f"learned {self._learned_dim}-d ({self._out.dtype.name})",
            f"batch {self.batch_size}",
        ]
        if self.colour:
            parts.append(f"+ colour {self.colour.dim}-d (weight {self.colour.weight} vs {self.learned_weight})")
        return ", ".join(parts) + f" -> {self.dim}-d"
