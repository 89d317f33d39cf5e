"""MSDDA: the exact step-optimal kernel for the weighted reward, p_ref^(1 - sum l_i) * prod_i p_i^(l_i)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msdda.errors import UserError
from msdda.fuse.closed_form import exponents, fuse_gaussians, reference_exponent
from msdda.fuse.methods.base import FusionContext, FusionMethod, entering_kernels, register
from msdda.kernels import StepKernel


@register
class MSDDA(FusionMethod):
    """The normalised product of the adapters' Gaussian kernels raised to l_i = w_i beta_i / beta, with the
    reference's kernel entering at 1 - sum l_i (weights off the simplex, unequal betas). Precision-weighted:
    with learned variances it differs from averaging the outputs."""

    name = "msdda"
    label = "msdda"
    uses_betas = True

    def exponents(self, weights: Sequence[float], betas: Sequence[float], beta: float | None) -> list[float]:
        return exponents(weights, betas, beta)

    def reference_exponent(self, context: FusionContext) -> float:
        return reference_exponent(context.exponents)

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        reference_power = self.reference_exponent(context)
        kernels, powers, reference = entering_kernels(context, latents, timestep, reference_power)
        if len(kernels) == 1 and reference is None:  # one adapter with exponent 1: its own kernel, bit for bit
            return kernels[0]
        try:
            mean, variance = fuse_gaussians([k.mean for k in kernels], [k.variance for k in kernels], powers,
                                            ref_mean=reference.mean if reference else None,
                                            ref_variance=reference.variance if reference else None)
        except UserError as error:  # fuse_gaussians is pure tensor maths: say which step and adapters it was
            exponents_by_adapter = {name: round(power, 6)
                                    for name, power in zip(context.adapter_names, context.exponents)}
            raise UserError(f"msdda at timestep {int(timestep)} with exponents {exponents_by_adapter} and "
                             f"{reference_power:.4g} for the reference: {error}") from error
        return StepKernel(mean=mean, variance=variance, pred_original_sample=kernels[0].pred_original_sample)
