"""Batched block Kalman filter against hand-computed values and the textbook 8x8 formulas."""

import numpy as np
import pytest

from edged.tracking import kalman

SP, SV = 1 / 20, 1 / 160


def textbook(mean, cov_full, z=None, score=None):
    """Dense DeepSORT formulas (8x8), one track: predict, and update if z is given."""
    F = np.eye(8)
    F[:4, 4:] = np.eye(4)
    H = np.eye(4, 8)
    h = mean[3]
    Q = np.diag(np.square([SP * h, SP * h, 1e-2, SP * h, SV * h, SV * h, 1e-5, SV * h]))
    mean = F @ mean
    cov = F @ cov_full @ F.T + Q
    if z is None:
        return mean, cov
    h = mean[3]
    std = np.array([SP * h, SP * h, 1e-1, SP * h])
    if score is not None:
        std = std * (1 - score)
    S = H @ cov @ H.T + np.diag(std**2)
    K = cov @ H.T @ np.linalg.inv(S)
    return mean + K @ (z - H @ mean), cov - K @ S @ K.T


def test_initiate_hand_values():
    mean, cov = kalman.initiate(np.array([[100.0, 50.0, 0.5, 200.0]]))
    assert mean[0].tolist() == [100, 50, 0.5, 200, 0, 0, 0, 0]
    full = kalman.full_covariance(cov)[0]
    # std = 2 * h / 20 = 20 for x, y, h; 10 * h / 160 = 12.5 for their velocities.
    assert np.allclose(np.diag(full), [400, 400, 1e-4, 400, 156.25, 156.25, 1e-10, 156.25])
    assert np.count_nonzero(full - np.diag(np.diag(full))) == 0


def test_predict_hand_values():
    mean = np.array([[10.0, 20.0, 0.5, 100.0, 1.0, -2.0, 0.0, 0.5]])
    _, cov = kalman.initiate(mean[:, :4])
    m2, c2 = kalman.predict(mean, cov)
    assert m2[0].tolist() == [11.0, 18.0, 0.5, 100.5, 1.0, -2.0, 0.0, 0.5]
    # var x: 10^2 (init) + (6.25)^2 (init vel) + 5^2 (process, h = 100 before the step)
    assert c2[0, 0, 0] == pytest.approx(100 + 39.0625 + 25)
    assert c2[0, 1, 0] == pytest.approx(39.0625)  # cov(x, vx) = var(vx)
    assert c2[0, 2, 0] == pytest.approx(39.0625 + 0.625**2)


def test_matches_dense_formulas_over_several_steps():
    rng = np.random.default_rng(1)
    z0 = np.array([[300.0, 200.0, 0.4, 120.0], [50.0, 60.0, 0.6, 40.0]])
    mean, cov = kalman.initiate(z0)
    dense = [(mean[i].copy(), kalman.full_covariance(cov)[i]) for i in range(2)]
    for step in range(6):
        z = z0 + rng.normal(scale=[3, 3, 0.01, 2], size=(2, 4)) + step
        scores = np.array([0.9, 0.6])
        mean, cov = kalman.predict(mean, cov)
        use_nsa = step % 2 == 1
        mean, cov = kalman.update(mean, cov, z, scores if use_nsa else None)
        for i in range(2):
            dense[i] = textbook(*dense[i], z=z[i], score=scores[i] if use_nsa else None)
            assert np.allclose(mean[i], dense[i][0], rtol=1e-10, atol=1e-8)
            assert np.allclose(kalman.full_covariance(cov)[i], dense[i][1], rtol=1e-10, atol=1e-8)


def test_gating_distance_is_squared_mahalanobis():
    mean, cov = kalman.initiate(np.array([[100.0, 100.0, 0.5, 100.0]]))
    mean, cov = kalman.predict(mean, cov)
    z = np.array([[100.0, 100.0, 0.5, 100.0], [130.0, 100.0, 0.5, 100.0], [400.0, 100.0, 0.5, 100.0]])
    d = kalman.gating_distance(mean, cov, z)
    full = kalman.full_covariance(cov)[0][:4, :4] + np.diag(np.square([5.0, 5.0, 0.1, 5.0]))
    expected = [float(v @ np.linalg.solve(full, v)) for v in z - mean[0, :4]]
    assert np.allclose(d[0], expected)
    assert d[0, 0] == 0.0
    gate = kalman.CHI2INV95[4]
    assert d[0, 1] < gate < d[0, 2]  # 30 px off is plausible, 300 px is not


def test_box_conversions_round_trip():
    boxes = np.array([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 1.0, 2.0]])
    xyah = kalman.boxes_to_xyah(boxes)
    assert xyah[0].tolist() == [30.0, 60.0, 0.5, 80.0]
    assert np.allclose(kalman.xyah_to_boxes(xyah), boxes)
