"""YOLO (Darknet `yolo`-head family) detector on a TFLite model: YOLOv3, YOLOv3-tiny, Yolo-Fastest...

The model outputs the raw head tensors; decoding happens here in numpy exactly as Darknet does it
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

from edged.inference import runtime
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


def letterbox(image_bgr: np.ndarray, net_h: int, net_w: int, out: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Letterbox]:
    """RGB uint8 (net_h, net_w, 3) network input with the frame resized into it, aspect kept."""
    h, w = image_bgr.shape[:2]
    lb = letterbox_params(h, w, net_h, net_w)
    if out is None:
        out = np.empty((net_h, net_w, 3), np.uint8)
    out[...] = LETTERBOX_FILL
    # INTER_LINEAR_EXACT: OpenCV's INTER_LINEAR rounds differently in its x86 and ARM SIMD paths (e.g.
    # 640x480 -> 416x312), so a Raspberry Pi would see other network inputs than x86; EXACT is bit-exact.
    resized = image_bgr if (lb.new_w, lb.new_h) == (w, h) else cv2.resize(image_bgr, (lb.new_w, lb.new_h), interpolation=cv2.INTER_LINEAR_EXACT)
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
    ):
        self.model_path = Path(model_path)
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in 0..1, got {score_threshold}")
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        meta = runtime.read_metadata(self.model_path)
        if meta is None:
            raise ModelError(
                f"{self.model_path}: no '{runtime.METADATA_NAME}' metadata (anchors, classes, input size); "
                "convert the Darknet model with `edged models convert` so it carries them"
            )
        self.metadata: Dict[str, Any] = meta
        self.interpreter = runtime.load_interpreter(self.model_path, threads=threads, delegate=delegate, edgetpu_device=edgetpu_device)
        self._setup(meta, input_size)
        self._class_ids = self._allowed_class_ids(classes)
        self._canvas = np.empty((self.net_h, self.net_w, 3), np.uint8)
        self.last_timing: Dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Any, config_path: Union[str, Path, None] = None) -> "YoloDetector":
        from edged.config import resolve_path

        return cls(
            resolve_path(cfg.model, config_path),
            threads=cfg.threads,
            delegate=cfg.delegate,
            edgetpu_device=cfg.edgetpu_device,
            score_threshold=cfg.score_threshold,
            nms_iou=cfg.nms_iou,
            classes=list(cfg.classes) or None,
            max_detections=cfg.max_detections,
            input_size=cfg.input_size,
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
        ins = runtime.input_specs(self.interpreter)
        if len(ins) != 1 or len(ins[0].shape) != 4 or ins[0].shape[3] != 3:
            raise self._bad(f"expected one NHWC RGB image input, model has {[s.shape for s in ins]}")
        if (ins[0].shape[1], ins[0].shape[2]) != (net_h, net_w):
            raise self._bad(f"metadata input_size {net_h}x{net_w} does not match the input tensor {ins[0].shape}")
        if input_size is not None and (input_size, input_size) != (net_h, net_w):
            raise self._bad(f"model input is {net_h}x{net_w} but input_size {input_size} was asked; convert with --size {input_size}")
        self.input_spec = ins[0]
        self.net_h, self.net_w = net_h, net_w
        outs = {s.name: s for s in runtime.output_specs(self.interpreter)}
        self._heads: List[_Head] = []
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
            a = len(anchors)
            idx = np.arange(gh * gw * a)
            cell, anchor = idx // a, idx % a
            aw = np.array([x[0] for x in anchors], np.float32)[anchor]
            ah = np.array([x[1] for x in anchors], np.float32)[anchor]
            self._heads.append(_Head(spec, (gh, gw), a, nc, sxy, (cell % gw).astype(np.float32), (cell // gw).astype(np.float32), aw, ah))
        if not self._heads:
            raise self._bad("metadata lists no yolo heads")
        self.class_names: List[str] = names
        # uint8 pixels go straight in when the input encodes pixel/255 (the converter arranges that).
        sp = self.input_spec
        self._feed = "float"
        if sp.quantized:
            unit = abs(sp.scale * 255.0 - 1.0) < 1e-3
            if unit and sp.dtype == np.uint8 and sp.zero_point == 0:
                self._feed = "uint8"
            elif unit and sp.dtype == np.int8 and sp.zero_point == -128:
                self._feed = "int8"
            else:
                self._feed = "quantize"

    def _allowed_class_ids(self, classes: Optional[List[str]]) -> Optional[np.ndarray]:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.class_names]
        if unknown:
            raise ValueError(
                f"{self.model_path}: classes {unknown} are not in the model's {len(self.class_names)} classes "
                f"(e.g. {', '.join(self.class_names[:5])}...)"
            )
        return np.array(sorted({self.class_names.index(c) for c in classes}), np.int64)

    @property
    def input_size(self) -> Tuple[int, int]:
        """(height, width) of the network input."""
        return self.net_h, self.net_w

    # -- inference ------------------------------------------------------------------------------
    def _set_input(self, canvas: np.ndarray) -> None:
        sp = self.input_spec
        if self._feed == "uint8":
            x = canvas
        elif self._feed == "int8":
            x = (canvas ^ np.uint8(0x80)).view(np.int8)  # pixel - 128, without a widening copy
        elif self._feed == "quantize":
            x = runtime.quantize(canvas.astype(np.float32) * np.float32(1.0 / 255.0), sp)
        else:
            x = canvas.astype(sp.dtype) * sp.dtype.type(1.0 / 255.0)
        self.interpreter.set_tensor(sp.index, x[None])

    def raw_outputs(self, image_bgr: np.ndarray) -> Tuple[List[np.ndarray], Letterbox]:
        """Head tensors as stored by the model (quantized or float) for one frame."""
        check_image(image_bgr)
        canvas, lb = letterbox(image_bgr, self.net_h, self.net_w, self._canvas)
        self._set_input(canvas)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(h.spec.index) for h in self._heads], lb

    def detect(self, image_bgr: np.ndarray) -> Detections:
        t0 = time.perf_counter()
        check_image(image_bgr)
        h, w = image_bgr.shape[:2]
        canvas, lb = letterbox(image_bgr, self.net_h, self.net_w, self._canvas)
        self._set_input(canvas)
        t1 = time.perf_counter()
        self.interpreter.invoke()
        t2 = time.perf_counter()
        outputs = [self.interpreter.get_tensor(hd.spec.index) for hd in self._heads]
        boxes, scores, cls = decode_heads(outputs, self._heads, self.net_h, self.net_w, self.score_threshold, self._class_ids)
        keep = nms(boxes, scores, cls, self.nms_iou, self.max_detections)
        boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
        # Network pixels -> frame pixels (undo the letterbox), then clip to the frame.
        boxes[:, 0::2] = np.clip((boxes[:, 0::2] - lb.dx) * lb.sx, 0, w)
        boxes[:, 1::2] = np.clip((boxes[:, 1::2] - lb.dy) * lb.sy, 0, h)
        t3 = time.perf_counter()
        self.last_timing = {"pre_ms": (t1 - t0) * 1e3, "invoke_ms": (t2 - t1) * 1e3, "post_ms": (t3 - t2) * 1e3}
        return Detections(boxes=boxes.astype(np.float32), scores=scores.astype(np.float32), class_ids=cls.astype(np.int32))
