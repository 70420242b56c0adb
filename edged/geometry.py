"""Vectorised 2-D geometry for zones and lines: many points against many polygons / lines at once.

Conventions (image coordinates: x to the right, y *down*):
- A directed line a -> b splits the plane in two sides. `signed_distance` is positive on the
  **right** of the line as seen standing on `a` looking towards `b` (in the image, with y down, the
  right-hand side of a left-to-right horizontal line is *below* it), negative on its left.
- A crossing from the left side to the right side is direction +1 ("left_to_right"), the opposite
  is -1 ("right_to_left").
- Point-in-polygon uses the even-odd rule; points exactly on an edge may fall either way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEFT_TO_RIGHT = 1
RIGHT_TO_LEFT = -1


def _as_points(points: np.ndarray | Sequence, what: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.shape == (2,):
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected an (N, 2) array of (x, y) points, got shape {arr.shape}")
    return arr


def pack_polygons(polygons: Sequence[np.ndarray | Sequence]) -> np.ndarray:
    """Stack polygons with different vertex counts into one (Z, Vmax, 2) array.

    Shorter polygons are padded by repeating their last vertex: the padding edges have zero length
    and never count as a ray crossing, so all polygons are tested in one numpy expression.
    """
    polys = [_as_points(p, f"polygon {i}") for i, p in enumerate(polygons)]
    for i, p in enumerate(polys):
        if len(p) < 3:
            raise ValueError(f"polygon {i}: needs at least 3 vertices, got {len(p)}")
    if not polys:
        return np.zeros((0, 3, 2), np.float64)
    vmax = max(len(p) for p in polys)
    out = np.empty((len(polys), vmax, 2), np.float64)
    for i, p in enumerate(polys):
        out[i, : len(p)] = p
        out[i, len(p):] = p[-1]
    return out


def points_in_polygons(points: np.ndarray, packed: np.ndarray, packed_prev: np.ndarray | None = None) -> np.ndarray:
    """(N, Z) bool: is point n inside polygon z (even-odd rule). `packed` from `pack_polygons`;
    `packed_prev` = np.roll(packed, 1, axis=1) (the edges' other ends) may be passed precomputed."""
    pts = _as_points(points, "points")
    if packed.ndim != 3 or packed.shape[2] != 2:
        raise ValueError(f"packed polygons: expected (Z, V, 2), got shape {packed.shape}")
    n, z = len(pts), packed.shape[0]
    if n == 0 or z == 0:
        return np.zeros((n, z), bool)
    vi = packed  # edge i -> j with j = i - 1 (closing edge included by the roll)
    vj = np.roll(packed, 1, axis=1) if packed_prev is None else packed_prev
    px = pts[:, 0][:, None, None]
    py = pts[:, 1][:, None, None]
    xi, yi = vi[None, :, :, 0], vi[None, :, :, 1]
    xj, yj = vj[None, :, :, 0], vj[None, :, :, 1]
    straddles = (yi > py) != (yj > py)
    dy = yj - yi
    # Where the edge does not straddle, dy may be 0; the value is masked out anyway.
    safe_dy = np.where(dy == 0.0, 1.0, dy)
    x_at_py = xi + (py - yi) * (xj - xi) / safe_dy
    crossings = straddles & (px < x_at_py)
    return (np.count_nonzero(crossings, axis=2) % 2) == 1


def point_in_polygon(points: np.ndarray, polygon: np.ndarray | Sequence) -> np.ndarray:
    """(N,) bool for one polygon."""
    return points_in_polygons(points, pack_polygons([polygon]))[:, 0]


def _cross(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    return ax * by - ay * bx


def signed_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, L) signed distance of each point to each infinite line a[l] -> b[l]; > 0 = right side."""
    pts = _as_points(points, "points")
    a = _as_points(a, "line starts")
    b = _as_points(b, "line ends")
    d = b - a
    length = np.hypot(d[:, 0], d[:, 1])
    if np.any(length == 0.0):
        raise ValueError("a line has identical endpoints")
    rel_x = pts[:, 0][:, None] - a[None, :, 0]
    rel_y = pts[:, 1][:, None] - a[None, :, 1]
    return _cross(d[None, :, 0], d[None, :, 1], rel_x, rel_y) / length[None, :]


def segments_intersect(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, L) bool: does segment p[n] -> q[n] meet segment a[l] -> b[l] (touching counts)."""
    p = _as_points(p, "segment starts")
    q = _as_points(q, "segment ends")
    a = _as_points(a, "line starts")
    b = _as_points(b, "line ends")
    if p.shape != q.shape:
        raise ValueError(f"segment starts {p.shape} and ends {q.shape} differ in shape")
    ab = (b - a)[None, :, :]  # (1, L, 2)
    pq = (q - p)[:, None, :]  # (N, 1, 2)
    pa = a[None, :, :] - p[:, None, :]  # (N, L, 2)
    pb = b[None, :, :] - p[:, None, :]
    qa = a[None, :, :] - q[:, None, :]
    # Side of p and q w.r.t. line ab, and of a and b w.r.t. segment pq.
    d1 = _cross(ab[..., 0], ab[..., 1], -pa[..., 0], -pa[..., 1])
    d2 = _cross(ab[..., 0], ab[..., 1], -qa[..., 0], -qa[..., 1])
    d3 = _cross(pq[..., 0], pq[..., 1], pa[..., 0], pa[..., 1])
    d4 = _cross(pq[..., 0], pq[..., 1], pb[..., 0], pb[..., 1])
    proper = (d1 * d2 <= 0) & (d3 * d4 <= 0)
    # All four zero = collinear: intersect only when the projections overlap.
    collinear = (d1 == 0) & (d2 == 0)
    if np.any(collinear):
        ab_len2 = np.maximum((ab[..., 0] ** 2 + ab[..., 1] ** 2), 1e-300)
        t_p = -(pa[..., 0] * ab[..., 0] + pa[..., 1] * ab[..., 1]) / ab_len2
        t_q = -(qa[..., 0] * ab[..., 0] + qa[..., 1] * ab[..., 1]) / ab_len2
        overlap = (np.maximum(t_p, t_q) >= 0) & (np.minimum(t_p, t_q) <= 1)
        proper = np.where(collinear, overlap, proper)
    return proper


def crossing_directions(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, L) int8: +1 when p -> q crosses segment a -> b from its left to its right side, -1 for the
    opposite, 0 when it does not cross (touching without changing side is 0). No hysteresis."""
    hit = segments_intersect(p, q, a, b)
    sp = np.sign(signed_distance(p, a, b))
    sq = np.sign(signed_distance(q, a, b))
    out = np.zeros(hit.shape, np.int8)
    out[hit & (sp < 0) & (sq > 0)] = LEFT_TO_RIGHT
    out[hit & (sp > 0) & (sq < 0)] = RIGHT_TO_LEFT
    return out
