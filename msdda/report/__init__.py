"""Reports of weight sweeps: Pareto fronts, hypervolume, weighted and KL-regularised objectives, path KLs
(``msdda report``)."""
