"""Output averaging (Diffusion Blend's DB-MPA): the weighted average of the adapters' guided model outputs."""

from __future__ import annotations

import torch

from msdda.fuse.methods.base import FusionContext, FusionMethod, entering_kernels, register
from msdda.kernels import StepKernel


@register
class OutputAverage(FusionMethod):
    """eps_hat = sum_i s_i eps_i with shares s_i = w_i / sum(w), guidance applied per adapter first. The kernel
    mean is linear in the output, so it is the shares' average of the means; a ``learned_range`` variance is
    linear in the log-variance, so the log-variances average too (DB-MPA's rule)."""

    name = "output-average"
    label = "output-average"
    normalises_weights = True
    coincides_with = "msdda"
    coincidence = ("MSDDA and output-average gave identical samples here: the adapters share one beta and one "
                   "variance (as LoRAs on a DDIM base do), and then the fused Gaussian is the weighted average of "
                   "the means.")

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        kernels, powers, _ = entering_kernels(context, latents, timestep, 0.0)
        if len(kernels) == 1:
            return kernels[0]
        shares = [power / sum(context.exponents) for power in powers]
        mean = sum(share * k.mean for share, k in zip(shares, kernels))
        variance = torch.exp(sum(share * k.variance.log() for share, k in zip(shares, kernels)))
        return StepKernel(mean=mean, variance=variance, pred_original_sample=kernels[0].pred_original_sample)
