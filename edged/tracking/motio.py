"""MOTChallenge files: detections (det.txt or DeepSORT-style .npy), results, ground truth.

Rows are the 10 MOT columns `frame, id, x, y, w, h, score, x3d, y3d, z3d` (boxes top-left + size, in
pixels, frames 1-based); a DeepSORT `.npy` appends one appearance feature per row after column 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np

from edged.types import Detections

PathLike = Union[str, Path]


class MotFormatError(ValueError):
    """A MOT file that cannot be used; the message names the file and the problem."""


def _check_rows(rows: np.ndarray, path: PathLike, min_cols: int) -> np.ndarray:
    if rows.ndim != 2 or (rows.size and rows.shape[1] < min_cols):
        raise MotFormatError(f"{path}: expected rows of at least {min_cols} MOT columns, got shape {rows.shape}")
    if rows.size and not np.isfinite(rows[:, :min_cols]).all():
        bad = int(np.flatnonzero(~np.isfinite(rows[:, :min_cols]).all(axis=1))[0])
        raise MotFormatError(f"{path}: row {bad + 1} has a non-numeric or infinite value")
    return rows


def load_text(path: PathLike, min_cols: int = 6) -> np.ndarray:
    """A comma-separated MOT text file as a float array (empty file -> (0, min_cols))."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise MotFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return np.zeros((0, min_cols))
    parsed = []
    for number, ln in enumerate(lines, 1):
        try:
            parsed.append([float(v) for v in ln.replace(" ", "").rstrip(",").split(",")])
        except ValueError as exc:
            raise MotFormatError(f"{path}: line {number} is not comma-separated numbers ({exc})") from None
        if len(parsed[-1]) != len(parsed[0]):
            raise MotFormatError(f"{path}: line {number} has {len(parsed[-1])} columns, line 1 has {len(parsed[0])}")
    return _check_rows(np.array(parsed), path, min_cols)


def load_detections(path: PathLike) -> np.ndarray:
    """Detections as an (M, 10 + D) float32 array: det.txt (D = 0) or a DeepSORT .npy (D features)."""
    p = Path(path)
    if p.suffix == ".npy":
        try:
            rows = np.load(p, allow_pickle=False)
        except OSError as exc:
            raise MotFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise MotFormatError(f"{path}: not a numpy array file ({exc})") from None
        rows = np.asarray(rows, np.float32)
        _check_rows(rows, path, 10)
    else:
        rows = load_text(p, 7)
        if rows.shape[1] < 10:
            rows = np.hstack([rows, np.full((rows.shape[0], 10 - rows.shape[1]), -1.0)])
        rows = rows[:, :10].astype(np.float32)
    return rows


def iter_frames(
    rows: np.ndarray, first: Optional[int] = None, last: Optional[int] = None
) -> Iterator[Tuple[int, Detections]]:
    """(frame, Detections) for every frame from `first` to `last` (default: the detections' range),
    including frames without detections. Class ids are 0; features are L2-normalised when present."""
    if rows.shape[0] == 0:
        return
    frames = rows[:, 0].astype(np.int64)
    order = np.argsort(frames, kind="stable")
    rows, frames = rows[order], frames[order]
    first = int(frames[0]) if first is None else first
    last = int(frames[-1]) if last is None else last
    boxes = rows[:, 2:6].astype(np.float32).copy()
    boxes[:, 2:] += boxes[:, :2]
    scores = rows[:, 6].astype(np.float32)
    feats = None
    if rows.shape[1] > 10:
        feats = rows[:, 10:].astype(np.float32)
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    starts = np.searchsorted(frames, np.arange(first, last + 2))
    for k, frame in enumerate(range(first, last + 1)):
        a, b = starts[k], starts[k + 1]
        yield frame, Detections(
            boxes=boxes[a:b],
            scores=scores[a:b],
            class_ids=np.zeros(b - a, np.int32),
            features=None if feats is None else feats[a:b],
        )


def write_results(path: PathLike, rows: np.ndarray) -> None:
    """MOT results `frame, id, x, y, w, h, 1, -1, -1, -1` (as the original DeepSORT writes them)."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in np.asarray(rows).reshape(-1, 6).tolist():
            f.write("%d,%d,%.2f,%.2f,%.2f,%.2f,1,-1,-1,-1\n" % (r[0], r[1], r[2], r[3], r[4], r[5]))
