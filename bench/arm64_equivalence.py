"""Does edged give the same answers on arm64 (Raspberry Pi) as on x86? Dump on each platform, then compare.

  dump     run on one platform: detector + encoder on real frames, the daemon (`edged run`) on a real clip
  compare  two dumps -> agreement figures (markdown), exit 1 with --check when a bound is broken

What a dump holds (../shared data):
  * MOT17-mini: the first JPEG frame of each of the 7 sequences: decoded-pixel, letterbox and raw head-tensor
    hashes, detections (default config: person, score >= 0.3) and appearance embeddings of the visible
    ground-truth persons.
  * TUD-Stadtmitte video (MPEG-4 part 2): the first frames as decoded here (hashes, detections); with
    --pixels-from, the same frames as decoded by the other dump (x86), so the detector is compared on
    identical pixels too.
  * `edged run --max-frames N --no-mqtt --mot-out` on the video: the whole daemon (capture, detector,
    encoder, tracker); compare scores both outputs with `edged eval` against the ground truth.

Usage (scripts/check-arm64.sh runs these):
  python bench/arm64_equivalence.py dump --shared ../shared --out out/x86
  python bench/arm64_equivalence.py dump --shared ../shared --out out/arm64 --pixels-from out/x86   # in the root
  python bench/arm64_equivalence.py compare out/x86 out/arm64 --gt-dir ../shared/data/mot15 --check
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.config import DetectorConfig, EncoderConfig  # noqa: E402
from edged.inference import runtime  # noqa: E402
from edged.inference.encoder import AppearanceEncoder  # noqa: E402
from edged.inference.yolo import YoloDetector, letterbox  # noqa: E402

MOT17_SEQS = ("MOT17-02-FRCNN", "MOT17-04-FRCNN", "MOT17-05-FRCNN", "MOT17-09-FRCNN", "MOT17-10-FRCNN", "MOT17-11-FRCNN", "MOT17-13-FRCNN")
VIDEO = "video/MOT15-TUD-Stadtmitte.mp4"
VIDEO_GT = "TUD-Stadtmitte"
VIDEO_FRAMES = 3  # detector comparison on video frames (the clip for tracking is --track-frames)

# --check bounds. On identical pixels the runtime should agree (it does bit for bit: docs/arm64.md); on
# pixels each platform decoded itself, the video decoder's own rounding differences are allowed for.
BOUNDS = {
    "same_pixels_f1": 0.99,
    "same_pixels_max_score_diff": 0.02,
    "embedding_min_cosine": 0.995,
    "own_decode_f1": 0.9,
    "same_pixels_tracking_mota_diff": 0.01,
    "same_pixels_tracking_idf1_diff": 0.02,
    "own_decode_tracking_mota_diff": 0.05,
    "own_decode_tracking_idf1_diff": 0.1,
}


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- platform
def _hwcaps() -> Dict[str, str]:
    """AT_HWCAP / AT_HWCAP2 of this process (what XNNPACK's kernel choice is based on on arm64)."""
    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        return {"hwcap": hex(libc.getauxval(16)), "hwcap2": hex(libc.getauxval(26))}
    except (OSError, AttributeError):
        return {}


def _cpu_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    for key in ("Model", "model name", "CPU part"):
        for line in text.splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def platform_info() -> Dict[str, Any]:
    import scipy  # noqa: F401  (versions only)

    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - another runtime may be installed
        litert = "?"
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "scipy": scipy.__version__,
        "ai_edge_litert": litert,
        "cpu": _cpu_line(),
        "qemu_cpu": os.environ.get("QEMU_CPU", ""),
        **_hwcaps(),
    }


