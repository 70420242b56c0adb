"""TFLite runtime layer: load an interpreter, describe its tensors, (de)quantize, read/write edged metadata.

The interpreter comes from `ai_edge_litert`, else `tflite_runtime`, else `tensorflow.lite`, so the same code
runs on a Raspberry Pi (LiteRT / tflite-runtime wheel), on a Coral board (Edge TPU delegate) and on a dev box.

Model metadata (anchors, class names, input size, normalisation...) travels inside the .tflite file as a
standard TFLite `Model.metadata` entry named "edged" whose buffer holds UTF-8 JSON. Reading it needs no
TensorFlow: a small bounds-checked flatbuffer reader below. Writing rebuilds the flatbuffer with the
schema bindings shipped by ai_edge_litert (or TensorFlow), keeping every weight buffer 16-byte aligned.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

METADATA_NAME = "edged"
TFLITE_IDENTIFIER = b"TFL3"
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


class ModelError(Exception):
    """A model file that cannot be used; the message names the file and the problem."""


class DelegateError(ModelError):
    """The model is fine but the accelerator delegate it asks for (Edge TPU) cannot be loaded."""


# ---------------------------------------------------------------------------------------------- backend
BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def _import_backend(name: str) -> Tuple[Any, Any, str]:
    if name == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter, load_delegate  # type: ignore

        return Interpreter, load_delegate, name
    if name == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore

        return Interpreter, load_delegate, name
    import tensorflow as tf  # type: ignore

    return tf.lite.Interpreter, tf.lite.experimental.load_delegate, "tensorflow"


def _backend() -> Tuple[Any, Any, str]:
    """(Interpreter class, load_delegate function, backend name) of the first runtime installed, or the
    one named by the EDGED_TFLITE_RUNTIME environment variable."""
    forced = os.environ.get("EDGED_TFLITE_RUNTIME", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ModelError(f"EDGED_TFLITE_RUNTIME={forced!r}: expected one of {', '.join(BACKENDS)}")
        try:
            return _import_backend(forced)
        except ImportError as exc:
            raise ModelError(f"EDGED_TFLITE_RUNTIME={forced}: not installed ({exc})") from None
    for name in BACKENDS:
        try:
            return _import_backend(name)
        except ImportError:
            continue
    raise ModelError(
        "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime, or tensorflow)"
    )


def backend_name() -> str:
    return _backend()[2]


def check_model_file(path: PathLike) -> bytes:
    """The file's bytes, after checking it exists and looks like a complete TFLite flatbuffer."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: model file not found")
    if not p.is_file():
        raise ModelError(f"{p}: not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read the model file: {exc.strerror or exc}") from None
    if len(data) < 8:
        raise ModelError(f"{p}: not a TFLite model (file is {len(data)} bytes, empty or truncated)")
    if data[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(
            f"{p}: not a TFLite model (no 'TFL3' flatbuffer identifier; got {data[4:8]!r}). "
            "Convert Darknet models with `edged models convert`."
        )
    # Walking the tables catches truncation before the interpreter does (with a clearer message).
    _read_model_tables(data, str(p))
    return data


def load_interpreter(
    path: Union[PathLike, bytes], *, threads: int = 2, delegate: str = "cpu", edgetpu_device: str = "usb:0",
    cpu_hint: str = "delegate: cpu", edgetpu_hint: str = "delegate: edgetpu",
    input_shape: Optional[Sequence[int]] = None,
) -> Any:
    """A ready (tensors allocated) interpreter for `path`.

    delegate: "cpu" (XNNPACK, `threads` threads) or "edgetpu" (needs libedgetpu and a Coral device
    such as "usb:0" / "pci:0"; the model must be compiled with edgetpu_compiler). cpu_hint: the setting
    that runs on the CPU instead, and edgetpu_hint the one that loads the delegate, named in errors (the
    caller's config key). `path` may also be the model's bytes (e.g. from `resized_model`)."""
    content = bytes(path) if isinstance(path, (bytes, bytearray)) else None
    if content is None:
        check_model_file(path)
    else:
        path = "<model bytes>"
    Interpreter, load_delegate, name = _backend()
    delegates = []
    if delegate == "edgetpu":
        import platform

        lib = EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
        try:
            # Probe the library first: a failed load_delegate leaves a half-built Delegate whose
            # __del__ raises later (LiteRT bug), far from here.
            import ctypes

            ctypes.CDLL(lib)
        except OSError as exc:
            raise DelegateError(
                f"{path}: cannot load the Edge TPU delegate: library {lib} not found ({exc}). "
                f"Install libedgetpu1-std (Coral apt repository), or set {cpu_hint}."
            ) from None
        try:
            delegates.append(load_delegate(lib, {"device": edgetpu_device} if edgetpu_device else {}))
        except (ValueError, OSError, RuntimeError) as exc:
            raise DelegateError(
                f"{path}: cannot load the Edge TPU delegate ({lib}, device {edgetpu_device!r}): {exc}. "
                f"Install libedgetpu1-std and plug in / enable the Coral device, or set {cpu_hint}."
            ) from None
    elif delegate != "cpu":
        raise ModelError(f"{path}: unknown delegate {delegate!r} (expected 'cpu' or 'edgetpu')")
    try:
        source = {"model_content": content} if content is not None else {"model_path": str(path)}
        interp = Interpreter(**source, num_threads=int(threads), experimental_delegates=delegates or None)
        if input_shape is not None:  # another input size (see resized_model), set before allocating
            interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(input_shape))
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()
        hint = ""
        if "edgetpu-custom-op" in str(exc):
            hint = f" (an Edge TPU compiled model needs {edgetpu_hint})"
        raise ModelError(f"{path}: the TFLite runtime ({name}) cannot load it{hint}: {msg[0] if msg else exc}") from None
    return interp


