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
    wh = b[:, 2:4] - b[:, 0:2]
    out = np.empty((b.shape[0], 4))
    out[:, 0:2] = b[:, 0:2] + 0.5 * wh
    out[:, 2] = wh[:, 0] / wh[:, 1]
    out[:, 3] = wh[:, 1]
    return out


def xyah_to_boxes(xyah: np.ndarray) -> np.ndarray:
    """(N, >=4) x y a h (extra columns ignored) -> (N, 4) x1 y1 x2 y2."""
    half = xyah[:, 2:4] * 0.5
    half[:, 0] *= xyah[:, 3]
    out = np.empty((xyah.shape[0], 4))
    np.subtract(xyah[:, 0:2], half, out=out[:, 0:2])
    np.add(xyah[:, 0:2], half, out=out[:, 2:4])
    return out


def _noise(h: np.ndarray, weight: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Height-scaled variances: (h * w)^2 per coordinate, plus constant (aspect-ratio) terms."""
    return (h * h)[:, None] * weight + const


def _weights(position: float, aspect: float) -> Tuple[np.ndarray, np.ndarray]:
    w = position * position
    return np.array([w, w, 0.0, w]), np.array([0.0, 0.0, aspect * aspect, 0.0])


_INIT_POS = _weights(2 * STD_WEIGHT_POSITION, 1e-2)
_INIT_VEL = _weights(10 * STD_WEIGHT_VELOCITY, 1e-5)
_Q_POS = _weights(STD_WEIGHT_POSITION, 1e-2)
_Q_VEL = _weights(STD_WEIGHT_VELOCITY, 1e-5)
_R = _weights(STD_WEIGHT_POSITION, 1e-1)
# Process noise in the block layout (rows: var pos, cov pos-vel, var vel), split in h^2-scaled + constant.
_Q_SCALED = np.stack([_Q_POS[0], np.zeros(4), _Q_VEL[0]])
_Q_CONST = np.stack([_Q_POS[1], np.zeros(4), _Q_VEL[1]])
# F P F^T for F = [[1, 1], [0, 1]] as a linear map on (var pos, cov, var vel).
_PREDICT_COV = np.array([[1.0, 2.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
_MOTION_T = np.eye(8)
_MOTION_T[4:, :4] = np.eye(4)  # mean @ F^T: position += velocity


def initiate(measurements: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """New tracks from (N, 4) xyah measurements: zero velocity, height-scaled uncertainty."""
    z = np.asarray(measurements, np.float64)
    n = z.shape[0]
    mean = np.zeros((n, 8))
    mean[:, :4] = z
    h = z[:, 3]
    cov = np.zeros((n, 3, 4))
    cov[:, 0] = _noise(h, *_INIT_POS)
    cov[:, 2] = _noise(h, *_INIT_VEL)
    return mean, cov


def predict(mean: np.ndarray, cov: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One step ahead for all tracks (returns new arrays): F x, F P F^T + Q(h)."""
    h = mean[:, 3]
    new_cov = _PREDICT_COV @ cov
    new_cov += (h * h)[:, None, None] * _Q_SCALED
    new_cov += _Q_CONST
    return mean @ _MOTION_T, new_cov


def innovation_variance(mean: np.ndarray, cov: np.ndarray, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """(T, 4) diagonal of H P H^T + R. With `scores`, R's standard deviations are scaled by
    (1 - score) (NSA Kalman of GIAOTracker / StrongSORT: confident detections are trusted more)."""
    r = _noise(mean[:, 3], *_R)
    if scores is not None:
        r *= ((1.0 - np.asarray(scores, np.float64)) ** 2)[:, None]
    return cov[:, 0] + r


def update(
    mean: np.ndarray, cov: np.ndarray, measurements: np.ndarray, scores: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Measurement update of T tracks with T xyah measurements (row-aligned); returns new arrays."""
    s = innovation_variance(mean, cov, scores)
    gain = cov[:, :2] / s[:, None, :]  # (T, 2, 4): position gain, velocity gain
    innovation = measurements - mean[:, :4]
    new_mean = mean + (gain * innovation[:, None, :]).reshape(-1, 8)
    # P - K S K^T, block-wise: var pos -= Kp p, cov -= Kp c, var vel -= Kv c.
    new_cov = cov - gain[:, _GAIN_ROWS] * cov[:, _COV_ROWS]
    return new_mean, new_cov


_GAIN_ROWS = np.array([0, 0, 1])
_COV_ROWS = np.array([0, 1, 1])


def gating_distance(
    mean: np.ndarray, cov: np.ndarray, measurements: np.ndarray, only_position: bool = False
) -> np.ndarray:
    """(T, N) squared Mahalanobis distance of every measurement to every track's projected state
    (over x, y only with `only_position`: compare with CHI2INV95[2] then)."""
    s = innovation_variance(mean, cov)
    if only_position:
        s, mean, measurements = s[:, :2], mean[:, :2], measurements[:, :2]
    d = measurements[None, :, :] - mean[:, None, : s.shape[1]]
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