# ---------------------------------------------------------------------------------------------- inputs
def mot17_frames(shared: Path) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(name, BGR frame, visible gt person boxes x1y1x2y2) of the first frame of each MOT17-mini sequence."""
    out = []
    for seq in MOT17_SEQS:
        root = shared / "data" / "MOT17-mini" / seq
        image = cv2.imread(str(root / "img1" / "000001.jpg"))
        if image is None:
            raise SystemExit(f"cannot read {root / 'img1' / '000001.jpg'}")
        gt = np.loadtxt(root / "gt" / "gt.txt", delimiter=",", ndmin=2)
        rows = gt[(gt[:, 0] == 1) & (gt[:, 6] == 1) & (gt[:, 7] == 1) & (gt[:, 8] >= 0.5) & (gt[:, 5] >= 64)]
        boxes = np.column_stack([rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5]])
        out.append((seq, image, boxes))
    return out


def video_frames(shared: Path, n: int) -> List[np.ndarray]:
    cap = cv2.VideoCapture(str(shared / "data" / VIDEO))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            raise SystemExit(f"{shared / 'data' / VIDEO}: could read only {len(frames)} frames")
        frames.append(frame)
    cap.release()
    return frames


# ---------------------------------------------------------------------------------------------- dump
def _detections(det: YoloDetector, image: np.ndarray) -> Dict[str, Any]:
    d = det.detect(image)
    # The head tensors of that same invoke (no second run: it costs seconds per frame when emulated).
    it = det.backend.interpreter  # TFLite backends keep the tensors of the last invoke
    raw = [it.get_tensor(spec.index) for spec in runtime.output_specs(it)]
    canvas, _ = letterbox(image, det.net_h, det.net_w)
    return {
        "pixels": sha(image),
        "canvas": sha(canvas),
        "raw": sha(np.concatenate([r.ravel() for r in raw])),
        "boxes": d.boxes.round(3).tolist(),
        "scores": d.scores.tolist(),
        "classes": d.class_ids.tolist(),
    }


def write_lossless_clip(frames: List[np.ndarray], path: Path) -> None:
    """FFV1 (lossless, BGR): every platform decodes it to exactly these pixels."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 25.0, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"{path}: OpenCV cannot write FFV1 here")
    for f in frames:
        writer.write(f)
    writer.release()


def _track(source: Path, frames: int, workdir: Path) -> Dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "edged.yaml"
    cfg.write_text(
        json.dumps(  # JSON is YAML
            {
                "device_id": "equivalence",
                "state_dir": str(workdir / "state"),
                "capture": {"source": str(source)},
                "web": {"enabled": False},
            }
        )
    )
    mot = workdir / "track.txt"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "edged", "run", "--config", str(cfg), "--no-mqtt", "--max-frames", str(frames), "--mot-out", str(mot)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    if r.returncode != 0:
        raise SystemExit(f"edged run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return {"frames": frames, "seconds": round(time.perf_counter() - t0, 1), "mot": mot.read_text()}


def dump(args: argparse.Namespace) -> int:
    shared = Path(args.shared).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    det = YoloDetector.from_config(DetectorConfig())
    enc = AppearanceEncoder.from_config(EncoderConfig())
    result: Dict[str, Any] = {"platform": platform_info(), "mot17": {}, "video_own": [], "video_same": []}
    embeddings: Dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for name, image, boxes in mot17_frames(shared):
        result["mot17"][name] = _detections(det, image)
        embeddings[name] = enc.encode(image, boxes)
        result["mot17"][name]["embeddings"] = sha(embeddings[name])
    result["seconds_mot17"] = round(time.perf_counter() - t0, 1)
    np.savez(out / "embeddings.npz", **embeddings)
    if not args.no_video:
        frames = video_frames(shared, VIDEO_FRAMES)
        np.savez_compressed(out / "video_frames.npz", *frames)
        result["video_own"] = [_detections(det, f) for f in frames]
        if args.pixels_from:
            other = np.load(Path(args.pixels_from) / "video_frames.npz")
            theirs = [other[k] for k in sorted(other.files, key=lambda k: int(k.split("_")[1]))]
            result["video_same"] = [_detections(det, f) for f in theirs]
            diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(frames, theirs)]
            result["decode_vs_other"] = {
                "max_abs": int(max(d.max() for d in diffs)),
                "fraction_differing": float(np.mean([(d > 0).mean() for d in diffs])),
            }
    if not args.no_track:
        with tempfile.TemporaryDirectory() as tmp:
            result["track"] = _track(shared / "data" / VIDEO, args.track_frames, Path(tmp) / "own")
            # The same clip as pixels both platforms read identically: this platform's decode written
            # losslessly (x86), or the other dump's (--pixels-from).
            clip = Path(args.pixels_from) / "clip.mkv" if args.pixels_from else out / "clip.mkv"
            if not args.pixels_from:
                write_lossless_clip(video_frames(shared, args.track_frames), clip)
            result["track_same"] = _track(clip, args.track_frames, Path(tmp) / "same")
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    (out / "dump.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'dump.json'} ({result['seconds_total']} s on {result['platform']['machine']}, cpu {result['platform']['cpu']})")
    return 0


