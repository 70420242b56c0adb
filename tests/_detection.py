"""Detector quality on real video, shared by the model tests: person recall and precision at IoU 0.5."""

from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

from tests.conftest import shared_path


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def tud_recall_precision(detector, every: int = 3) -> Tuple[float, float, int, int]:
    """(recall, precision, frames read, ground-truth boxes) of `detector.detect` on every `every`-th frame
    of the MOT15 TUD-Stadtmitte video (video frame i = gt frame i + 1); detections matched greedily, best
    first."""
    video = shared_path("data", "video", "MOT15-TUD-Stadtmitte.mp4")
    gt = np.loadtxt(shared_path("data", "mot15", "TUD-Stadtmitte", "gt", "gt.txt"), delimiter=",", ndmin=2)
    cap = cv2.VideoCapture(str(video))
    tp = fp = n_gt = index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % every == 0:
            rows = gt[gt[:, 0] == index + 1]
            boxes = np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1)
            n_gt += len(boxes)
            used = set()
            for box in detector.detect(frame).boxes:
                ious = [iou(box, g) if k not in used else 0.0 for k, g in enumerate(boxes)]
                k = int(np.argmax(ious)) if ious else -1
                if k >= 0 and ious[k] >= 0.5:
                    used.add(k)
                    tp += 1
                else:
                    fp += 1
        index += 1
    cap.release()
    return tp / max(n_gt, 1), tp / max(tp + fp, 1), index, n_gt
