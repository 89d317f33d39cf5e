"""Weight sweeps: every fusion method over a grid of weights, scored by every reward (``msdda sweep``)."""

from msdda.sweep.config import SweepConfig
from msdda.sweep.grid import simplex_grid

__all__ = ["SweepConfig", "simplex_grid"]
