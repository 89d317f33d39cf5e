"""Weight sweeps: every fusion method over a grid of weights, scored by every reward (``msdda sweep``).

Both names are imported on first use (PEP 562): the config reads the fusion-method registry, which needs torch, and
``msdda sweep --help`` should not."""

__all__ = ["SweepConfig", "simplex_grid"]


def __getattr__(name: str):
    if name == "SweepConfig":
        from msdda.sweep.config import SweepConfig

        return SweepConfig
    if name == "simplex_grid":
        from msdda.sweep.grid import simplex_grid

        return simplex_grid
    raise AttributeError(name)
