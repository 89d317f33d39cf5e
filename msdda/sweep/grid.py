"""Weight grids: evenly spaced points on the simplex sum_i w_i = 1."""

from __future__ import annotations

import itertools

from msdda.errors import UserError

__all__ = ["simplex_grid", "weight_key"]


def simplex_grid(num_rewards: int, points_per_edge: int) -> list[tuple[float, ...]]:
    """All weight vectors with entries in {0, 1/(n-1), ..., 1} that sum to 1 (n = ``points_per_edge``).

    K = 2, n = 11 gives the 11 points (0, 1), (0.1, 0.9), ..., (1, 0); K = 3 gives the 66-point triangle.
    Ordered by the first weight, then the second, ...
    """
    if num_rewards < 1:
        raise UserError(f"need at least one reward, got {num_rewards}")
    if points_per_edge < 2:
        raise UserError(f"weights={points_per_edge}: a grid needs at least 2 points per edge (the endpoints)")
    steps = points_per_edge - 1
    grid = [tuple(c / steps for c in counts) + ((steps - sum(counts)) / steps,)
            for counts in itertools.product(range(steps + 1), repeat=num_rewards - 1) if sum(counts) <= steps]
    return sorted(grid)


def weight_key(weights: tuple[float, ...] | list[float]) -> str:
    """A stable text key for a weight vector, e.g. '0.25,0.75' (used in file names and tables)."""
    return ",".join(f"{w:.4g}" for w in weights)
