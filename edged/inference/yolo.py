"""YOLO (Darknet `yolo`-head family) detector: YOLOv3, YOLOv3-tiny, Yolo-Fastest...

A detector backend (edged.inference.backends: TFLite on the CPU, the Edge TPU...) runs the network on
the letterboxed frame and returns the raw head tensors; decoding happens here in numpy exactly as Darknet does it
(sigmoid x/y + grid cell, exp w/h * anchor, objectness * class probability), so float32 and int8 models
of any input size share one decoder. Anchors, masks, class names and input size come from the "edged"
metadata the converter embeds in the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from edged.inference import backends, runtime
from edged.inference.backends import DetectorBackend
from edged.inference.runtime import ModelError, TensorSpec
from edged.types import Detections

LETTERBOX_FILL = 128  # Darknet fills with 0.5 grey; 128/255 is its nearest uint8 value.


# ---------------------------------------------------------------------------------------------- letterbox
@dataclass(frozen=True)
class Letterbox:
    """Where the resized image sits in the network input (Darknet `letterbox_image`)."""

    new_w: int
    new_h: int
    dx: int
    dy: int
    sx: float  # frame pixels per network pixel, x
    sy: float


def letterbox_params(img_h: int, img_w: int, net_h: int, net_w: int) -> Letterbox:
    # Same integer arithmetic as Darknet, so boxes map back exactly like Darknet's correct_yolo_boxes.
    if net_w / img_w < net_h / img_h:
        new_w, new_h = net_w, (img_h * net_w) // img_w
    else:
        new_w, new_h = (img_w * net_h) // img_h, net_h
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    return Letterbox(new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2, img_w / new_w, img_h / new_h)


# The resize of every network input (the letterbox here, region canvases in edged.motion): one choice,
# so that a region drawn at the letterbox scale has the letterbox's very pixels.
RESIZE = cv2.INTER_LINEAR_EXACT


def letterbox(image_bgr: np.ndarray, net_h: int, net_w: int, out: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Letterbox]:
    """RGB uint8 (net_h, net_w, 3) network input with the frame resized into it, aspect kept."""
    h, w = image_bgr.shape[:2]
    lb = letterbox_params(h, w, net_h, net_w)
    if out is None:
        out = np.empty((net_h, net_w, 3), np.uint8)
    out[...] = LETTERBOX_FILL
    # INTER_LINEAR_EXACT: OpenCV's INTER_LINEAR rounds differently in its x86 and ARM SIMD paths (e.g.
    # 640x480 -> 416x312), so a Raspberry Pi would see other network inputs than x86; EXACT is bit-exact.
    resized = image_bgr if (lb.new_w, lb.new_h) == (w, h) else cv2.resize(image_bgr, (lb.new_w, lb.new_h), interpolation=RESIZE)
    out[lb.dy : lb.dy + lb.new_h, lb.dx : lb.dx + lb.new_w] = resized[..., ::-1]
    return out, lb


def check_image(image: Any, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array (H x W x 3 uint8 BGR), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what}: expected shape H x W x 3 (BGR), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what}: empty image {image.shape}")
    return image


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class _Head:
    spec: TensorSpec
    grid: Tuple[int, int]  # (H, W)
    num_anchors: int
    num_classes: int
    scale_x_y: float
    # Per row of the (H*W*A, 5+C) view: cell x, cell y, anchor w, anchor h (network pixels).
    cx: np.ndarray
    cy: np.ndarray
    aw: np.ndarray
    ah: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def decode_heads(
    outputs: Sequence[np.ndarray],
    heads: Sequence[_Head],
    net_h: int,
    net_w: int,
    score_threshold: float,
    class_ids: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw head tensors (as stored, possibly quantized) -> (boxes x1y1x2y2 in network pixels, scores,
    class ids) of every (box, class) whose Darknet probability objectness * P(class) exceeds the threshold."""
    all_boxes, all_scores, all_cls = [], [], []
    # Darknet keeps a (box, class) when obj * p > thresh; since p <= 1 the box needs obj > thresh first.
    obj_logit = math.log(score_threshold / (1.0 - score_threshold)) if 0.0 < score_threshold < 1.0 else (-math.inf if score_threshold <= 0 else math.inf)
    for out, hd in zip(outputs, heads):
        rows = out.reshape(-1, 5 + hd.num_classes)
        obj = runtime.dequantize(rows[:, 4], hd.spec)
        sel = np.flatnonzero(obj > obj_logit)
        if sel.size == 0:
            continue
        r = runtime.dequantize(rows[sel], hd.spec)
        objp = _sigmoid(r[:, 4])
        cols = r[:, 5:] if class_ids is None else r[:, 5 + class_ids]
        probs = objp[:, None] * _sigmoid(cols)
        i, j = np.nonzero(probs > score_threshold)
        if i.size == 0:
            continue
        s = hd.scale_x_y
        gh, gw = hd.grid
        ri = sel[i]
        bx = (hd.cx[ri] + _sigmoid(r[i, 0]) * s - 0.5 * (s - 1.0)) * (net_w / gw)
        by = (hd.cy[ri] + _sigmoid(r[i, 1]) * s - 0.5 * (s - 1.0)) * (net_h / gh)
        bw = np.exp(r[i, 2]) * hd.aw[ri]
        bh = np.exp(r[i, 3]) * hd.ah[ri]
        all_boxes.append(np.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], axis=1))
        all_scores.append(probs[i, j])
        all_cls.append(j if class_ids is None else class_ids[j])
    if not all_boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32)
    return (
        np.concatenate(all_boxes).astype(np.float32),
        np.concatenate(all_scores).astype(np.float32),
        np.concatenate(all_cls).astype(np.int32),
    )


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, max_detections: int) -> np.ndarray:
    """Indices kept by class-aware greedy NMS (Darknet do_nms_sort semantics), best first."""
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    keep = np.asarray(cv2.dnn.NMSBoxesBatched(xywh, scores, class_ids, 0.0, float(iou)), np.int64).reshape(-1)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return keep[:max_detections]


