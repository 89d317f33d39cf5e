"""Reports of weight sweeps: Pareto fronts, hypervolume, weighted objectives (``msdda report``)."""
