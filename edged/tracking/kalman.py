"""Batched constant-velocity Kalman filter over box state (x, y, a, h, vx, vy, va, vh).

x, y is the box centre, a = w / h the aspect ratio, h the height: the filter of DeepSORT (Wojke et al.
2017), with process and measurement noise proportional to the box height (weights 1/20 for position,
1/160 for velocity).

Why the covariance is stored as 4 independent 2x2 blocks: the motion model only couples each coordinate
with its own velocity, the measurement picks the 4 positions, and every noise matrix (initial, process,
measurement) is diagonal. Starting from a diagonal covariance, predict and update therefore never create
cross terms between coordinates, so the full 8x8 matrix is exactly block-structured. Keeping only the
blocks makes predict/update/gating a handful of element-wise operations on (T, 4) arrays for all tracks
at once, with no matrix inversions: the innovation covariance is diagonal. `full_covariance` rebuilds the
8x8 matrix (tests compare it with the textbook formulas).

Layout: `mean` (T, 8); `cov` (T, 3, 4) with cov[:, 0] = var(position), cov[:, 1] = cov(position,
velocity), cov[:, 2] = var(velocity), each for the 4 coordinates x, y, a, h.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

# Squared-Mahalanobis 95% quantiles of the chi-square distribution by degrees of freedom.
CHI2INV95 = {1: 3.8415, 2: 5.9915, 3: 7.8147, 4: 9.4877, 5: 11.070, 6: 12.592, 7: 14.067, 8: 15.507, 9: 16.919}

STD_WEIGHT_POSITION = 1.0 / 20
STD_WEIGHT_VELOCITY = 1.0 / 160


def boxes_to_xyah(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 -> (N, 4) centre x, centre y, aspect w/h, height (float64)."""
    b = np.asarray(boxes, np.float64)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    out = np.empty((b.shape[0], 4))
    out[:, 0] = b[:, 0] + 0.5 * w
    out[:, 1] = b[:, 1] + 0.5 * h
    out[:, 2] = w / h
    out[:, 3] = h
    return out


def xyah_to_boxes(xyah: np.ndarray) -> np.ndarray:
    """(N, >=4) x y a h (extra columns ignored) -> (N, 4) x1 y1 x2 y2."""
    x, y, a, h = xyah[:, 0], xyah[:, 1], xyah[:, 2], xyah[:, 3]
    w = a * h
    out = np.empty((xyah.shape[0], 4))
    out[:, 0] = x - 0.5 * w
    out[:, 1] = y - 0.5 * h
    out[:, 2] = x + 0.5 * w
    out[:, 3] = y + 0.5 * h
    return out


def _height_scaled(h: np.ndarray, weight: float, aspect_std: float) -> np.ndarray:
    """(T, 4) variances [ (w*h)^2, (w*h)^2, aspect_std^2, (w*h)^2 ]."""
    s = np.empty((h.shape[0], 4))
    v = (weight * h) ** 2
    s[:, 0] = v
    s[:, 1] = v
    s[:, 2] = aspect_std * aspect_std
    s[:, 3] = v
    return s


def initiate(measurements: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """New tracks from (N, 4) xyah measurements: zero velocity, height-scaled uncertainty."""
    z = np.asarray(measurements, np.float64)
    n = z.shape[0]
    mean = np.zeros((n, 8))
    mean[:, :4] = z
    h = z[:, 3]
    cov = np.zeros((n, 3, 4))
    cov[:, 0] = _height_scaled(h, 2 * STD_WEIGHT_POSITION, 1e-2)
    cov[:, 2] = _height_scaled(h, 10 * STD_WEIGHT_VELOCITY, 1e-5)
    return mean, cov


def predict(mean: np.ndarray, cov: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One step ahead for all tracks (returns new arrays)."""
    h = mean[:, 3]
    q_pos = _height_scaled(h, STD_WEIGHT_POSITION, 1e-2)
    q_vel = _height_scaled(h, STD_WEIGHT_VELOCITY, 1e-5)
    new_mean = mean.copy()
    new_mean[:, :4] += mean[:, 4:]
    p, c, v = cov[:, 0], cov[:, 1], cov[:, 2]
    new_cov = np.empty_like(cov)
    # F P F^T + Q with F = [[1, 1], [0, 1]] per coordinate.
    new_cov[:, 0] = p + 2.0 * c + v + q_pos
    new_cov[:, 1] = c + v
    new_cov[:, 2] = v + q_vel
    return new_mean, new_cov


def innovation_variance(mean: np.ndarray, cov: np.ndarray, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """(T, 4) diagonal of H P H^T + R. With `scores`, R's standard deviations are scaled by
    (1 - score) (NSA Kalman of GIAOTracker / StrongSORT: confident detections are trusted more)."""
    r = _height_scaled(mean[:, 3], STD_WEIGHT_POSITION, 1e-1)
    if scores is not None:
        r *= ((1.0 - np.asarray(scores, np.float64)) ** 2)[:, None]
    return cov[:, 0] + r


def update(
    mean: np.ndarray, cov: np.ndarray, measurements: np.ndarray, scores: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Measurement update of T tracks with T xyah measurements (row-aligned); returns new arrays."""
    s = innovation_variance(mean, cov, scores)
    p, c, v = cov[:, 0], cov[:, 1], cov[:, 2]
    k_pos = p / s
    k_vel = c / s
    innovation = measurements - mean[:, :4]
    new_mean = np.empty_like(mean)
    new_mean[:, :4] = mean[:, :4] + k_pos * innovation
    new_mean[:, 4:] = mean[:, 4:] + k_vel * innovation
    new_cov = np.empty_like(cov)
    # P - K S K^T, block-wise.
    new_cov[:, 0] = p - k_pos * p
    new_cov[:, 1] = c - k_pos * c
    new_cov[:, 2] = v - k_vel * c
    return new_mean, new_cov


def gating_distance(mean: np.ndarray, cov: np.ndarray, measurements: np.ndarray) -> np.ndarray:
    """(T, N) squared Mahalanobis distance of every measurement to every track's projected state."""
    s = innovation_variance(mean, cov)
    d = measurements[None, :, :] - mean[:, None, :4]
    d *= d
    d *= (1.0 / s)[:, None, :]
    return d.sum(axis=2)


def full_covariance(cov: np.ndarray) -> np.ndarray:
    """(T, 8, 8) covariance matrices from the block layout."""
    t = cov.shape[0]
    full = np.zeros((t, 8, 8))
    idx = np.arange(4)
    full[:, idx, idx] = cov[:, 0]
    full[:, idx, idx + 4] = cov[:, 1]
    full[:, idx + 4, idx] = cov[:, 1]
    full[:, idx + 4, idx + 4] = cov[:, 2]
    return full