# ---------------------------------------------------------------------------------------------- detector
# DetectorConfig keys `YoloDetector.configure` changes live; any other key needs a new detector.
LIVE_KEYS = ("score_threshold", "nms_iou", "classes", "max_detections")


def split_changes(old: Any, new: Any) -> Tuple[Dict[str, Any], List[str]]:
    """Differences between two DetectorConfigs: (keyword arguments for `configure`, sorted names of
    the changed keys that need the detector rebuilt, e.g. model, input_size, threads, delegate)."""
    a, b = old.model_dump(), new.model_dump()
    changed = [k for k in b if a.get(k) != b[k]]
    return {k: b[k] for k in changed if k in LIVE_KEYS}, sorted(k for k in changed if k not in LIVE_KEYS)


def _checked_post(score_threshold: float, nms_iou: float, max_detections: int) -> Tuple[float, float, int]:
    """The post-processing settings, checked (messages name the config keys)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"detector.score_threshold must be in 0..1, got {score_threshold}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"detector.nms_iou must be in (0, 1], got {nms_iou}")
    if int(max_detections) != max_detections or max_detections < 1:
        raise ValueError(f"detector.max_detections must be an integer >= 1, got {max_detections}")
    return float(score_threshold), float(nms_iou), int(max_detections)


class YoloDetector:
    """Detect objects in BGR frames with a converted Darknet YOLO TFLite model."""

    def __init__(
        self,
        model_path: Union[str, Path],
        *,
        threads: int = 2,
        delegate: str = "cpu",
        edgetpu_device: str = "usb:0",
        score_threshold: float = 0.3,
        nms_iou: float = 0.45,
        classes: Optional[List[str]] = None,
        max_detections: int = 100,
        input_size: Optional[int] = None,
        backend: Union[str, DetectorBackend, None] = None,
    ):
        """backend: a detector.backend name ("tflite", "edgetpu", ...) or a built DetectorBackend;
        None = "edgetpu" when delegate is "edgetpu", else "tflite"."""
        self.model_path = Path(model_path)
        self.score_threshold, self.nms_iou, self.max_detections = _checked_post(score_threshold, nms_iou, max_detections)
        if backend is None:
            if delegate not in ("cpu", "edgetpu"):
                raise ModelError(f"{self.model_path}: unknown delegate {delegate!r} (expected 'cpu' or 'edgetpu')")
            backend = "edgetpu" if delegate == "edgetpu" else "tflite"
        if isinstance(backend, str):
            backend = backends.create(backend, self.model_path, threads=threads, edgetpu_device=edgetpu_device)
        self.backend: DetectorBackend = backend
        # Multiply-accumulates of one detect() call: the device-independent cost of a frame.
        self.macs: int = int(backend.macs)
        meta = backend.metadata
        if meta is None:
            raise ModelError(
                f"{self.model_path}: no '{runtime.METADATA_NAME}' metadata (anchors, classes, input size); "
                "convert the Darknet model with `edged models convert` so it carries them"
            )
        self.metadata: Dict[str, Any] = meta
        self._setup(meta, input_size)
        self._class_ids = self._allowed_class_ids(classes)
        self._canvas = np.empty((self.net_h, self.net_w, 3), np.uint8)
        self.last_timing: Dict[str, float] = {}

    def configure(
        self,
        *,
        score_threshold: Optional[float] = None,
        nms_iou: Optional[float] = None,
        classes: Optional[List[str]] = None,
        max_detections: Optional[int] = None,
    ) -> None:
        """Change the post-processing live (`LIVE_KEYS`); the next `detect` uses it. None leaves a
        setting as it is; classes [] = every class. Checked like the constructor, all before any is
        applied: on a ValueError (naming the detector.* key) nothing has changed. Call it between two
        frames, on the thread that runs `detect`."""
        score, iou, cap = _checked_post(
            self.score_threshold if score_threshold is None else score_threshold,
            self.nms_iou if nms_iou is None else nms_iou,
            self.max_detections if max_detections is None else max_detections,
        )
        class_ids = self._class_ids if classes is None else self._allowed_class_ids(classes)
        self.score_threshold, self.nms_iou, self.max_detections, self._class_ids = score, iou, cap, class_ids

    @property
    def classes(self) -> List[str]:
        """Class names the detector reports ([] = all)."""
        return [] if self._class_ids is None else [self.class_names[i] for i in self._class_ids]

    @classmethod
    def from_config(cls, cfg: Any, config_path: Union[str, Path, None] = None) -> "YoloDetector":
        from edged.config import resolve_path

        return cls(
            resolve_path(cfg.model, config_path),
            threads=cfg.threads,
            edgetpu_device=cfg.edgetpu_device,
            score_threshold=cfg.score_threshold,
            nms_iou=cfg.nms_iou,
            classes=list(cfg.classes) or None,
            max_detections=cfg.max_detections,
            input_size=cfg.input_size,
            backend=cfg.backend,
        )

    # -- setup ----------------------------------------------------------------------------------
    def _bad(self, problem: str) -> ModelError:
        return ModelError(f"{self.model_path}: {problem}")

    def _setup(self, meta: Dict[str, Any], input_size: Optional[int]) -> None:
        if meta.get("family") != "yolo":
            raise self._bad(f"metadata says model family {meta.get('family')!r}, expected 'yolo' (is this an encoder?)")
        try:
            net_h, net_w = (int(v) for v in meta["input_size"])
            names = [str(n) for n in meta["classes"]]
            heads_meta = list(meta["heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._bad(f"metadata lacks or garbles input_size/classes/heads: {exc}") from None
        ins = [self.backend.input_spec]
        if len(ins[0].shape) != 4 or ins[0].shape[3] != 3:
            raise self._bad(f"expected one NHWC RGB image input, model has {[s.shape for s in ins]}")
        if (ins[0].shape[1], ins[0].shape[2]) != (net_h, net_w):
            raise self._bad(f"metadata input_size {net_h}x{net_w} does not match the input tensor {ins[0].shape}")
        if input_size is not None and (input_size, input_size) != (net_h, net_w):
            raise self._bad(f"model input is {net_h}x{net_w} but input_size {input_size} was asked; convert with --size {input_size}")
        self.input_spec = ins[0]
        self.net_h, self.net_w = net_h, net_w
        outs = {s.name: s for s in self.backend.output_specs}
        position = {s.name: k for k, s in enumerate(self.backend.output_specs)}
        self._head_outputs: List[int] = []  # index in the backend's outputs of each head
        self._heads: List[_Head] = []
        self._sized_heads: Dict[Tuple[int, int], List[_Head]] = {}
        for k, h in enumerate(heads_meta):
            try:
                tensor, (gh, gw) = h["tensor"], (int(v) for v in h["grid"])
                anchors = [(float(a[0]), float(a[1])) for a in h["anchors"]]
                nc = int(h.get("num_classes", len(names)))
                sxy = float(h.get("scale_x_y", 1.0))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise self._bad(f"metadata head {k} is malformed: {exc}") from None
            spec = outs.get(tensor)
            if spec is None:
                raise self._bad(f"metadata head {k} names output tensor {tensor!r}, the model has {sorted(outs)}")
            want = (1, gh, gw, len(anchors) * (5 + nc))
            if tuple(spec.shape) != want:
                raise self._bad(f"output {tensor!r} has shape {spec.shape}, metadata head {k} implies {want}")
            if nc != len(names):
                raise self._bad(f"head {k} has {nc} classes but the metadata lists {len(names)} class names")
            self._head_outputs.append(position[tensor])
            a = len(anchors)
            idx = np.arange(gh * gw * a)
            cell, anchor = idx // a, idx % a
            aw = np.array([x[0] for x in anchors], np.float32)[anchor]
            ah = np.array([x[1] for x in anchors], np.float32)[anchor]
            self._heads.append(_Head(spec, (gh, gw), a, nc, sxy, (cell % gw).astype(np.float32), (cell // gw).astype(np.float32), aw, ah))
        if not self._heads:
            raise self._bad("metadata lists no yolo heads")
        self.class_names: List[str] = names

    def _allowed_class_ids(self, classes: Optional[List[str]]) -> Optional[np.ndarray]:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.class_names]
        if unknown:
            raise ValueError(
                f"{self.model_path}: detector.classes {unknown} are not in the model's {len(self.class_names)} classes "
                f"(e.g. {', '.join(self.class_names[:5])}...)"
            )
        return np.array(sorted({self.class_names.index(c) for c in classes}), np.int64)

    @property
    def input_size(self) -> Tuple[int, int]:
        """(height, width) of the network input."""
        return self.net_h, self.net_w

    def can_run(self, height: int, width: int) -> bool:
        """Whether a canvas of this size (multiples of the largest head stride) can be detected on: the
        network is convolutional, so a smaller canvas costs proportionally fewer MACs (region-based
        detection packs its regions into the smallest canvas that holds them)."""
        stride = self.stride
        if height % stride or width % stride or height > self.net_h or width > self.net_w:
            return False
        check = getattr(self.backend, "can_run", None)
        return (height, width) == (self.net_h, self.net_w) or bool(check and check(height, width))

    @property
    def stride(self) -> int:
        """The largest head stride (network pixels per cell of the coarsest grid)."""
        return max(self.net_h // hd.grid[0] for hd in self._heads)

    def macs_at(self, height: int, width: int) -> int:
        """MACs of one call on a canvas of this size (the convolutions scale with the area)."""
        return int(round(self.macs * (height * width) / (self.net_h * self.net_w)))

    def _heads_at(self, height: int, width: int) -> List[_Head]:
        """The decoding heads for a canvas of another size: same anchors (network pixels), other grids."""
        key = (height, width)
        if (height, width) == (self.net_h, self.net_w):
            return self._heads
        heads = self._sized_heads.get(key)
        if heads is None:
            heads = []
            for hd in self._heads:
                stride = self.net_h // hd.grid[0]
                gh, gw = height // stride, width // stride
                a = hd.num_anchors
                idx = np.arange(gh * gw * a)
                cell, anchor = idx // a, idx % a
                aw, ah = hd.aw[:a], hd.ah[:a]
                heads.append(_Head(hd.spec, (gh, gw), a, hd.num_classes, hd.scale_x_y, (cell % gw).astype(np.float32),
                                   (cell // gw).astype(np.float32), aw[anchor], ah[anchor]))
            self._sized_heads[key] = heads
        return heads

    # -- inference ------------------------------------------------------------------------------
    def _run_heads(self, canvas: np.ndarray) -> List[np.ndarray]:
        outputs = self.backend.run(canvas)
        return [outputs[k] for k in self._head_outputs]

    def raw_outputs(self, image_bgr: np.ndarray) -> Tuple[List[np.ndarray], Letterbox]:
        """Head tensors as stored by the model (quantized or float) for one frame."""
        check_image(image_bgr)
        canvas, lb = letterbox(image_bgr, self.net_h, self.net_w, self._canvas)
        return self._run_heads(canvas), lb

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Detections in frame pixels for one whole frame (letterboxed into the network input)."""
        t0 = time.perf_counter()
        check_image(image_bgr)
        h, w = image_bgr.shape[:2]
        canvas, lb = letterbox(image_bgr, self.net_h, self.net_w, self._canvas)
        t1 = time.perf_counter()
        dets = self.detect_canvas(canvas)
        boxes = dets.boxes
        # Network pixels -> frame pixels (undo the letterbox), then clip to the frame.
        boxes[:, 0::2] = np.clip((boxes[:, 0::2] - lb.dx) * lb.sx, 0, w)
        boxes[:, 1::2] = np.clip((boxes[:, 1::2] - lb.dy) * lb.sy, 0, h)
        self.last_timing["pre_ms"] += (t1 - t0) * 1e3
        return dets

    def detect_canvas(self, canvas_rgb: np.ndarray) -> Detections:
        """Detections in network pixels for a ready network input (RGB uint8, net_h x net_w): region-based
        detection draws its own canvas (edged/motion.py)."""
        t1 = time.perf_counter()
        outputs = self._run_heads(canvas_rgb)
        t2 = time.perf_counter()
        h, w = canvas_rgb.shape[:2]
        boxes, scores, cls = decode_heads(outputs, self._heads_at(h, w), h, w, self.score_threshold, self._class_ids)
        keep = nms(boxes, scores, cls, self.nms_iou, self.max_detections)
        boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
        t3 = time.perf_counter()
        self.last_timing = {"pre_ms": 0.0, "invoke_ms": (t2 - t1) * 1e3, "post_ms": (t3 - t2) * 1e3}
        return Detections(boxes=boxes.astype(np.float32), scores=scores.astype(np.float32), class_ids=cls.astype(np.int32))
