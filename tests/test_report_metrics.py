"""Pareto fronts, hypervolume and the weight grid, against brute-force counts computed independently."""

from __future__ import annotations

import numpy as np
import pytest

from msdda.report.metrics import (
    bootstrap_standard_error,
    hypervolume,
    pareto_mask,
    weighted_objective,
)
from msdda.sweep.grid import simplex_grid, weight_key


def _dominated_fraction(points: np.ndarray, reference: np.ndarray, upper: np.ndarray, samples: int) -> float:
    """Monte Carlo: the share of the box [reference, upper] that some point dominates, times its volume."""
    rng = np.random.default_rng(0)
    probes = reference + rng.random((samples, len(reference))) * (upper - reference)
    dominated = np.zeros(samples, dtype=bool)
    for point in points:
        dominated |= np.all(probes <= point, axis=1)
    return float(dominated.mean() * np.prod(upper - reference))


def test_hypervolume_of_small_fronts_by_hand() -> None:
    assert hypervolume(np.array([[2.0, 3.0]]), np.zeros(2)) == pytest.approx(6.0)
    # two rectangles 1x3 and 3x1 overlapping in a 1x1 square
    assert hypervolume(np.array([[1.0, 3.0], [3.0, 1.0]]), np.zeros(2)) == pytest.approx(5.0)
    # a dominated point and a point below the reference add nothing
    assert hypervolume(np.array([[1.0, 3.0], [3.0, 1.0], [0.5, 0.5], [-1.0, 9.0]]), np.zeros(2)) == pytest.approx(5.0)
    assert hypervolume(np.array([[-1.0, 2.0]]), np.zeros(2)) == 0.0


@pytest.mark.parametrize("dim", [2, 3])
def test_hypervolume_matches_monte_carlo(dim: int) -> None:
    rng = np.random.default_rng(dim)
    points = rng.random((12, dim)) * 2 - 0.3
    reference = np.full(dim, -0.5)
    upper = points.max(axis=0)
    expected = _dominated_fraction(points, reference, upper, 400_000)
    assert hypervolume(points, reference) == pytest.approx(expected, rel=0.01)


def test_pareto_mask_keeps_exactly_the_undominated_points() -> None:
    points = np.array([[1, 3], [3, 1], [2, 2], [1, 1], [3, 1], [0, 4]], dtype=float)
    assert pareto_mask(points).tolist() == [True, True, True, False, True, True]


def test_weighted_objective_and_bootstrap() -> None:
    rewards = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert weighted_objective(rewards, [0.25, 0.75]).tolist() == [1.75, 3.75]
    values = np.random.default_rng(1).normal(size=400)
    error = bootstrap_standard_error(lambda rows: values[rows].mean(), len(values), resamples=400)
    assert error == pytest.approx(values.std() / np.sqrt(len(values)), rel=0.15)


def test_simplex_grid() -> None:
    grid = simplex_grid(2, 11)
    assert len(grid) == 11 and grid[0] == (0.0, 1.0) and grid[-1] == (1.0, 0.0)
    assert weight_key(grid[3]) == "0.3,0.7"
    triangle = simplex_grid(3, 11)
    assert len(triangle) == 66 and all(abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in triangle)
    assert len(set(triangle)) == 66
    with pytest.raises(ValueError, match="at least 2 points"):
        simplex_grid(2, 1)


def test_a_pareto_point_off_the_simplex_is_labelled_by_its_whole_weight_vector() -> None:
    from msdda.report.plots import point_label

    assert point_label((0.25, 0.75)) == "0.25"  # on the simplex the first weight says it all
    assert point_label((1.0, 0.0)) == "1"
    assert point_label((1.0, 1.0)) == "1,1" and point_label((0.5, 0.2)) == "0.5,0.2"
    assert point_label((0.2, 0.3, 0.5)) == "0.2,0.3,0.5"
