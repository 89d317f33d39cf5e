"""The pathwise estimator: the step reward's own gradient through the reparameterised action.

x_{t-1} = mean + std * noise with the noise the rollout drew, and R_t(x_{t-1}) differentiated through the
frozen reference (the ``tweedie`` one-step clean estimate, or the ``rollout`` deterministic continuation) and
the reward model: the same step objective and optimum as the policy gradient's, with a gradient whose variance
does not grow with the latent dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msdda.diffusion import decode_latents
from msdda.train.config import TrainConfig
from msdda.train.loss import StepLoss, pathwise_step_loss
from msdda.train.rollout import Sampler, reference_continuation
from msdda.train.updates import KernelFunction, Transitions

__all__ = ["pathwise_loss", "reference_step_reward", "StepRewardFunction"]

StepRewardFunction = Callable[[torch.Tensor, Transitions], torch.Tensor]
"""``R_t(action, batch)``: ``[N]`` step rewards of the actions x_{t-1} of ``batch``, differentiable in them."""


def pathwise_loss(policy: KernelFunction, batch: Transitions, config: TrainConfig,
                  step_reward: StepRewardFunction) -> StepLoss:
    """Minus the step objective E[R_t] - beta * KL of ``batch``, differentiated through the action."""
    kernel = policy(batch)
    kl = batch.kl_to_reference(kernel, config.beta)
    action = kernel.sample(noise=batch.noises)
    return pathwise_step_loss(step_reward(action, batch), kl, config.beta)


def reference_step_reward(sampler: Sampler, reward: Callable, step_reward: str) -> StepRewardFunction:
    """The step reward ``step_reward`` of an action x_{t-1}, with grad flowing back to it through the reference (whose
    weights stay frozen: ``sampler``'s adapter is routed off): r(x0_hat_ref(x_{t-1})) for ``tweedie``, r of the
    deterministic reference continuation from x_{t-1} for ``rollout``; r(x_0) at the last step."""

    def step_reward_of(action: torch.Tensor, batch: Transitions) -> torch.Tensor:
        clean, following = action, batch.timesteps[batch.step + 1:]
        if len(following) and step_reward == "rollout":
            clean = reference_continuation(sampler, action, following, batch.prompt_embeds, batch.negative_embeds)
        elif len(following):
            clean = sampler.reference_kernel(action, following[0], batch.prompt_embeds, batch.negative_embeds,
                                             sampler.noise_scale).pred_original_sample
        return reward(decode_latents(sampler.pipeline, clean, grad=True), batch.prompts, grad=True)

    return step_reward_of
