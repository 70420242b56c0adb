"""`edged models ...`: inspect, convert and try models.

Sub-subcommands live in SUBCOMMANDS: name -> (add_arguments, run, help). Another module adds one by
registering a line there (e.g. the encoder builder's `build-encoder`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

from edged.inference.runtime import ModelError


# ---------------------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".tflite file")
    p.add_argument("--json", action="store_true", help="print the embedded metadata as JSON only")
    p.add_argument("--ops", action="store_true", help="also list the multiply-accumulates of every counted operator")


def _info(args: argparse.Namespace) -> int:
    from edged.inference import runtime

    meta = runtime.read_metadata(args.model)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    interp = runtime.load_interpreter(args.model, threads=1)
    print(f"{args.model}  ({Path(args.model).stat().st_size} bytes, runtime {runtime.backend_name()})")
    for kind, specs in (("input", runtime.input_specs(interp)), ("output", runtime.output_specs(interp))):
        for s in specs:
            q = f" scale={s.scale:.6g} zero_point={s.zero_point}" if s.quantized else ""
            print(f"  {kind:6s} {s.name}: {list(s.shape)} {s.dtype}{q}")
    _print_cost(runtime.model_cost(args.model), args.ops)
    if meta is None:
        print("  no edged metadata")
        return 0
    shown = {k: v for k, v in meta.items() if k != "classes"}
    classes = meta.get("classes")
    if isinstance(classes, list):
        shown["classes"] = f"{len(classes)}: " + ", ".join(map(str, classes[:8])) + (" ..." if len(classes) > 8 else "")
    print("  metadata:")
    for k in sorted(shown):
        print(f"    {k}: {json.dumps(shown[k]) if not isinstance(shown[k], str) else shown[k]}")
    return 0


def _print_cost(cost: Any, every_op: bool) -> None:
    per = f"per image (the model's batch is {cost.input_batch})" if cost.input_batch > 1 else "per image (one invocation)"
    counted = ", ".join(f"{name} x{n} {macs / 1e9:.3f}" for name, (n, macs) in cost.by_op().items() if macs)
    print(f"  compute: {cost.macs_per_sample / 1e9:.3f} GMAC {per} ({counted or 'no counted operator'})")
    if cost.custom:
        print(f"  compute: {len(cost.custom)} custom op(s) not counted ({', '.join(sorted(set(cost.custom)))}): "
              "an Edge TPU compiled model hides its convolutions; count the model it was compiled from")
    if every_op:
        for o in cost.ops:
            if o.macs:
                print(f"    #{o.index:<4d} {o.op:18s} {o.detail:24s} -> {list(o.output_shape)}  {o.macs / 1e6:10.2f} MMAC")


# ---------------------------------------------------------------------------------------------- convert
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", required=True, help="Darknet .cfg")
    p.add_argument("--weights", required=True, help="Darknet .weights")
    p.add_argument("--out", required=True, help="output .tflite")
    p.add_argument("--names", help="class names file, one per line (e.g. coco.names)")
    p.add_argument("--size", type=int, help="square input size (default: width/height of the cfg); multiple of 32")
    p.add_argument("--quant", choices=("int8", "uint8", "float32"), default="uint8",
                   help="full-integer model with int8 or uint8 input/output, or float32 (default uint8)")
    p.add_argument("--calib", action="append",
                   help="calibration frames: a folder of images, a video or 'skimage' (repeatable)")
    p.add_argument("--max-calib", type=int, default=64, help="frames taken from each --calib source")
    p.add_argument("--no-report", action="store_true", help="skip the int8-vs-float agreement check")
    p.add_argument("--yolo-mask", action="append", default=[], metavar="HEAD=MASK",
                   help="override the anchor mask of yolo head HEAD (0-based, cfg order), e.g. 1=1,2,3 for the "
                        "official yolov3-tiny weights (repeatable)")


def _convert(args: argparse.Namespace) -> int:
    from edged.inference import convert

    frames = []
    labels = []
    for src in args.calib or []:
        got = convert.load_frames(src, args.max_calib)
        frames += got
        labels.append(f"{src if src == 'skimage' else Path(src).name} ({len(got)})")
    if args.size is not None and (args.size < 32 or args.size % 32):
        print(f"--size {args.size}: must be a positive multiple of 32", file=sys.stderr)
        return 2
    masks = {}
    for item in args.yolo_mask:
        try:
            head, mask = item.split("=", 1)
            masks[int(head)] = [int(v) for v in mask.split(",")]
        except ValueError:
            print(f"--yolo-mask {item!r}: expected HEAD=MASK, e.g. 1=1,2,3", file=sys.stderr)
            return 2
    res = convert.convert_darknet(
        args.cfg, args.weights, args.out, names_path=args.names, input_size=args.size, quant=args.quant,
        calib=frames or None, calib_label=" + ".join(labels) or None, max_calib=len(frames) or 1,
        report=not args.no_report, yolo_masks=masks or None,
    )
    print(f"wrote {res.path} ({res.path.stat().st_size} bytes, {args.quant}, input {res.metadata['input_size']})")
    if res.agreement:
        a = res.agreement
        print(
            f"int8 vs float32 on {int(a['frames'])} calibration frames: objectness mean |diff| "
            f"{a['objectness_mean_abs_diff']:.4f}, class score mean |diff| {a['class_score_mean_abs_diff']:.5f}, "
            f"xy mean |diff| {a['xy_offset_mean_abs_diff_px']:.3f} px; detections float {int(a['float_detections'])} "
            f"int8 {int(a['int8_detections'])} matched {int(a['matched'])} (IoU 0.5, same class): "
            f"recall {a['int8_recall_of_float']:.3f} precision {a['int8_precision_vs_float']:.3f}"
        )
    return 0


# ---------------------------------------------------------------------------------------------- detect
def _detect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="detector .tflite")
    p.add_argument("image", nargs="+", help="image file(s)")
    p.add_argument("--score", type=float, default=0.3, help="score threshold")
    p.add_argument("--classes", default="", help="comma-separated class allow-list (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="tflite", help="detector backend (as detector.backend): tflite, edgetpu, ...")


def _detect(args: argparse.Namespace) -> int:
    import cv2

    from edged.inference.yolo import YoloDetector

    det = YoloDetector(args.model, threads=args.threads, backend=args.backend, score_threshold=args.score,
                       classes=[c.strip() for c in args.classes.split(",") if c.strip()] or None)
    for path in args.image:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            print(f"{path}: cannot read this image", file=sys.stderr)
            return 1
        d = det.detect(img)
        t = det.last_timing
        print(f"{path}: {len(d)} detections ({t['pre_ms']:.1f} + {t['invoke_ms']:.1f} + {t['post_ms']:.1f} ms)")
        for box, score, cid in zip(d.boxes, d.scores, d.class_ids):
            x1, y1, x2, y2 = (float(v) for v in box)
            print(f"  {det.class_names[cid]:<14s} {score:.3f}  {x1:7.1f} {y1:7.1f} {x2:7.1f} {y2:7.1f}")
    return 0


# name -> (add_arguments, run, help), or the dotted name of a module that provides
# `add_arguments(parser)`, `run(args) -> int` and `HELP` (imported only when `edged models` runs).
# Extend by adding one line, e.g. "build-encoder": "edged.inference.encoder_build".
SUBCOMMANDS: Dict[str, Union[str, Tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]]] = {
    "info": (_info_args, _info, "show a model's tensors and embedded metadata"),
    "convert": (_convert_args, _convert, "convert a Darknet YOLO (.cfg + .weights) to TFLite"),
    "detect": (_detect_args, _detect, "run a detector on images and print the boxes"),
    "build-encoder": "edged.inference.build_encoder",
}


def _resolve(entry: Any) -> Tuple[Callable[..., None], Callable[..., int], str]:
    if isinstance(entry, str):
        mod = importlib.import_module(entry)
        return mod.add_arguments, mod.run, getattr(mod, "HELP", (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else "")
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    for name, entry in SUBCOMMANDS.items():
        add, run_fn, help_text = _resolve(entry)
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_models_run=run_fn)


def run(args: argparse.Namespace) -> int:
    fn: Any = getattr(args, "_models_run", None)
    if fn is None:
        print("usage: edged models {" + ",".join(SUBCOMMANDS) + "} ...", file=sys.stderr)
        return 2
    from edged.inference.darknet import DarknetError

    try:
        from edged.inference.convert import ConvertError
    except ImportError:  # pragma: no cover - convert imports only numpy/cv2 at module level
        ConvertError = ModelError  # type: ignore
    try:
        return int(fn(args) or 0)
    except (ModelError, DarknetError, ConvertError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