# ---------------------------------------------------------------------------------------------- compare
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match(a: Dict[str, Any], b: Dict[str, Any], iou_min: float = 0.5) -> Dict[str, Any]:
    """Greedy one-to-one matching of two detection lists (same class, IoU >= iou_min, best IoU first)."""
    ba, bb = np.array(a["boxes"], float).reshape(-1, 4), np.array(b["boxes"], float).reshape(-1, 4)
    ca, cb = np.array(a["classes"]), np.array(b["classes"])
    pairs: List[Tuple[int, int]] = []
    if len(ba) and len(bb):
        iou = _iou(ba, bb)
        iou[ca[:, None] != cb[None, :]] = 0
        while True:
            i, j = np.unravel_index(np.argmax(iou), iou.shape)
            if iou[i, j] < iou_min:
                break
            pairs.append((int(i), int(j)))
            iou[i, :] = 0
            iou[:, j] = 0
    sa, sb = np.array(a["scores"], float), np.array(b["scores"], float)
    return {
        "n_a": len(ba),
        "n_b": len(bb),
        "matched": len(pairs),
        "score_diffs": [abs(sa[i] - sb[j]) for i, j in pairs],
        "box_diffs": [float(np.abs(ba[i] - bb[j]).max()) for i, j in pairs],
    }


def agreement(pairs: List[Tuple[Dict[str, Any], Dict[str, Any]]]) -> Dict[str, Any]:
    ms = [match(a, b) for a, b in pairs]
    n_a, n_b, m = sum(x["n_a"] for x in ms), sum(x["n_b"] for x in ms), sum(x["matched"] for x in ms)
    sd = [d for x in ms for d in x["score_diffs"]]
    bd = [d for x in ms for d in x["box_diffs"]]
    return {
        "frames": len(pairs),
        "pixels_identical": sum(a["pixels"] == b["pixels"] for a, b in pairs),
        "canvas_identical": sum(a["canvas"] == b["canvas"] for a, b in pairs),
        "raw_identical": sum(a["raw"] == b["raw"] for a, b in pairs),
        "detections_x86": n_a,
        "detections_arm64": n_b,
        "f1": 2 * m / (n_a + n_b) if n_a + n_b else 1.0,
        "max_score_diff": max(sd, default=0.0),
        "mean_score_diff": float(np.mean(sd)) if sd else 0.0,
        "max_box_diff_px": max(bd, default=0.0),
    }


