"""Cost matrices and assignment for the tracker: IoU, cosine distance, min-cost matching, cascade.

All functions work on whole matrices; the assignment itself is `scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np


def _load_linear_sum_assignment() -> Callable:
    """scipy's LAPJV solver. `import scipy.optimize` loads the whole optimize package (about 26 MB of
    private memory per process: a lot on a small board, and in a fleet of replayed devices); the solver
    is a self-contained C extension, `scipy/optimize/_lsap`, which scipy.optimize re-exports as is. Load
    just that file; fall back to the public import if scipy's layout ever changes."""
    try:
        import importlib.machinery
        import importlib.util
        from pathlib import Path

        import scipy

        path = next((Path(scipy.__file__).parent / "optimize").glob("_lsap.*"))
        loader = importlib.machinery.ExtensionFileLoader("_lsap", str(path))
        spec = importlib.util.spec_from_file_location("_lsap", path, loader=loader)
        if spec is None:
            raise ImportError(path)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module.linear_sum_assignment
    except Exception:  # StopIteration, ImportError: any surprise means "use the public path"
        from scipy.optimize import linear_sum_assignment as public

        return public


linear_sum_assignment = _load_linear_sum_assignment()

# Cost of a forbidden pair (gated out, other class). Anything above the stage threshold is treated alike.
INFTY_COST = 1e5

_EMPTY = np.zeros(0, np.intp)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(T, N) intersection over union of x1 y1 x2 y2 boxes."""
    lo = np.maximum(a[:, None, 0:2], b[None, :, 0:2])
    wh = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    wh -= lo
    np.maximum(wh, 0.0, out=wh)
    inter = wh[:, :, 0] * wh[:, :, 1]
    sa = a[:, 2:4] - a[:, 0:2]
    sb = b[:, 2:4] - b[:, 0:2]
    union = (sa[:, 0] * sa[:, 1])[:, None] + (sb[:, 0] * sb[:, 1])[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def cosine_distance_gallery(galleries: np.ndarray, det_features: np.ndarray) -> np.ndarray:
    """(T, N) smallest 1 - cos between each detection and the features in each track's gallery.

    `galleries` is (T, B, D); unused gallery rows are zero vectors: their distance is 1, above any
    useful threshold, so they never win the minimum unless the gallery is empty (then the track is
    simply not matched on appearance).
    """
    t, b, d = galleries.shape
    dots = (galleries.reshape(t * b, d) @ det_features.T).reshape(t, b, -1)
    return 1.0 - dots.max(axis=1)


def min_cost_matching(
    cost: np.ndarray, max_distance: float, rows: np.ndarray = None, cols: np.ndarray = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Optimal assignment on cost[rows][:, cols]; pairs costing more than `max_distance` are rejected.

    As in DeepSORT, costs above the threshold are clipped to just above it before solving, so a
    forbidden pair is no worse than leaving both sides unmatched. Returns matched (row, col) indices
    into `cost` (not into the subsets).
    """
    if rows is None and cols is None:
        sub = cost
        rows = np.arange(cost.shape[0])
        cols = np.arange(cost.shape[1])
    else:
        if rows is None:
            rows = np.arange(cost.shape[0])
        if cols is None:
            cols = np.arange(cost.shape[1])
        sub = cost[rows[:, None], cols[None, :]]
    if sub.size == 0:
        return _EMPTY, _EMPTY
    if rows.size == 1 or cols.size == 1:
        # A single row/column: the assignment is the minimum; skip the solver's overhead.
        k = int(np.argmin(sub))
        r, c = divmod(k, sub.shape[1])
        if sub[r, c] <= max_distance:
            return rows[r : r + 1], cols[c : c + 1]
        return _EMPTY, _EMPTY
    clipped = np.where(sub > max_distance, max_distance + 1e-5, sub)
    r, c = linear_sum_assignment(clipped)
    ok = sub[r, c] <= max_distance
    return rows[r[ok]], cols[c[ok]]


def matching_cascade(
    cost: np.ndarray, levels: np.ndarray, max_distance: float, max_level: int
) -> Tuple[np.ndarray, np.ndarray]:
    """DeepSORT's matching cascade on one precomputed (T, N) cost matrix.

    Tracks are matched level by level (level = frames since the last update, 1 first), each level
    against the detections left over by fresher tracks, so a recently seen track wins a detection
    over one that has been lost longer. Levels above `max_level` do not take part. Rows without any
    admissible entry are skipped: they cannot match at any level, so leaving them out changes nothing.
    """
    if cost.size == 0:
        return _EMPTY, _EMPTY
    candidate = (cost <= max_distance).any(axis=1) & (levels <= max_level)
    if not candidate.any():
        return _EMPTY, _EMPTY
    cand_rows = np.nonzero(candidate)[0]
    cand_levels = levels[cand_rows]
    if cand_levels.min() == cand_levels.max():  # common case: every candidate is at the same level
        return min_cost_matching(cost, max_distance, cand_rows, None)
    free = np.ones(cost.shape[1], bool)
    out_r, out_c = [], []
    for level in np.unique(cand_levels).tolist():
        cols = np.nonzero(free)[0]
        if cols.size == 0:
            break
        r, c = min_cost_matching(cost, max_distance, cand_rows[cand_levels == level], cols)
        if r.size:
            free[c] = False
            out_r.append(r)
            out_c.append(c)
    if not out_r:
        return _EMPTY, _EMPTY
    if len(out_r) == 1:
        return out_r[0], out_c[0]
    return np.concatenate(out_r), np.concatenate(out_c)