# ---------------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorSpec:
    name: str
    index: int
    shape: Tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 = not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


def _spec(d: Dict[str, Any]) -> TensorSpec:
    scale, zero = d.get("quantization", (0.0, 0))
    qp = d.get("quantization_parameters") or {}
    scales = qp.get("scales")
    if scales is not None and len(scales) > 1:
        # Per-channel quantized I/O does not happen for activations; refuse rather than guess.
        raise ModelError(f"tensor {d.get('name')}: per-channel quantized input/output is not supported")
    return TensorSpec(
        name=str(d.get("name", "")),
        index=int(d["index"]),
        shape=tuple(int(s) for s in d["shape"]),
        dtype=np.dtype(d["dtype"]),
        scale=float(scale),
        zero_point=int(zero),
    )


def input_specs(interp: Any) -> List[TensorSpec]:
    return [_spec(d) for d in interp.get_input_details()]


def output_specs(interp: Any) -> List[TensorSpec]:
    return [_spec(d) for d in interp.get_output_details()]


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values -> what the tensor stores (round, add zero point, saturate); float tensors: cast."""
    if not spec.quantized:
        return np.asarray(x, dtype=spec.dtype)
    info = np.iinfo(spec.dtype)
    q = np.rint(np.asarray(x, np.float32) / np.float32(spec.scale)) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """What the tensor stores -> float32 real values."""
    if not spec.quantized:
        return np.asarray(q, dtype=np.float32)
    return (q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def pixel_affine(spec: TensorSpec, pixel_scale: float = 1.0 / 255.0) -> Optional[Tuple[float, float]]:
    """For a uint8/int8 input that encodes `pixel * pixel_scale`: (a, b) with stored = pixel * a + b.

    Returns None when the input is float. Lets callers feed uint8 pixels without a float round trip:
    a full-int8 YOLO with input scale 1/255 and zero point 0 (uint8) or -128 (int8) takes pixels as is."""
    if not spec.quantized:
        return None
    return pixel_scale / spec.scale, float(spec.zero_point)


# ---------------------------------------------------------------------------------------------- flatbuffer reading
class _Reader:
    """Minimal bounds-checked reader for the parts of the TFLite schema we need."""

    def __init__(self, buf: bytes, source: str):
        self.buf = buf
        self.source = source

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.source}: not a valid TFLite model (truncated or corrupt: {what})")

    def u8(self, off: int) -> int:
        return self._unpack("<B", off)

    def u16(self, off: int) -> int:
        return self._unpack("<H", off)

    def u32(self, off: int) -> int:
        return self._unpack("<I", off)

    def i32(self, off: int) -> int:
        return self._unpack("<i", off)

    def u64(self, off: int) -> int:
        return self._unpack("<Q", off)

    def _unpack(self, fmt: str, off: int) -> int:
        if off < 0 or off + struct.calcsize(fmt) > len(self.buf):
            raise self._fail(f"offset {off} beyond the end of the {len(self.buf)}-byte file")
        return struct.unpack_from(fmt, self.buf, off)[0]

    def table(self, pos: int) -> "_Table":
        return _Table(self, pos)


class _Table:
    def __init__(self, r: _Reader, pos: int):
        self.r = r
        self.pos = pos
        self.vtable = pos - r.i32(pos)
        self.vtable_len = r.u16(self.vtable)

    def _field(self, idx: int) -> int:
        o = 4 + 2 * idx
        return self.r.u16(self.vtable + o) if o < self.vtable_len else 0

    def table(self, idx: int) -> Optional["_Table"]:
        off = self._field(idx)
        if not off:
            return None
        p = self.pos + off
        return self.r.table(p + self.r.u32(p))

    def vector(self, idx: int) -> Tuple[int, int]:
        """(start of elements, length) or (0, 0) when absent."""
        off = self._field(idx)
        if not off:
            return 0, 0
        p = self.pos + off
        vp = p + self.r.u32(p)
        return vp + 4, self.r.u32(vp)

    def tables(self, idx: int) -> List["_Table"]:
        start, n = self.vector(idx)
        if start and start + 4 * n > len(self.r.buf):
            raise self.r._fail("vector runs past the end of the file")
        return [self.r.table(start + 4 * i + self.r.u32(start + 4 * i)) for i in range(n)]

    def bytes_(self, idx: int) -> Optional[bytes]:
        start, n = self.vector(idx)
        if not start:
            return None
        if start + n > len(self.r.buf):
            raise self.r._fail("data vector runs past the end of the file")
        return self.r.buf[start : start + n]

    def string(self, idx: int) -> Optional[str]:
        b = self.bytes_(idx)
        return None if b is None else b.decode("utf-8", errors="replace")

    def u64(self, idx: int) -> int:
        off = self._field(idx)
        return self.r.u64(self.pos + off) if off else 0

    def scalar(self, idx: int, fmt: str, default: int = 0) -> int:
        """A scalar field (struct format: "<b", "<B", "<i", "<I"...), or the schema default when absent."""
        off = self._field(idx)
        return self.r._unpack(fmt, self.pos + off) if off else default

    def ints(self, idx: int) -> List[int]:
        """A [int32] vector field (tensor shapes, operator inputs/outputs); [] when absent."""
        start, n = self.vector(idx)
        if not start:
            return []
        if start + 4 * n > len(self.r.buf):
            raise self.r._fail("int vector runs past the end of the file")
        return list(struct.unpack_from(f"<{n}i", self.r.buf, start))


# Field indices of the TFLite schema (tensorflow/lite/schema/schema.fbs).
_MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 2, 4, 6
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_METADATA_NAME, _METADATA_BUFFER = 0, 1


def _read_model_tables(buf: bytes, source: str) -> Tuple[_Table, List[_Table], List[_Table]]:
    r = _Reader(buf, source)
    model = r.table(r.u32(0))
    subgraphs = model.tables(_MODEL_SUBGRAPHS)
    if not subgraphs:
        raise r._fail("no subgraph")
    buffers = model.tables(_MODEL_BUFFERS)
    for b in buffers:  # touching every buffer's extent proves the weights are all there
        start, n = b.vector(_BUFFER_DATA)
        if start and start + n > len(buf):
            raise r._fail(f"weight buffer of {n} bytes runs past the end of the {len(buf)}-byte file")
        off, size = b.u64(_BUFFER_OFFSET), b.u64(_BUFFER_SIZE)
        if off > 1 and off + size > len(buf):
            raise r._fail("external weight buffer runs past the end of the file")
    return model, buffers, model.tables(_MODEL_METADATA)


def metadata_entries(path_or_bytes: Union[PathLike, bytes]) -> Dict[str, bytes]:
    """All `Model.metadata` entries of a TFLite file: name -> raw bytes."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        buf, source = bytes(path_or_bytes), "<model bytes>"
        if buf[4:8] != TFLITE_IDENTIFIER:
            raise ModelError(f"{source}: not a TFLite model")
    else:
        source = str(path_or_bytes)
        buf = check_model_file(path_or_bytes)
    r = _Reader(buf, source)
    _, buffers, metas = _read_model_tables(buf, source)
    out: Dict[str, bytes] = {}
    for m in metas:
        name = m.string(_METADATA_NAME) or ""
        off = m._field(_METADATA_BUFFER)
        idx = r.u32(m.pos + off) if off else 0
        if idx >= len(buffers):
            raise r._fail(f"metadata {name!r} points at buffer {idx} of {len(buffers)}")
        b = buffers[idx]
        data = b.bytes_(_BUFFER_DATA)
        if data is None:
            o, n = b.u64(_BUFFER_OFFSET), b.u64(_BUFFER_SIZE)
            data = buf[o : o + n] if o > 1 else b""
        out[name] = data
    return out


