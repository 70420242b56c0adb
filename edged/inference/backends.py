"""Detector backends: what runs the network, behind one small protocol.

A backend turns a letterboxed RGB uint8 canvas into the raw YOLO head tensors. Everything around it
(letterbox, head decoding, NMS, mapping boxes back to the frame) is shared, in edged.inference.yolo, so
every backend detects identically up to its arithmetic. `detector.backend` names one entry of REGISTRY;
docs/detector-backends.md says how to add one (ONNX Runtime, Hailo...).

This module imports only numpy at load time (the config validator reads REGISTRY): a backend's runtime
is imported when that backend is built.
"""

from __future__ import annotations

import collections
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Union, runtime_checkable

import numpy as np

from edged.inference import runtime
from edged.inference.runtime import ModelError, TensorSpec

PathLike = Union[str, Path]
CONFIG_KEY = "detector.backend"
# Interpreters kept for another canvas size than the model's own: each holds its own packed weights
# (about 25 MB for YOLOv3-tiny), so one, reused while the canvases fit it (edged.motion.GatedDetector).
SIZED_INTERPRETERS = 1


@runtime_checkable
class DetectorBackend(Protocol):
    """What YoloDetector needs from a backend. Attributes are fixed once the backend is built."""

    name: str  # the registry name, e.g. "tflite"
    model_path: Path
    metadata: Optional[Dict[str, Any]]  # the model's edged metadata (anchors, classes, heads, input_size)
    input_spec: TensorSpec  # shape (1, H, W, 3), dtype and quantization of the network input
    output_specs: List[TensorSpec]  # the raw outputs; heads are found by TensorSpec.name
    macs: int  # multiply-accumulates of one invocation (0 when the backend cannot tell)

    def run(self, canvas: np.ndarray) -> List[np.ndarray]:
        """(H, W, 3) uint8 RGB canvas -> one array per output_specs entry, as the model stores it
        (quantized outputs stay quantized: the decoder dequantizes with the spec's scale/zero point).
        The arrays may be reused by the next call."""
        ...


BackendFactory = Callable[..., DetectorBackend]


# ---------------------------------------------------------------------------------------------- input feed
def canvas_feed(spec: TensorSpec) -> Callable[[np.ndarray], np.ndarray]:
    """A function (H, W, 3) uint8 RGB pixels -> the (1, H, W, 3) array the input tensor stores, for an
    input that encodes pixel/255 (Darknet's normalisation; the converter's models all do)."""
    unit = spec.quantized and abs(spec.scale * 255.0 - 1.0) < 1e-3
    if unit and spec.dtype == np.uint8 and spec.zero_point == 0:
        return lambda canvas: canvas[None]  # the stored value is the pixel
    if unit and spec.dtype == np.int8 and spec.zero_point == -128:
        return lambda canvas: (canvas ^ np.uint8(0x80)).view(np.int8)[None]  # pixel - 128, no widening copy
    if spec.quantized:
        return lambda canvas: runtime.quantize(canvas.astype(np.float32) * np.float32(1.0 / 255.0), spec)[None]
    return lambda canvas: (canvas.astype(spec.dtype) * spec.dtype.type(1.0 / 255.0))[None]


