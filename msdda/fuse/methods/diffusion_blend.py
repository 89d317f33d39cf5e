"""Diffusion Blend's DB-MPA-LS: at each step one adapter, drawn with probability w_i / sum(w)."""

from __future__ import annotations

import torch

from msdda.fuse.methods.base import FusionContext, FusionMethod, register
from msdda.kernels import StepKernel


@register
class DiffusionBlend(FusionMethod):
    """One forward per step, through the adapter drawn for that step from the call's generator."""

    name = "diffusion-blend"
    label = "diffusion-blend"
    normalises_weights = True

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        shares = torch.tensor(context.weights, dtype=torch.float64)
        choice = int(torch.multinomial(shares, 1, generator=context.generator))
        return context.kernels(latents, timestep, [context.adapter_names[choice]])[0]
