"""Detector benchmark: person recall/precision (IoU 0.5) and end-to-end speed, int8 vs float32 vs OpenCV.

    .venv/bin/python bench/bench_detector.py [--threads 2] [--out results.json]

Quality on ../shared/data/MOT17-mini (39 frames, gt flag==1 & class==1 are persons; person-like ignore
classes 2/7/8/12 neither count as misses nor as false positives) and on the TUD-Stadtmitte video (179
frames, video frame i = gt frame i+1, every MOT15 gt row is a considered person).

Models compared (converted once into --cache from ../shared/models/yolov3-tiny with the project's
converter, except the committed ones; --models picks some):
  int8-committed     edged/models/yolov3-tiny-416-int8.tflite (uint8 I/O, calibrated on skimage photos + demo scene)
  int8-320-committed edged/models/yolov3-tiny-320-int8.tflite (same recipe at 320x320)
  float32-320        the float reference at 320x320
  int8-io-int8       same calibration, int8 I/O
  int8-skimage-only  uint8 I/O calibrated on the 10 skimage photos only
  int8-mot17         uint8 I/O calibrated on the MOT17-mini frames (calibration-set sensitivity)
  float32         the float reference (equal to OpenCV's Darknet within 1e-3)
  opencv-fp32     cv2.dnn.readNetFromDarknet on the same weights (blobFromImage, forward, NMS)

Speed: pre + invoke + post per frame, models interleaved frame by frame in one run so they share the
machine's load; median and p90 over the TUD frames (640x480) and the MOT17 1080p frames. Beside each
time: the model's GMAC per frame (multiply-accumulates counted from its graph, one invocation per
frame), the device-independent cost, and the GMAC/s this machine achieved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.inference.yolo import YoloDetector  # noqa: E402

SHARED = ROOT.parent / "shared"
YT = SHARED / "models" / "yolov3-tiny"
MOT17 = SHARED / "data" / "MOT17-mini"
TUD_VIDEO = SHARED / "data" / "video" / "MOT15-TUD-Stadtmitte.mp4"
TUD_GT = SHARED / "data" / "mot15" / "TUD-Stadtmitte" / "gt" / "gt.txt"
COMMITTED = ROOT / "edged" / "models" / "yolov3-tiny-416-int8.tflite"
COMMITTED_320 = ROOT / "edged" / "models" / "yolov3-tiny-320-int8.tflite"
ALL_MODELS = ("int8-committed", "int8-320-committed", "int8-io-int8", "int8-skimage-only", "int8-mot17", "float32",
              "float32-320", "opencv-fp32")


def convert(out: Path, quant: str, calib: List[str], size: int = 416) -> Path:
    if out.exists():
        return out
    cmd = [sys.executable, "-m", "edged", "models", "convert", "--cfg", str(YT / "yolov3-tiny.cfg"),
           "--weights", str(YT / "yolov3-tiny.weights"), "--names", str(YT / "coco.names"), "--size", str(size),
           "--quant", quant, "--out", str(out), "--max-calib", "64", "--yolo-mask", "1=1,2,3"]
    for c in calib:
        cmd += ["--calib", c]
    print("converting:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def score_frame(boxes: np.ndarray, gt: np.ndarray, ignore: np.ndarray) -> Tuple[int, int]:
    """(true positives, false positives): detections (best first) greedily matched at IoU >= 0.5."""
    m = iou_matrix(boxes, gt)
    used = np.zeros(len(gt), bool)
    tp = fp = 0
    ign = iou_matrix(boxes, ignore)
    for i in range(len(boxes)):
        cand = np.where(~used & (m[i] >= 0.5))[0] if len(gt) else np.array([], int)
        if cand.size:
            used[cand[np.argmax(m[i, cand])]] = True
            tp += 1
        elif not (ign.shape[1] and ign[i].max() >= 0.5):
            fp += 1
    return tp, fp


def xyxy(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1) if len(rows) else np.zeros((0, 4))


def load_mot17() -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for seq in sorted(p for p in MOT17.iterdir() if p.is_dir()):
        gt = np.loadtxt(seq / "gt" / "gt.txt", delimiter=",", ndmin=2)
        for img in sorted((seq / "img1").glob("*.jpg")):
            rows = gt[gt[:, 0] == int(img.stem)]
            person = rows[(rows[:, 6] == 1) & (rows[:, 7] == 1)]
            ignore = rows[np.isin(rows[:, 7], [2, 7, 8, 12])]
            out.append((cv2.imread(str(img)), xyxy(person), xyxy(ignore)))
    return out


def load_tud() -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    gt = np.loadtxt(TUD_GT, delimiter=",", ndmin=2)
    gt = gt[gt[:, 6] != 0]  # considered rows (all of them in MOT15 TUD-Stadtmitte)
    cap = cv2.VideoCapture(str(TUD_VIDEO))
    out = []
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        out.append((frame, xyxy(gt[gt[:, 0] == i + 1]), np.zeros((0, 4))))
        i += 1
    return out


class OpenCVDarknet:
    """The usual OpenCV 4 DNN pipeline on the same Darknet weights (fp32), person class only."""

    def __init__(self, threads: int, cache: Path, score: float = 0.3, nms: float = 0.45):
        cv2.setNumThreads(threads)
        # Same anchor-mask fix as our conversion (the shipped cfg's 26x26 head mask is wrong).
        cfg = cache / "yolov3-tiny-mask123.cfg"
        text = (YT / "yolov3-tiny.cfg").read_text()
        assert text.count("mask = 0,1,2") == 1
        cfg.write_text(text.replace("mask = 0,1,2", "mask = 1,2,3"))
        self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(YT / "yolov3-tiny.weights"))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.outs = self.net.getUnconnectedOutLayersNames()
        self.score, self.nms = score, nms

    def detect(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        self.net.setInput(cv2.dnn.blobFromImage(img, 1 / 255.0, (416, 416), swapRB=True, crop=False))
        o = np.concatenate(self.net.forward(self.outs))
        o = o[o[:, 5] > self.score]
        cx, cy, bw, bh = o[:, 0] * w, o[:, 1] * h, o[:, 2] * w, o[:, 3] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, bw, bh], 1)
        keep = np.asarray(cv2.dnn.NMSBoxes(boxes, o[:, 5], self.score, self.nms), int).reshape(-1)
        b = boxes[keep]
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score", type=float, default=0.3)
    ap.add_argument("--cache", default="/tmp/edged-bench-detector", help="converted comparison models")
    ap.add_argument("--speed-frames", type=int, default=60, help="TUD frames timed per model (plus all MOT17)")
    ap.add_argument("--speed-only", action="store_true", help="skip the quality part")
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {', '.join(ALL_MODELS)}")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(ALL_MODELS))
    if unknown:
        print(f"--models: unknown {unknown}; known: {', '.join(ALL_MODELS)}", file=sys.stderr)
        return 2
    if not SHARED.exists():
        print(f"needs {SHARED}", file=sys.stderr)
        return 2
    if "opencv-fp32" in wanted and not hasattr(cv2.dnn, "readNetFromDarknet"):  # OpenCV 5 dropped the importer
        print(f"the OpenCV baseline needs OpenCV 4 (this is {cv2.__version__}, without readNetFromDarknet): run "
              "this benchmark in a venv with pip install 'opencv-python-headless<5'", file=sys.stderr)
        return 2
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    scene = cache / "scene"
    if not (scene / "scene.mp4").exists():
        subprocess.run([sys.executable, "-m", "edged", "demo-scene", "--out", str(scene), "--frames", "60"], check=True, cwd=ROOT)
    recipes = {
        "int8-committed": lambda: COMMITTED,
        "int8-320-committed": lambda: COMMITTED_320,
        "int8-io-int8": lambda: convert(cache / "yt-int8io.tflite", "int8", ["skimage", str(scene / "scene.mp4")]),
        "int8-skimage-only": lambda: convert(cache / "yt-skimage.tflite", "uint8", ["skimage"]),
        "int8-mot17": lambda: convert(cache / "yt-mot17.tflite", "uint8", [str(MOT17)]),
        "float32": lambda: convert(cache / "yt-float32.tflite", "float32", []),
        "float32-320": lambda: convert(cache / "yt-float32-320.tflite", "float32", [], size=320),
    }
    dets: Dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    detectors = {}
    for name in wanted:
        if name == "opencv-fp32":
            ocv = OpenCVDarknet(args.threads, cache, args.score)
            dets[name] = ocv.detect
            continue
        d = YoloDetector(recipes[name](), threads=args.threads, classes=["person"], score_threshold=args.score)
        detectors[name] = d
        dets[name] = (lambda d: lambda img: d.detect(img).boxes)(d)

    results: Dict[str, Dict] = {"threads": args.threads, "score_threshold": args.score, "quality": {}, "speed_ms": {}}
    datasets = {"MOT17-mini": load_mot17(), "TUD-Stadtmitte": load_tud()}
    for ds, frames in ({} if args.speed_only else datasets).items():
        n_gt = sum(len(g) for _, g, _ in frames)
        for name, fn in dets.items():
            tp = fp = 0
            for img, gt, ign in frames:
                a, b = score_frame(fn(img), gt, ign)
                tp, fp = tp + a, fp + b
            r = {"recall": tp / n_gt, "precision": tp / max(tp + fp, 1), "tp": tp, "fp": fp, "gt": n_gt}
            results["quality"].setdefault(ds, {})[name] = r
            print(f"{ds:15s} {name:18s} recall {r['recall']:.3f} precision {r['precision']:.3f} (tp {tp} fp {fp} gt {n_gt})", flush=True)

    # Speed: interleave the models frame by frame so they see the same machine load.
    speed_sets = {"TUD 640x480": [f for f, _, _ in datasets["TUD-Stadtmitte"][: args.speed_frames]],
                  "MOT17 1920x1080": [f for f, _, _ in datasets["MOT17-mini"] if f.shape[1] == 1920]}
    timed = [n for n in ("int8-committed", "int8-320-committed", "int8-io-int8", "float32", "opencv-fp32") if n in dets]
    for ds, frames in speed_sets.items():
        for name in timed:  # warm-up
            for f in frames[:3]:
                dets[name](f)
        times: Dict[str, List[float]] = {n: [] for n in timed}
        parts: Dict[str, List[Tuple[float, float, float]]] = {n: [] for n in timed if n in detectors}
        for f in frames:
            for name in timed:
                t0 = time.perf_counter()
                dets[name](f)
                times[name].append((time.perf_counter() - t0) * 1e3)
                if name in detectors:
                    t = detectors[name].last_timing
                    parts[name].append((t["pre_ms"], t["invoke_ms"], t["post_ms"]))
        for name in timed:
            ts = np.array(times[name])
            entry = {"median": float(np.median(ts)), "p90": float(np.percentile(ts, 90)), "frames": len(ts)}
            if name in parts:
                p = np.median(np.array(parts[name]), axis=0)
                entry.update(pre=float(p[0]), invoke=float(p[1]), post=float(p[2]))
            results["speed_ms"].setdefault(ds, {})[name] = entry
        base = results["speed_ms"][ds].get("opencv-fp32", {}).get("median")
        for name in timed:
            e = results["speed_ms"][ds][name]
            extra = f" (pre {e['pre']:.1f} + invoke {e['invoke']:.1f} + post {e['post']:.2f})" if "pre" in e else ""
            if name in detectors:  # the device-independent cost beside the time it took here
                e["gmac_per_frame"] = detectors[name].macs / 1e9
                e["gmac_per_s"] = e["gmac_per_frame"] / (e["invoke"] / 1e3)
                extra += f"  {e['gmac_per_frame']:.3f} GMAC/frame ({e['gmac_per_s']:.0f} GMAC/s in invoke)"
            if base:
                e["speedup_vs_opencv"] = base / e["median"]
                extra += f"  x{e['speedup_vs_opencv']:.2f} vs OpenCV"
            print(f"{ds:16s} {name:18s} end-to-end median {e['median']:7.2f} ms  p90 {e['p90']:7.2f}{extra}", flush=True)
    results["load_average"] = list(__import__("os").getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
