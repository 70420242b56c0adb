"""Darknet `.cfg` / `.weights` parsing and shape inference (numpy only, no TensorFlow).

Supports the layers YOLOv3, YOLOv3-tiny and Yolo-Fastest use: convolutional (batch norm, groups,
any stride/padding), maxpool, route (incl. groups/group_id), shortcut, upsample, dropout, yolo.
Every error names the file (and cfg line) and the problem.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]

ACTIVATIONS = ("leaky", "linear", "relu", "logistic", "mish", "swish", "relu6")
SUPPORTED = ("convolutional", "maxpool", "route", "shortcut", "upsample", "dropout", "yolo")


class DarknetError(ValueError):
    """A cfg/weights/names file edged cannot use; the message names the file and the problem."""


@dataclass
class Section:
    kind: str  # "convolutional", "maxpool", ...
    options: Dict[str, str]
    line: int  # 1-based line of the [header] in the cfg
    index: int = -1  # Darknet layer index (the [net] section has -1)

    def get(self, key: str, default: Any, cast: Any = int) -> Any:
        if key not in self.options:
            return default
        try:
            return cast(self.options[key])
        except ValueError:
            raise ValueError(f"[{self.kind}] at line {self.line}: {key}={self.options[key]!r} is not a valid {cast.__name__}") from None

    def ints(self, key: str, default: Optional[List[int]] = None) -> List[int]:
        if key not in self.options:
            if default is None:
                raise ValueError(f"[{self.kind}] at line {self.line}: missing {key}=")
            return list(default)
        try:
            return [int(v) for v in self.options[key].replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ValueError(f"[{self.kind}] at line {self.line}: {key}={self.options[key]!r} is not a list of integers") from None

    def floats(self, key: str) -> List[float]:
        try:
            return [float(v) for v in self.options[key].replace(" ", "").split(",") if v != ""]
        except (KeyError, ValueError):
            raise ValueError(f"[{self.kind}] at line {self.line}: {key}= must be a list of numbers") from None


@dataclass
class Layer:
    """One Darknet layer with its resolved parameters and output shape (H, W, C)."""

    section: Section
    out_shape: Tuple[int, int, int]
    inputs: List[int]  # absolute indices of input layers (-1 = the network input)
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.section.kind

    @property
    def index(self) -> int:
        return self.section.index


@dataclass
class YoloHead:
    layer: int  # index of the [yolo] layer
    source: int  # index of the layer feeding it (the raw head tensor)
    grid: Tuple[int, int]  # (H, W)
    anchors: List[Tuple[float, float]]  # this head's anchors (masked), input pixels (w, h)
    mask: List[int]
    num_classes: int
    scale_x_y: float

    @property
    def channels(self) -> int:
        return len(self.mask) * (5 + self.num_classes)


@dataclass
class DarknetNet:
    cfg_path: Path
    net: Section
    layers: List[Layer]
    input_shape: Tuple[int, int, int]  # (H, W, C)

    @property
    def heads(self) -> List[YoloHead]:
        out = []
        for ly in self.layers:
            if ly.kind == "yolo":
                p = ly.params
                out.append(YoloHead(ly.index, ly.inputs[0], ly.out_shape[:2], p["anchors"], p["mask"], p["classes"], p["scale_x_y"]))
        return out

    def param_count(self) -> int:
        return sum(ly.params.get("n_floats", 0) for ly in self.layers)

    def macs(self, upto_layer: Optional[int] = None) -> int:
        """Multiply-accumulates of the convolutional layers, Darknet's own way (its "BFLOPs" are twice
        this): output positions x filters x (input channels / groups) x size^2."""
        total = 0
        for ly in self.layers:
            if ly.kind == "convolutional" and (upto_layer is None or ly.index <= upto_layer):
                p = ly.params
                oh, ow, f = ly.out_shape
                total += oh * ow * f * (p["in_channels"] // p["groups"]) * p["size"] ** 2
        return total


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_cfg_text(text: str, source: str = "<cfg>") -> List[Section]:
    sections: List[Section] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise DarknetError(f"{source}:{n}: malformed section header {raw.strip()!r}")
            sections.append(Section(line[1:-1].strip().lower(), {}, n))
        elif "=" in line:
            if not sections:
                raise DarknetError(f"{source}:{n}: option {line!r} before the first [section]")
            k, v = line.split("=", 1)
            sections[-1].options[k.strip()] = v.strip()
        else:
            raise DarknetError(f"{source}:{n}: expected 'key=value' or '[section]', got {raw.strip()!r}")
    if not sections or sections[0].kind not in ("net", "network"):
        raise DarknetError(f"{source}: not a Darknet cfg (the first section must be [net])")
    for i, s in enumerate(sections[1:]):
        s.index = i
    return sections


def _resolve(idx: int, here: int) -> int:
    return idx if idx >= 0 else here + idx


def parse_cfg(path: PathLike, input_size: Union[int, Tuple[int, int], None] = None) -> DarknetNet:
    """Parse a cfg and infer every layer's output shape. input_size overrides the [net] width/height
    (int = square, or (height, width))."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DarknetError(f"{p}: cannot read the cfg: {exc.strerror or exc}") from None
    sections = parse_cfg_text(text, str(p))
    try:
        return _build(p, sections, input_size)
    except DarknetError:
        raise
    except ValueError as exc:
        raise DarknetError(f"{p}: {exc}") from None