# ---------------------------------------------------------------------------------------------- TFLite
class TFLiteBackend:
    """TFLite (LiteRT / tflite-runtime / TensorFlow) on the CPU with XNNPACK, or with the Edge TPU
    delegate (`delegate="edgetpu"`, a model compiled by edgetpu_compiler, libedgetpu installed)."""

    def __init__(self, model_path: PathLike, *, threads: int = 2, edgetpu_device: str = "usb:0",
                 delegate: str = "cpu", name: str = "tflite"):
        self.name = name
        self.model_path = Path(model_path)
        self.metadata = runtime.read_metadata(self.model_path)
        self.interpreter = runtime.load_interpreter(
            self.model_path, threads=threads, delegate=delegate, edgetpu_device=edgetpu_device,
            cpu_hint=f"{CONFIG_KEY}: tflite", edgetpu_hint=f"{CONFIG_KEY}: edgetpu",
        )
        inputs = runtime.input_specs(self.interpreter)
        if len(inputs) != 1:
            raise ModelError(f"{self.model_path}: a detector has one image input, this model has {len(inputs)}")
        self.input_spec = inputs[0]
        self.output_specs = runtime.output_specs(self.interpreter)
        # An Edge TPU compiled graph hides its convolutions in one custom op: its MACs count as 0 here.
        self.macs = runtime.model_macs(self.model_path)
        self._feed = canvas_feed(self.input_spec)
        self._threads = threads
        # Smaller canvases (region-based detection): interpreters of the same model at other input sizes,
        # built on first use and kept for the few sizes in use (an Edge TPU graph is compiled for one size).
        self.resizable = delegate == "cpu"
        self._sized: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
        self._unsupported: set = set()

    def can_run(self, height: int, width: int) -> bool:
        """Whether a canvas of this size can be run (the native size always can)."""
        native = tuple(self.input_spec.shape[1:3])
        if (height, width) == native:
            return True
        if not self.resizable or (height, width) in self._unsupported:
            return False
        try:
            self._interpreter_for(height, width)
        except (ModelError, RuntimeError, ValueError):
            self._unsupported.add((height, width))
            return False
        return True

    def _interpreter_for(self, height: int, width: int) -> Any:
        key = (height, width)
        it = self._sized.get(key)
        if it is None:
            while len(self._sized) >= SIZED_INTERPRETERS:  # free the old one first: one at a time in memory
                self._sized.popitem(last=False)
            data = runtime.resized_model(self.model_path, height, width)
            it = runtime.load_interpreter(data, threads=self._threads, input_shape=[1, height, width, 3])
            self._sized[key] = it
        self._sized.move_to_end(key)
        return it

    def run(self, canvas: np.ndarray) -> List[np.ndarray]:
        it = self.interpreter
        if canvas.shape[:2] != tuple(self.input_spec.shape[1:3]):
            it = self._interpreter_for(canvas.shape[0], canvas.shape[1])
        it.set_tensor(self.input_spec.index, self._feed(canvas))
        it.invoke()
        return [it.get_tensor(s.index) for s in self.output_specs]


def _tflite(model_path: PathLike, *, threads: int = 2, edgetpu_device: str = "usb:0") -> TFLiteBackend:
    return TFLiteBackend(model_path, threads=threads, edgetpu_device=edgetpu_device)


def _edgetpu(model_path: PathLike, *, threads: int = 2, edgetpu_device: str = "usb:0") -> TFLiteBackend:
    return TFLiteBackend(model_path, threads=threads, edgetpu_device=edgetpu_device, delegate="edgetpu", name="edgetpu")


# ---------------------------------------------------------------------------------------------- registry
# name -> factory(model_path, *, threads, edgetpu_device) -> DetectorBackend, or "module:function" for a
# backend whose runtime should be imported only when it is chosen. Add a backend with one line here.
REGISTRY: Dict[str, Union[str, BackendFactory]] = {
    "tflite": _tflite,
    "edgetpu": _edgetpu,
}


def known() -> List[str]:
    return sorted(REGISTRY)


def unknown_backend_message(name: object) -> str:
    return f"{CONFIG_KEY}: unknown detector backend {name!r}; known backends: {', '.join(known())}"


def check_name(name: str) -> str:
    """`name` when it is registered, else ValueError naming detector.backend and the known ones."""
    if name not in REGISTRY:
        raise ValueError(unknown_backend_message(name))
    return name


def _factory(name: str) -> BackendFactory:
    entry = REGISTRY[check_name(name)]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"{CONFIG_KEY}: {name}: cannot load {entry} ({exc})") from None
    return entry


def create(name: str, model_path: PathLike, *, threads: int = 2, edgetpu_device: str = "usb:0") -> DetectorBackend:
    """Build the backend registered as `name` for `model_path`."""
    backend = _factory(name)(model_path, threads=threads, edgetpu_device=edgetpu_device)
    missing = [a for a in ("name", "model_path", "metadata", "input_spec", "output_specs", "macs", "run")
               if not hasattr(backend, a)]
    if missing:
        raise ModelError(f"{CONFIG_KEY}: {name}: the backend lacks {', '.join(missing)} (see docs/detector-backends.md)")
    return backend
