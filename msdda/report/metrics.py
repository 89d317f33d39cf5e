"""Multi-objective metrics, as pure array maths: Pareto fronts, hypervolume, weighted objectives, bootstrap.

Every reward is maximised. A method's front is the set of its cells' mean reward vectors (one per weight).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from msdda.errors import UserError

__all__ = ["pareto_mask", "hypervolume", "weighted_objective", "bootstrap_standard_error", "standard_error"]


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """``[N]`` bool: which rows of ``points [N, K]`` no other row dominates (>= everywhere, > somewhere)."""
    points = np.asarray(points, dtype=np.float64)
    keep = np.ones(len(points), dtype=bool)
    for index, point in enumerate(points):
        dominated_by = np.all(points >= point, axis=1) & np.any(points > point, axis=1)
        keep[index] = not dominated_by.any()
    return keep


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``points [N, K]`` and bounded below by ``reference [K]`` (exact).

    Points not strictly above the reference in every reward add nothing. Exact by slicing along the last
    reward (fine for the few dozen points a weight sweep has).
    """
    points = np.asarray(points, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != reference.shape[0]:
        raise UserError(f"points must be [N, {reference.shape[0]}], got shape {points.shape}")
    points = points[np.all(points > reference, axis=1)]
    if len(points) == 0:
        return 0.0
    points = points[pareto_mask(points)]
    if points.shape[1] == 1:
        return float(points[:, 0].max() - reference[0])
    order = np.argsort(-points[:, -1])  # slice from the highest value of the last reward down
    points = points[order]
    volume = 0.0
    for index in range(len(points)):
        upper = points[index, -1]
        lower = points[index + 1, -1] if index + 1 < len(points) else reference[-1]
        if upper > lower:
            volume += (upper - lower) * hypervolume(points[: index + 1, :-1], reference[:-1])
    return float(volume)


def weighted_objective(rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[N]``: sum_i w_i r_i per sample, for ``rewards [N, K]`` and ``weights [K]``."""
    return np.asarray(rewards, dtype=np.float64) @ np.asarray(weights, dtype=np.float64)


def standard_error(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def bootstrap_standard_error(statistic: Callable[[np.ndarray], float], count: int, resamples: int = 200,
                             seed: int = 0) -> float:
    """The std of ``statistic(indices)`` over bootstrap resamples of ``range(count)`` (sample rows, drawn
    once per resample and shared by every cell, so paired samples stay paired)."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, count, count)) for _ in range(resamples)]
    return float(np.std(values, ddof=1))