def _build(p: Path, sections: List[Section], input_size: Union[int, Tuple[int, int], None]) -> DarknetNet:
    net = sections[0]
    h, w = net.get("height", 416), net.get("width", 416)
    if input_size is not None:
        h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    c = net.get("channels", 3)
    if h <= 0 or w <= 0:
        raise ValueError("[net] width/height must be positive")
    layers: List[Layer] = []

    def shape_of(i: int) -> Tuple[int, int, int]:
        return (h, w, c) if i < 0 else layers[i].out_shape

    for s in sections[1:]:
        i = s.index
        where = f"layer {i} [{s.kind}] at line {s.line}"
        if s.kind not in SUPPORTED:
            raise ValueError(f"{where}: layer type not supported (supported: {', '.join(SUPPORTED)})")
        prev = i - 1
        ih, iw, ic = shape_of(prev)
        params: Dict[str, Any] = {}
        inputs = [prev]
        if s.kind == "convolutional":
            filters, size = s.get("filters", 1), s.get("size", 1)
            stride = s.get("stride", 1)
            if s.get("stride_x", stride) != stride or s.get("stride_y", stride) != stride or s.get("dilation", 1) != 1:
                raise ValueError(f"{where}: stride_x/stride_y/dilation are not supported")
            pad = size // 2 if s.get("pad", 0) else s.get("padding", 0)
            groups = s.get("groups", 1)
            act = s.options.get("activation", "logistic")
            if act not in ACTIVATIONS:
                raise ValueError(f"{where}: activation {act!r} not supported ({', '.join(ACTIVATIONS)})")
            if groups < 1 or ic % groups or filters % groups:
                raise ValueError(f"{where}: groups={groups} must divide input channels {ic} and filters {filters}")
            bn = bool(s.get("batch_normalize", 0))
            oh, ow = (ih + 2 * pad - size) // stride + 1, (iw + 2 * pad - size) // stride + 1
            if oh <= 0 or ow <= 0:
                raise ValueError(f"{where}: input {ih}x{iw} too small for size={size} stride={stride}")
            params = dict(filters=filters, size=size, stride=stride, pad=pad, groups=groups, activation=act, bn=bn,
                          n_floats=filters * (4 if bn else 1) + filters * (ic // groups) * size * size, in_channels=ic)
            out = (oh, ow, filters)
        elif s.kind == "maxpool":
            size = s.get("size", s.get("stride", 1))
            stride = s.get("stride", 1)
            padding = s.get("padding", size - 1)
            if s.get("maxpool_depth", 0) or s.get("stride_x", stride) != stride or s.get("stride_y", stride) != stride:
                raise ValueError(f"{where}: maxpool_depth/stride_x/stride_y are not supported")
            oh, ow = (ih + padding - size) // stride + 1, (iw + padding - size) // stride + 1
            params = dict(size=size, stride=stride, padding=padding)
            out = (oh, ow, ic)
        elif s.kind == "route":
            refs = [_resolve(v, i) for v in s.ints("layers")]
            if not refs or any(r < 0 or r >= i for r in refs):
                raise ValueError(f"{where}: layers= must point at earlier layers, got {s.options.get('layers')}")
            groups, gid = s.get("groups", 1), s.get("group_id", 0)
            shapes = [shape_of(r) for r in refs]
            if any(sh[:2] != shapes[0][:2] for sh in shapes):
                raise ValueError(f"{where}: routed layers differ in size: {shapes}")
            if any(sh[2] % groups for sh in shapes) or not 0 <= gid < groups:
                raise ValueError(f"{where}: groups={groups} group_id={gid} do not split the channels {shapes}")
            inputs = refs
            params = dict(groups=groups, group_id=gid)
            out = (shapes[0][0], shapes[0][1], sum(sh[2] // groups for sh in shapes))
        elif s.kind == "shortcut":
            frm = [_resolve(v, i) for v in s.ints("from")]
            if len(frm) != 1 or not 0 <= frm[0] < i:
                raise ValueError(f"{where}: from= must be one earlier layer")
            if "weights_type" in s.options and s.options["weights_type"] != "none":
                raise ValueError(f"{where}: weighted shortcuts are not supported")
            act = s.options.get("activation", "linear")
            if act not in ACTIVATIONS:
                raise ValueError(f"{where}: activation {act!r} not supported")
            if shape_of(frm[0]) != (ih, iw, ic):
                raise ValueError(f"{where}: shapes differ: {shape_of(frm[0])} + {(ih, iw, ic)}")
            inputs = [prev, frm[0]]
            params = dict(activation=act)
            out = (ih, iw, ic)
        elif s.kind == "upsample":
            stride = s.get("stride", 2)
            if stride < 1 or s.get("scale", 1.0, float) != 1.0:
                raise ValueError(f"{where}: only upsampling by a positive integer stride (no scale=) is supported")
            params = dict(stride=stride)
            out = (ih * stride, iw * stride, ic)
        elif s.kind == "dropout":
            out = (ih, iw, ic)
        else:  # yolo
            classes = s.get("classes", 20)
            anchors_flat = s.floats("anchors")
            num = s.get("num", len(anchors_flat) // 2)
            if len(anchors_flat) != 2 * num:
                raise ValueError(f"{where}: anchors= has {len(anchors_flat)} numbers, num={num} needs {2 * num}")
            mask = s.ints("mask", list(range(num)))
            if any(not 0 <= m < num for m in mask):
                raise ValueError(f"{where}: mask {mask} out of range for num={num}")
            if s.get("new_coords", 0):
                raise ValueError(f"{where}: new_coords=1 (scaled-YOLOv4 decoding) is not supported")
            pairs = [(anchors_flat[2 * k], anchors_flat[2 * k + 1]) for k in range(num)]
            if ic != len(mask) * (5 + classes):
                raise ValueError(f"{where}: input has {ic} channels, {len(mask)} anchors x (5 + {classes} classes) = {len(mask) * (5 + classes)} expected")
            params = dict(classes=classes, mask=mask, anchors=[pairs[m] for m in mask], all_anchors=pairs,
                          scale_x_y=s.get("scale_x_y", 1.0, float))
            out = (ih, iw, ic)
        layers.append(Layer(s, out, inputs, params))
    return DarknetNet(p, net, layers, (h, w, c))


def override_masks(net: DarknetNet, masks: Dict[int, Sequence[int]]) -> None:
    """Replace the anchor mask of yolo head k (0-based, cfg order) in place.

    The cfg shipped with the official YOLOv3-tiny weights says `mask = 0,1,2` for its 26x26 head, but
    the weights were trained with `mask = 1,2,3` (OpenVINO's model zoo patches the same line): with the
    cfg as is, that head's boxes come out about half their size."""
    heads = [ly for ly in net.layers if ly.kind == "yolo"]
    for k, mask in masks.items():
        if not 0 <= k < len(heads):
            raise DarknetError(f"{net.cfg_path}: no yolo head {k} (the cfg has {len(heads)})")
        p = heads[k].params
        mask = [int(m) for m in mask]
        if len(mask) != len(p["mask"]) or any(not 0 <= m < len(p["all_anchors"]) for m in mask):
            raise DarknetError(
                f"{net.cfg_path}: yolo head {k} needs {len(p['mask'])} anchor indices in 0..{len(p['all_anchors']) - 1}, got {mask}"
            )
        p["mask"] = mask
        p["anchors"] = [p["all_anchors"][m] for m in mask]


def read_weights(net: DarknetNet, weights_path: PathLike, upto_layer: Optional[int] = None) -> Dict[int, Dict[str, np.ndarray]]:
    """Per convolutional layer index: {"weights": (filters, c/groups, k, k), "biases", and with batch norm
    "scales", "mean", "var"}. The file must hold exactly the floats the cfg needs (or at least those up to
    `upto_layer` when given)."""
    p = Path(weights_path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DarknetError(f"{p}: cannot read the weights: {exc.strerror or exc}") from None
    if len(raw) < 16:
        raise DarknetError(f"{p}: not a Darknet weights file ({len(raw)} bytes)")
    major, minor, revision = np.frombuffer(raw[:12], np.int32)
    header = 20 if (major * 10 + minor >= 2 and major < 1000 and minor < 1000) else 16
    floats = np.frombuffer(raw[header : header + (len(raw) - header) // 4 * 4], np.float32)
    convs = [ly for ly in net.layers if ly.kind == "convolutional" and (upto_layer is None or ly.index <= upto_layer)]
    need = sum(ly.params["n_floats"] for ly in convs)
    total = net.param_count()
    if floats.size < need or (upto_layer is None and floats.size != need) or (len(raw) - header) % 4:
        raise DarknetError(
            f"{p}: holds {floats.size} floats after the {header}-byte header (version {major}.{minor}.{revision}), "
            f"but {net.cfg_path.name} needs {total}: weights and cfg do not match (or the file is truncated)"
        )
    out: Dict[int, Dict[str, np.ndarray]] = {}
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        a = floats[pos : pos + n]
        pos += n
        return a

    for ly in convs:
        pr = ly.params
        f, k = pr["filters"], pr["size"]
        d = {"biases": take(f)}
        if pr["bn"]:
            d["scales"], d["mean"], d["var"] = take(f), take(f), take(f)
        d["weights"] = take(f * (pr["in_channels"] // pr["groups"]) * k * k).reshape(f, pr["in_channels"] // pr["groups"], k, k)
        out[ly.index] = d
    return out


# Batch norm as OpenCV's Darknet importer (the parity oracle) applies it: 1/sqrt(var + 1e-6).
BN_EPSILON = 1e-6


def fold_batchnorm(w: Dict[str, np.ndarray], eps: float = BN_EPSILON) -> Tuple[np.ndarray, np.ndarray]:
    """(kernel (filters, c/groups, k, k), bias (filters,)) with batch norm folded in, float64 math."""
    kernel = w["weights"].astype(np.float64)
    bias = w["biases"].astype(np.float64)
    if "scales" in w:
        g = w["scales"].astype(np.float64) / np.sqrt(w["var"].astype(np.float64) + eps)
        kernel = kernel * g[:, None, None, None]
        bias = bias - w["mean"].astype(np.float64) * g
    return kernel.astype(np.float32), bias.astype(np.float32)


def read_names(path: PathLike, expected: Optional[int] = None) -> List[str]:
    p = Path(path)
    try:
        names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise DarknetError(f"{p}: cannot read the class names: {exc.strerror or exc}") from None
    if expected is not None and len(names) != expected:
        raise DarknetError(f"{p}: has {len(names)} class names, the model's yolo layers have {expected} classes")
    return names


def write_cfg(sections: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    """cfg text from (kind, options) pairs; used to generate test networks."""
    out = []
    for kind, opts in sections:
        out.append(f"[{kind}]")
        out += [f"{k}={v}" for k, v in opts.items()]
        out.append("")
    return "\n".join(out)


def write_random_weights(net: DarknetNet, path: PathLike, seed: int = 0, scale: float = 0.1) -> None:
    """A Darknet weights file with random values shaped for `net` (tests / structure checks)."""
    rng = np.random.default_rng(seed)
    parts: List[np.ndarray] = []
    for ly in net.layers:
        if ly.kind != "convolutional":
            continue
        pr = ly.params
        f = pr["filters"]
        parts.append(rng.normal(0, scale, f))  # biases
        if pr["bn"]:
            parts += [rng.uniform(0.5, 1.5, f), rng.normal(0, scale, f), rng.uniform(0.5, 2.0, f)]
        fan_in = (pr["in_channels"] // pr["groups"]) * pr["size"] ** 2
        parts.append(rng.normal(0, 1.0 / np.sqrt(fan_in), f * fan_in))
    header = np.array([0, 2, 0], np.int32).tobytes() + np.array([0], np.int64).tobytes()
    Path(path).write_bytes(header + np.concatenate(parts).astype(np.float32).tobytes())
