"""The base model: every adapter off, the reference every method is measured against."""

from __future__ import annotations

import torch

from msdda.diffusion import BASE
from msdda.fuse.methods.base import FusionContext, FusionMethod, register
from msdda.kernels import StepKernel


@register
class Base(FusionMethod):
    """The reference kernel (adapters routed off); its samples ignore the weights, so a sweep samples it once."""

    name = "base"
    label = "base"
    sweeps_weights = False
    needs_adapters = False

    def cell_weights(self, grid: list[tuple[float, ...]], count: int) -> list[tuple[float, ...]]:
        return [tuple(1.0 / count for _ in range(count))]

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        return context.kernels(latents, timestep, [BASE])[0]
