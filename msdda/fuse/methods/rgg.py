"""Reward-gradient guidance (RGG): the reference kernel's mean moved along the weighted reward's gradient.

Each stochastic step samples from N(mu_ref(x_t) + scale_t * grad R_t(x) at x = mu_ref(x_t), s_t^2), the reference's
kernel with its mean shifted, where R_t(x) = sum_i w_i r_i(decode(x0_hat_ref(x))) is the ``tweedie`` step reward of
a next state x: the weighted reward of the reference's one-step clean estimate at the level the step lands on (r of
x itself after the last step, where x is the clean sample). Deterministic steps (variance 0) take the reference's
step unchanged: they have no density, and the KL-regularised step problem no finite-KL move.

Why the gradient is taken there. The step objective E_{x_{t-1} ~ pi}[R_t(x_{t-1})] - beta KL(pi || p_ref) over
Gaussian kernels N(mu_ref + d, s_t^2) is stationary where d = s_t^2 / beta * E[grad R_t(x_{t-1})] (the pathwise
condition), x_{t-1} drawn from the kernel; to first order in d and in the kernel's spread, that expectation is
grad R_t at the reference mean. So at ``scale="optimal"``, scale_t = s_t^2 / beta, the step is the first-order step
optimum, and it is exact where R_t is linear over the kernel's spread (the analytic world's linear rewards: then it
is p_ref * exp(R_t / beta) / Z itself). The guidance of DPS and of the Diffusion Blend / DAS code instead
differentiates r(x0_hat(x_t)) with respect to x_t, the state the step leaves: one forward fewer per step, but a
gradient of the step's input, not of the step reward that the adapters (and MSDDA's closed form) are optimal for.

Cost per stochastic step: the reference's forward at x_t, one more reference forward at mu_ref with its backward,
and one call with gradient of every reward; no adapter forward (like CoDe, the adapters only name the rewards and
their betas).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from msdda.diffusion import BASE
from msdda.errors import UserError
from msdda.fuse.methods.base import OPTIMAL_SCALE, FusionContext, FusionMethod, register
from msdda.kernels import StepKernel

__all__ = ["RewardGradientGuidance", "guided_kernel", "check_rgg_scale"]


def check_rgg_scale(scale: float | str) -> float | str:
    """``scale`` as RGG takes it: ``"optimal"`` (s_t^2 / beta) or a finite number > 0 (one scale at every step)."""
    if scale == OPTIMAL_SCALE:
        return scale
    try:
        number = float(scale)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(scale, bool) or not (math.isfinite(number) and number > 0):
        raise UserError(f"rgg_scale={scale!r}: give '{OPTIMAL_SCALE}' (s_t^2 / beta, the first-order step optimum) "
                        "or a finite number > 0 (the same scale at every step)")
    return number


def guided_kernel(reference: StepKernel, step_reward: Callable[[torch.Tensor], torch.Tensor],
                  scale: float | torch.Tensor) -> StepKernel:
    """N(mu_ref + scale * grad R(x) at x = mu_ref, s_ref^2): the reference kernel moved along the step reward's
    gradient.

    ``step_reward`` maps a batch of next states ``[B, ...]`` to ``[B]`` rewards, differentiably and each sample from
    its own state alone (so the gradient of their sum is every sample's own); ``scale`` broadcasts to the mean (a
    number, or the variance / beta)."""
    point = reference.mean.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(step_reward(point).sum(), point)
    return StepKernel(mean=reference.mean + scale * gradient, variance=reference.variance,
                      pred_original_sample=reference.pred_original_sample)


@register
class RewardGradientGuidance(FusionMethod):
    """The reference kernel with its mean moved by rgg_scale times the gradient of the weighted ``tweedie`` step reward
    sum_i w_i r_i(x0_hat_ref(x_{t-1})) at the reference mean; at rgg_scale "optimal" (s_t^2 / beta) the first-order
    optimum of each step's objective for the weighted reward. Needs differentiable rewards while sampling."""

    name = "rgg"
    label = "rgg"
    needs_rewards = True
    needs_reward_gradients = True

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> StepKernel:
        reference = context.kernels(latents, timestep, [BASE])[0]
        if reference.is_deterministic:
            return reference
        if context.reward is None or context.decode is None or not context.prompts:
            raise UserError("method 'rgg' needs the rewards while sampling: pass rewards for every adapter")
        schedule = context.scheduler.timesteps
        following = schedule[index + 1] if index + 1 < len(schedule) else None

        def step_reward(point: torch.Tensor) -> torch.Tensor:
            clean = point
            if following is not None:  # the embeddings passed again: this forward is not the step's own (PathKL)
                clean = context.kernels(point, following, [BASE], context.positive,
                                        context.negative)[0].pred_original_sample
            return context.reward(context.decode(clean, grad=True), context.prompts, grad=True)

        scale = reference.variance / context.beta if context.rgg_scale == OPTIMAL_SCALE else context.rgg_scale
        return guided_kernel(reference, step_reward, scale)
