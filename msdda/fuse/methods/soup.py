"""Rewarded Soups: one model whose LoRA deltas are weighted by w (diffusers' ``set_adapters``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from msdda.fuse.methods.base import FusionContext, FusionMethod, register
from msdda.kernels import StepKernel


@register
class Soup(FusionMethod):
    """One forward per step through the weighted sum of the adapters' LoRA deltas, the weights as given."""

    name = "soup"
    label = "soup"

    @contextmanager
    def active(self, pipeline, adapter_names: list[str], weights: list[float]):
        pipeline.set_adapters(adapter_names, weights)
        try:
            yield
        finally:
            pipeline.set_adapters(adapter_names, [1.0] * len(adapter_names))

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        return context.kernels(latents, timestep, None)[0]  # the UNet as configured: every adapter, weighted