def read_metadata(path: PathLike) -> Optional[Dict[str, Any]]:
    """The edged metadata (a JSON object) embedded in the model, or None when the model has none."""
    raw = metadata_entries(path).get(METADATA_NAME)
    if raw is None:
        return None
    try:
        meta = json.loads(raw.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: the embedded '{METADATA_NAME}' metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: the embedded '{METADATA_NAME}' metadata is not a JSON object")
    return meta


# ---------------------------------------------------------------------------------------------- compute cost
# A device-independent cost: the multiply-accumulates (MACs) of one invocation, read from the graph.
# Counted: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV, BATCH_MATMUL, CONV_3D (their work
# is weights x positions). Not counted: pooling, MEAN, elementwise ops, activations, resize, concat,
# (de)quantize: each costs O(one pass over a tensor), under 1 % of a convolutional detector. A custom op
# (an Edge TPU compiled graph is one) hides its cost: it is listed, with 0 MACs, in `ModelCost.custom`.

# BuiltinOperator codes (schema.fbs).
_OP_CONV_2D, _OP_DEPTHWISE_CONV_2D, _OP_FULLY_CONNECTED, _OP_CUSTOM = 3, 4, 9, 32
_OP_TRANSPOSE_CONV, _OP_BATCH_MATMUL, _OP_CONV_3D = 67, 126, 132
_OP_NAMES = {0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
             6: "DEQUANTIZE", 9: "FULLY_CONNECTED", 14: "LOGISTIC", 17: "MAX_POOL_2D", 18: "MUL",
             19: "RELU", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 25: "SOFTMAX", 32: "CUSTOM", 40: "MEAN",
             45: "STRIDED_SLICE", 49: "SPLIT", 67: "TRANSPOSE_CONV", 69: "PACK", 76: "TILE",
             97: "RESIZE_NEAREST_NEIGHBOR", 98: "LEAKY_RELU", 102: "SPLIT_V", 114: "QUANTIZE",
             126: "BATCH_MATMUL", 132: "CONV_3D"}
# Table fields (schema.fbs field order).
_MODEL_OPCODES = 1
_OPCODE_DEPRECATED, _OPCODE_CUSTOM, _OPCODE_BUILTIN = 0, 1, 3
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OPERATORS = 0, 1, 3
_TENSOR_SHAPE = 0
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS, _OP_OPTIONS = 0, 1, 2, 4
# Conv2DOptions and DepthwiseConv2DOptions: padding (SAME 0, VALID 1), stride_w, stride_h; dilation
# w/h at fields 4/5 (Conv2D) or 5/6 (depthwise). BatchMatMulOptions: adj_x, adj_y.
_PAD_SAME = 0


@dataclass(frozen=True)
class OpCost:
    index: int  # operator index in the main subgraph (execution order)
    op: str  # builtin name (CONV_2D ...) or "CUSTOM:<custom code>"
    macs: int  # multiply-accumulates of one invocation; 0 when not counted
    output_shape: Tuple[int, ...]
    detail: str = ""  # kernel/stride and channels of a counted op, e.g. "3x3/2 16->32"


@dataclass(frozen=True)
class ModelCost:
    ops: Tuple[OpCost, ...]
    input_batch: int  # batch dimension of the first input as stored (1 for a resizable batch)

    @property
    def macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def macs_per_sample(self) -> int:
        """MACs per image of the batch (per crop for an encoder)."""
        return self.macs // max(self.input_batch, 1)

    @property
    def custom(self) -> List[str]:
        """Custom ops, whose cost the graph does not show (e.g. edgetpu-custom-op)."""
        return [o.op for o in self.ops if o.op.startswith("CUSTOM")]

    def by_op(self) -> Dict[str, Tuple[int, int]]:
        """op name -> (number of such ops, their MACs), in order of first appearance."""
        out: Dict[str, Tuple[int, int]] = {}
        for o in self.ops:
            n, m = out.get(o.op, (0, 0))
            out[o.op] = (n + 1, m + o.macs)
        return out


def _prod(values: Sequence[int]) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def _conv_out(size: int, kernel: int, stride: int, dilation: int, padding: int) -> int:
    """Output length of a TFLite convolution (only needed when the graph leaves an output dim unknown)."""
    if padding == _PAD_SAME:
        return -(-size // stride)
    return -(-(size - (kernel - 1) * dilation) // stride)


def _op_cost(code: int, op: _Table, shapes: List[List[int]], r: _Reader) -> Tuple[int, str]:
    """(MACs, detail) of one operator from its tensors' shapes and its options."""
    ins = [shapes[i] if 0 <= i < len(shapes) else [] for i in op.ints(_OP_INPUTS)]
    outs = [shapes[i] if 0 <= i < len(shapes) else [] for i in op.ints(_OP_OUTPUTS)]
    if not outs or not ins:
        return 0, ""
    out = list(outs[0])
    opts = op.table(_OP_OPTIONS)

    def bad(what: str) -> ModelError:
        return r._fail(f"operator {_OP_NAMES.get(code, code)}: {what}")

    if code in (_OP_CONV_2D, _OP_DEPTHWISE_CONV_2D):
        if len(ins) < 2 or len(ins[0]) != 4 or len(ins[1]) != 4 or len(out) != 4:
            raise bad(f"expected 4-d input/filter/output, got {ins[:2]} -> {out}")
        depthwise = code == _OP_DEPTHWISE_CONV_2D
        sw = opts.scalar(1, "<i", 1) if opts else 1
        sh = opts.scalar(2, "<i", 1) if opts else 1
        pad = opts.scalar(0, "<b", _PAD_SAME) if opts else _PAD_SAME
        dw = opts.scalar(5 if depthwise else 4, "<i", 1) if opts else 1
        dh = opts.scalar(6 if depthwise else 5, "<i", 1) if opts else 1
        _, kh, kw, f_last = ins[1]
        if out[1] <= 0:
            out[1] = _conv_out(ins[0][1], kh, sh, dh, pad)
        if out[2] <= 0:
            out[2] = _conv_out(ins[0][2], kw, sw, dw, pad)
        n = max(out[0], 1)
        # Conv filter [out, kh, kw, in/groups]; depthwise filter [1, kh, kw, out]: one kh x kw window each.
        per_out = kh * kw * (1 if depthwise else f_last)
        detail = f"{kh}x{kw}/{sh}{' dw' if depthwise else ''} {ins[0][3]}->{out[3]}"
        return n * out[1] * out[2] * out[3] * per_out, detail
    if code == _OP_FULLY_CONNECTED:
        if len(ins) < 2 or len(ins[1]) != 2:
            raise bad(f"expected a 2-d weight matrix, got {ins[1:2]}")
        units, depth = ins[1]
        rows = _prod(ins[0]) // max(depth, 1)
        return rows * units * depth, f"{depth}->{units}"
    if code == _OP_TRANSPOSE_CONV:
        # inputs: output shape, filter [out, kh, kw, in], input [n, h, w, in]: every input pixel is
        # scattered through the whole kernel.
        if len(ins) < 3 or len(ins[1]) != 4 or len(ins[2]) != 4:
            raise bad(f"expected filter and input 4-d, got {ins[1:3]}")
        oc, kh, kw, ic = ins[1]
        return _prod(ins[2][:3]) * kh * kw * ic * oc, f"{kh}x{kw} transpose {ic}->{oc}"
    if code == _OP_BATCH_MATMUL:
        if len(ins) < 2 or len(ins[0]) < 2:
            raise bad(f"expected two matrices, got {ins[:2]}")
        adj_x = bool(opts.scalar(0, "<B", 0)) if opts else False
        k = ins[0][-2] if adj_x else ins[0][-1]
        return _prod(out) * k, f"K={k}"
    if code == _OP_CONV_3D:
        if len(ins) < 2 or len(ins[1]) != 5:
            raise bad(f"expected a 5-d filter, got {ins[1:2]}")
        kd, kh, kw, ic, _ = ins[1]
        return _prod(out) * kd * kh * kw * ic, f"{kd}x{kh}x{kw} {ic}->{out[-1]}"
    return 0, ""


def model_cost(path_or_bytes: Union[PathLike, bytes]) -> ModelCost:
    """Per-operator multiply-accumulates of one invocation of the model's main subgraph (control-flow
    bodies in other subgraphs run a data-dependent number of times and are not counted)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        buf, source = bytes(path_or_bytes), "<model bytes>"
        if buf[4:8] != TFLITE_IDENTIFIER:
            raise ModelError(f"{source}: not a TFLite model")
        _read_model_tables(buf, source)
    else:
        source = str(path_or_bytes)
        buf = check_model_file(path_or_bytes)
    r = _Reader(buf, source)
    model = r.table(r.u32(0))
    codes = []
    for oc in model.tables(_MODEL_OPCODES):
        # builtin_code (int32) superseded the deprecated byte at 127; the larger of the two is the code.
        code = max(oc.scalar(_OPCODE_DEPRECATED, "<b", 0), oc.scalar(_OPCODE_BUILTIN, "<i", 0))
        codes.append((code, oc.string(_OPCODE_CUSTOM) or ""))
    graph = model.tables(_MODEL_SUBGRAPHS)[0]
    shapes = [t.ints(_TENSOR_SHAPE) for t in graph.tables(_SUBGRAPH_TENSORS)]
    inputs = graph.ints(_SUBGRAPH_INPUTS)
    batch = shapes[inputs[0]][0] if inputs and 0 <= inputs[0] < len(shapes) and shapes[inputs[0]] else 1
    ops = []
    for i, op in enumerate(graph.tables(_SUBGRAPH_OPERATORS)):
        idx = op.scalar(_OP_OPCODE, "<I", 0)
        if idx >= len(codes):
            raise r._fail(f"operator {i} uses opcode {idx} of {len(codes)}")
        code, custom = codes[idx]
        name = f"CUSTOM:{custom}" if code == _OP_CUSTOM else _OP_NAMES.get(code, f"BUILTIN_{code}")
        macs, detail = _op_cost(code, op, shapes, r)
        outs = op.ints(_OP_OUTPUTS)
        out_shape = tuple(shapes[outs[0]]) if outs and 0 <= outs[0] < len(shapes) else ()
        ops.append(OpCost(i, name, int(macs), out_shape, detail))
    return ModelCost(tuple(ops), max(int(batch), 1))


def model_macs(path: Union[PathLike, bytes]) -> int:
    """Multiply-accumulates of one invocation of the model (see model_cost for what is counted)."""
    return model_cost(path).macs


# ---------------------------------------------------------------------------------------------- flatbuffer writing
def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema  # type: ignore
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema  # type: ignore
        except ImportError:
            raise ModelError(
                "writing model metadata needs the TFLite schema bindings: pip install ai-edge-litert "
                "(or tensorflow)"
            ) from None
    return schema


def write_metadata(path_in: PathLike, path_out: PathLike, meta: Optional[Dict[str, Any]]) -> None:
    """Copy `path_in` to `path_out` with `meta` (JSON-serialisable) as its "edged" metadata entry,
    replacing any previous one (None = remove it). `path_out` may equal `path_in`."""
    import flatbuffers  # dependency of ai-edge-litert and tensorflow

    schema = _schema()
    buf = check_model_file(path_in)
    payload = b"" if meta is None else json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(buf, 0))
    for b in model.buffers or []:
        if b.offset and b.offset > 1:
            raise ModelError(f"{path_in}: models with external (>2 GB) weight buffers are not supported")
    model.metadata = [m for m in (model.metadata or []) if _decode(m.name) != METADATA_NAME]
    if meta is not None:
        new_buffer = schema.BufferT()
        new_buffer.data = np.frombuffer(payload, np.uint8)
        model.buffers = list(model.buffers or []) + [new_buffer]
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)

    # Pack weights 16-byte aligned like the converter does (the generated Pack aligns to 1 byte).
    class _AlignedBuffer(schema.BufferT):  # type: ignore[misc, valid-type]
        def Pack(self, builder: Any) -> int:
            data = None
            if self.data is not None and len(self.data):
                raw = np.ascontiguousarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(raw), 16)
                builder.head = builder.head - len(raw)
                builder.Bytes[builder.head : builder.head + len(raw)] = raw
                builder.vectorNumElems = len(raw)
                data = builder.EndVector()
            schema.BufferStart(builder)
            if data is not None:
                schema.BufferAddData(builder, data)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)

    aligned = []
    for b in model.buffers:
        a = _AlignedBuffer()
        a.data, a.offset, a.size = b.data, b.offset, b.size
        aligned.append(a)
    model.buffers = aligned
    builder = flatbuffers.Builder(len(buf) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    out = bytes(builder.Output())
    tmp = Path(str(path_out) + ".tmp")
    tmp.write_bytes(out)
    os.replace(tmp, path_out)


def _decode(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


_TENSOR_BUFFER = 2
_OP_RESHAPE = 22


def resized_model(path_or_bytes: Union[PathLike, bytes], height: int, width: int) -> bytes:
    """The model's bytes with the constant shapes of its RESHAPE operators rewritten for an input of
    height x width (NHWC image input), so `resize_tensor_input` + `allocate_tensors` work: the converter
    writes nearest-neighbour upsampling as RESHAPE / TILE / RESHAPE with shapes fixed at conversion.

    A shape's dimension 1 scales with the height and the next dimension that is not 1 (before the last,
    the channels) with the width; anything else is left alone. Raises ModelError when a dimension would
    not scale to a whole number (the model cannot run at that size)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        buf, source = bytes(path_or_bytes), "<model bytes>"
    else:
        source = str(path_or_bytes)
        buf = check_model_file(path_or_bytes)
    out = bytearray(buf)
    r = _Reader(buf, source)
    model = r.table(r.u32(0))
    codes = [max(oc.scalar(_OPCODE_DEPRECATED, "<b", 0), oc.scalar(_OPCODE_BUILTIN, "<i", 0))
             for oc in model.tables(_MODEL_OPCODES)]
    buffers = model.tables(_MODEL_BUFFERS)
    graph = model.tables(_MODEL_SUBGRAPHS)[0]
    tensors = graph.tables(_SUBGRAPH_TENSORS)
    inputs = graph.ints(_SUBGRAPH_INPUTS)
    shape0 = tensors[inputs[0]].ints(_TENSOR_SHAPE)
    if len(shape0) != 4:
        raise ModelError(f"{source}: expected an NHWC image input, got shape {shape0}")
    h0, w0 = shape0[1], shape0[2]
    for op in graph.tables(_SUBGRAPH_OPERATORS):
        if codes[op.scalar(_OP_OPCODE, "<I", 0)] != _OP_RESHAPE:
            continue
        ins = op.ints(_OP_INPUTS)
        if len(ins) < 2:
            continue
        b = tensors[ins[1]].scalar(_TENSOR_BUFFER, "<I", 0)
        start, n = buffers[b].vector(_BUFFER_DATA) if 0 < b < len(buffers) else (0, 0)
        if not start or n % 4:
            continue  # a shape computed at run time: nothing to rewrite
        dims = list(struct.unpack_from(f"<{n // 4}i", buf, start))
        if len(dims) < 4:
            continue
        new = list(dims)
        for axis, scale in ((1, (height, h0)), (next((i for i in range(2, len(dims) - 1) if dims[i] != 1), None), (width, w0))):
            if axis is None:
                continue
            value = dims[axis] * scale[0]
            if value % scale[1]:
                raise ModelError(f"{source}: cannot run at {height}x{width}: a reshape dimension {dims[axis]} "
                                 f"does not scale to a whole number")
            new[axis] = value // scale[1]
        struct.pack_into(f"<{len(new)}i", out, start, *new)
    return bytes(out)
