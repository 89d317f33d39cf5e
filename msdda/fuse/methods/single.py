"""One adapter alone: the one with the largest weight (the corners of a sweep)."""

from __future__ import annotations

import torch

from msdda.fuse.methods.base import FusionContext, FusionMethod, register
from msdda.kernels import StepKernel


@register
class Single(FusionMethod):
    """The adapter with the largest weight, sampled alone; a sweep samples it once per adapter."""

    name = "single"
    label = "single"
    sweeps_weights = False

    def cell_weights(self, grid: list[tuple[float, ...]], count: int) -> list[tuple[float, ...]]:
        return [tuple(float(i == j) for j in range(count)) for i in range(count)]

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        chosen = context.adapter_names[int(torch.tensor(context.weights).argmax())]
        return context.kernels(latents, timestep, [chosen])[0]
