"""The tracker's assignment solver: scipy's own C solver, loaded without the rest of scipy.optimize."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from scipy.optimize import linear_sum_assignment as public

from edged.tracking.matching import linear_sum_assignment
from tests.conftest import ROOT


def test_same_assignments_as_scipy_optimize_on_random_gated_matrices():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        cost = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40))))
        cost[rng.random(cost.shape) < 0.3] = 1e5  # gated pairs, as the tracker builds them
        ours, theirs = linear_sum_assignment(cost), public(cost)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_the_tracker_does_not_import_scipy_optimize():
    """About 26 MB of private memory per process saved (a small board; a fleet of replayed devices)."""
    code = "import sys, edged.tracking.tracker; print('scipy.optimize' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
