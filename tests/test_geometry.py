"""edged.geometry against independent oracles: scikit-image's point-in-polygon and exact rational
segment intersection on integer grids."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import points_in_poly

from edged import geometry


def _random_polygon(rng: np.random.Generator, n: int) -> np.ndarray:
    """A simple (non self-intersecting) star-shaped polygon around a random centre."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.05, 0.4, n)
    centre = rng.uniform(0.3, 0.7, 2)
    return centre + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


@given(seed=st.integers(0, 2**32 - 1), n_polys=st.integers(1, 6))
@settings(max_examples=60, deadline=None)
def test_points_in_polygons_matches_skimage(seed: int, n_polys: int) -> None:
    rng = np.random.default_rng(seed)
    polys = [_random_polygon(rng, int(rng.integers(3, 12))) for _ in range(n_polys)]
    pts = rng.uniform(0, 1, (300, 2))
    got = geometry.points_in_polygons(pts, geometry.pack_polygons(polys))
    assert got.shape == (300, n_polys)
    for z, poly in enumerate(polys):
        expected = points_in_poly(pts, poly)
        # Points within float noise of an edge may legitimately differ between implementations.
        disagree = np.nonzero(got[:, z] != expected)[0]
        for i in disagree:
            d = min(_point_segment_distance(pts[i], poly[k], poly[(k + 1) % len(poly)]) for k in range(len(poly)))
            assert d < 1e-9, f"point {pts[i]} polygon {z}: got {got[i, z]}, skimage {expected[i]}"


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-300), 0, 1)
    return float(np.linalg.norm(p - (a + t * ab)))


def test_concave_polygon_and_padding() -> None:
    # A U shape: the notch (0.5, 0.8) is outside, the arms are inside. Packed with a triangle so the
    # U's padding edges are exercised too.
    u = [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.6, 0.9), (0.6, 0.5), (0.4, 0.5), (0.4, 0.9), (0.1, 0.9)]
    tri = [(0.0, 0.0), (0.2, 0.0), (0.0, 0.2)]
    pts = np.array([(0.5, 0.8), (0.2, 0.8), (0.8, 0.8), (0.5, 0.3), (0.05, 0.05), (0.95, 0.95)])
    got = geometry.points_in_polygons(pts, geometry.pack_polygons([tri, u]))
    assert got[:, 1].tolist() == [False, True, True, True, False, False]
    assert got[:, 0].tolist() == [False, False, False, False, True, False]
    assert geometry.point_in_polygon(pts, u).tolist() == got[:, 1].tolist()


def test_empty_inputs_give_empty_results() -> None:
    assert geometry.points_in_polygons(np.zeros((0, 2)), geometry.pack_polygons([[(0, 0), (1, 0), (0, 1)]])).shape == (0, 1)
    assert geometry.points_in_polygons(np.zeros((3, 2)), geometry.pack_polygons([])).shape == (3, 0)
    assert geometry.segments_intersect(np.zeros((0, 2)), np.zeros((0, 2)), [(0, 0)], [(1, 1)]).shape == (0, 1)


def _orient(a, b, c) -> int:
    v = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return (v > 0) - (v < 0)


def _on_segment(a, b, p) -> bool:
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def _exact_intersects(p, q, a, b) -> bool:
    """Textbook exact test (rational arithmetic, collinear cases included)."""
    p, q, a, b = ([Fraction(int(v)) for v in pt] for pt in (p, q, a, b))
    o1, o2, o3, o4 = _orient(a, b, p), _orient(a, b, q), _orient(p, q, a), _orient(p, q, b)
    if o1 != o2 and o3 != o4:
        return True
    return ((o1 == 0 and _on_segment(a, b, p)) or (o2 == 0 and _on_segment(a, b, q))
            or (o3 == 0 and _on_segment(p, q, a)) or (o4 == 0 and _on_segment(p, q, b)))


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_segments_intersect_matches_exact_oracle(seed: int) -> None:
    # Small integer grid: many touching and collinear cases, all exactly representable.
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 6, (40, 2)).astype(float)
    q = rng.integers(0, 6, (40, 2)).astype(float)
    a = rng.integers(0, 6, (7, 2)).astype(float)
    b = rng.integers(0, 6, (7, 2)).astype(float)
    same = np.all(a == b, axis=1)
    b[same, 0] += 1  # lines need distinct endpoints
    got = geometry.segments_intersect(p, q, a, b)
    for n in range(len(p)):
        for ln in range(len(a)):
            assert got[n, ln] == _exact_intersects(p[n], q[n], a[ln], b[ln]), (p[n], q[n], a[ln], b[ln])


def test_side_and_direction_convention() -> None:
    # Horizontal line drawn left to right: with image y pointing down, below it is the right side.
    a, b = np.array([[0.0, 0.5]]), np.array([[1.0, 0.5]])
    assert geometry.signed_distance([(0.5, 0.7)], a, b)[0, 0] == pytest.approx(0.2)
    assert geometry.signed_distance([(0.5, 0.3)], a, b)[0, 0] == pytest.approx(-0.2)
    moving_down = geometry.crossing_directions([(0.5, 0.4)], [(0.5, 0.6)], a, b)
    moving_up = geometry.crossing_directions([(0.5, 0.6)], [(0.5, 0.4)], a, b)
    past_the_end = geometry.crossing_directions([(1.5, 0.4)], [(1.5, 0.6)], a, b)
    touching = geometry.crossing_directions([(0.5, 0.4)], [(0.5, 0.5)], a, b)
    assert (moving_down[0, 0], moving_up[0, 0], past_the_end[0, 0], touching[0, 0]) == (
        geometry.LEFT_TO_RIGHT, geometry.RIGHT_TO_LEFT, 0, 0)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="points: expected an \\(N, 2\\)"):
        geometry.points_in_polygons(np.zeros((3, 3)), geometry.pack_polygons([[(0, 0), (1, 0), (0, 1)]]))
    with pytest.raises(ValueError, match="polygon 1: needs at least 3 vertices"):
        geometry.pack_polygons([[(0, 0), (1, 0), (0, 1)], [(0, 0), (1, 1)]])
    with pytest.raises(ValueError, match="identical endpoints"):
        geometry.signed_distance([(0, 0)], [(1, 1)], [(1, 1)])