def _eval(mot_text: str, gt_path: Path, frames: int) -> Dict[str, float]:
    """`edged eval` of a --mot-out result against the ground truth of its first `frames` frames."""
    with tempfile.TemporaryDirectory() as tmp:
        gt_rows = [ln for ln in gt_path.read_text().splitlines() if ln.strip() and int(float(ln.split(",")[0])) <= frames]
        gt = Path(tmp) / VIDEO_GT / "gt" / "gt.txt"
        gt.parent.mkdir(parents=True)
        gt.write_text("\n".join(gt_rows) + "\n")
        res = Path(tmp) / "res.txt"
        res.write_text(mot_text)
        r = subprocess.run(
            [sys.executable, "-m", "edged", "eval", "--gt", str(gt), "--result", str(res), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        if r.returncode != 0:
            raise SystemExit(f"edged eval failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])["overall"]


def _mot_as_detections(text: str) -> Dict[int, Dict[str, Any]]:
    frames: Dict[int, Dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        f, _tid, x, y, w, h = (float(v) for v in line.split(",")[:6])
        d = frames.setdefault(int(f), {"boxes": [], "scores": [], "classes": []})
        d["boxes"].append([x, y, x + w, y + h])
        d["scores"].append(1.0)
        d["classes"].append(0)
    return frames


def compare(args: argparse.Namespace) -> int:
    a = json.loads((Path(args.x86) / "dump.json").read_text())
    b = json.loads((Path(args.arm64) / "dump.json").read_text())
    ea, eb = np.load(Path(args.x86) / "embeddings.npz"), np.load(Path(args.arm64) / "embeddings.npz")
    pa, pb = a["platform"], b["platform"]
    lines = [
        f"### x86 ({pa['machine']}, {pa['cpu']}) vs arm64 ({pb['machine']}, {pb['cpu']}, QEMU_CPU={pb['qemu_cpu'] or 'default'})",
        "",
        f"Both: Python {pa['python']}/{pb['python']}, numpy {pa['numpy']}/{pb['numpy']}, OpenCV {pa['opencv']}/{pb['opencv']}, "
        f"ai-edge-litert {pa['ai_edge_litert']}/{pb['ai_edge_litert']}. arm64 hwcap {pb.get('hwcap', '?')} hwcap2 {pb.get('hwcap2', '?')}.",
        "",
        "| input | frames | pixels identical | letterbox identical | head tensors identical | detections x86 / arm64 | F1 @ IoU 0.5 | max / mean score diff | max box diff (px) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    failures: List[str] = []
    rows = []
    names = sorted(set(a["mot17"]) & set(b["mot17"]))
    rows.append(("MOT17-mini JPEG (first frame x 7 sequences)", agreement([(a["mot17"][n], b["mot17"][n]) for n in names]), "same"))
    if a.get("video_own") and b.get("video_own"):
        rows.append(("TUD-Stadtmitte MPEG-4, each decodes", agreement(list(zip(a["video_own"], b["video_own"]))), "own"))
    if b.get("video_same"):
        rows.append(("TUD-Stadtmitte, x86-decoded pixels on both", agreement(list(zip(a["video_own"], b["video_same"]))), "same"))
    for label, ag, kind in rows:
        lines.append(
            f"| {label} | {ag['frames']} | {ag['pixels_identical']}/{ag['frames']} | {ag['canvas_identical']}/{ag['frames']} | "
            f"{ag['raw_identical']}/{ag['frames']} | {ag['detections_x86']} / {ag['detections_arm64']} | {ag['f1']:.3f} | "
            f"{ag['max_score_diff']:.4f} / {ag['mean_score_diff']:.4f} | {ag['max_box_diff_px']:.2f} |"
        )
        if kind == "same":
            if ag["f1"] < BOUNDS["same_pixels_f1"]:
                failures.append(f"{label}: F1 {ag['f1']:.3f} < {BOUNDS['same_pixels_f1']}")
            if ag["max_score_diff"] > BOUNDS["same_pixels_max_score_diff"]:
                failures.append(f"{label}: score diff {ag['max_score_diff']:.4f} > {BOUNDS['same_pixels_max_score_diff']}")
        elif ag["f1"] < BOUNDS["own_decode_f1"]:
            failures.append(f"{label}: F1 {ag['f1']:.3f} < {BOUNDS['own_decode_f1']}")
    if "decode_vs_other" in b:
        d = b["decode_vs_other"]
        lines += ["", f"Video decoding (OpenCV's FFmpeg, MPEG-4 part 2 -> BGR): {100 * d['fraction_differing']:.1f} % of pixel "
                      f"values differ between the platforms, by at most {d['max_abs']}."]
    cos = []
    identical = 0
    for n in names:
        x, y = ea[n], eb[n]
        identical += int(x.tobytes() == y.tobytes())
        if len(x):
            cos += list(np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    lines += ["", f"Appearance embeddings of {len(cos)} ground-truth person crops (MOT17-mini): cosine(x86, arm64) "
                  f"min {min(cos):.6f}, mean {np.mean(cos):.6f}; identical bytes on {identical}/{len(names)} frames."]
    if min(cos) < BOUNDS["embedding_min_cosine"]:
        failures.append(f"embedding cosine {min(cos):.4f} < {BOUNDS['embedding_min_cosine']}")
    if a.get("track") and b.get("track"):
        frames = min(a["track"]["frames"], b["track"]["frames"])
        gt = Path(args.gt_dir) / VIDEO_GT / "gt" / "gt.txt"
        lines += [
            "",
            f"`edged run` (capture, detector, encoder, tracker) on the first {frames} frames of TUD-Stadtmitte, "
            "`--mot-out` scored with `edged eval` against the ground truth of those frames:",
            "",
            "| frames as | platform | MOTA | IDF1 | HOTA | ID switches | FP | FN | seconds | track boxes vs x86: F1, max diff | output == x86 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, label, bound in (("track", "each platform decodes the MPEG-4", "own"), ("track_same", "x86-decoded, lossless FFV1 clip", "same")):
            if not (a.get(key) and b.get(key)):
                continue
            sa, sb = _eval(a[key]["mot"], gt, frames), _eval(b[key]["mot"], gt, frames)
            fa, fb = _mot_as_detections(a[key]["mot"]), _mot_as_detections(b[key]["mot"])
            empty = {"boxes": [], "scores": [], "classes": [], "pixels": "", "canvas": "", "raw": ""}
            tg = agreement([({**empty, **fa.get(f, {})}, {**empty, **fb.get(f, {})}) for f in sorted(set(fa) | set(fb))])
            same = a[key]["mot"] == b[key]["mot"]
            for plat, sc, d in (("x86", sa, a), ("arm64", sb, b)):
                vs = "" if plat == "x86" else f"{tg['f1']:.3f}, {tg['max_box_diff_px']:.1f} px"
                eq = "" if plat == "x86" else ("yes" if same else "no")
                lines.append(f"| {label} | {plat} | {sc['MOTA']:.3f} | {sc['IDF1']:.3f} | {sc['HOTA']:.3f} | {sc['IDSW']} | "
                             f"{sc['FP']} | {sc['FN']} | {d[key]['seconds']} | {vs} | {eq} |")
            kind = "same_pixels" if bound == "same" else "own_decode"
            for metric in ("MOTA", "IDF1"):
                limit = BOUNDS[f"{kind}_tracking_{metric.lower()}_diff"]
                if abs(sa[metric] - sb[metric]) > limit:
                    failures.append(f"tracking ({label}) {metric} {sa[metric]:.3f} vs {sb[metric]:.3f} (bound {limit})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    if failures:
        print("equivalence bounds broken:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1 if args.check else 0
    print("equivalence: every bound holds")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="run on this platform and write OUT/dump.json")
    d.add_argument("--shared", default=str(ROOT.parent / "shared"))
    d.add_argument("--out", required=True)
    d.add_argument("--pixels-from", help="a dump dir of the other platform: also run on its decoded video frames")
    d.add_argument("--no-video", action="store_true", help="skip the video frames")
    d.add_argument("--no-track", action="store_true", help="skip the edged run clip")
    d.add_argument("--track-frames", type=int, default=40)
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("x86")
    c.add_argument("arm64")
    c.add_argument("--gt-dir", default=str(ROOT.parent / "shared" / "data" / "mot15"))
    c.add_argument("--report", help="also write the markdown here")
    c.add_argument("--check", action="store_true", help="exit 1 when a bound is broken")
    args = p.parse_args(argv)
    return dump(args) if args.cmd == "dump" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
