"""The pathwise estimator: the step reward's own gradient through the reparameterised action.

x_{t-1} = mean + std * noise with the noise the rollout drew, and R_t(x_{t-1}) differentiated through the
frozen reference (the ``tweedie`` one-step clean estimate, or the ``rollout`` deterministic continuation) and
the reward model: the same step objective and optimum as the policy gradient's, with a gradient whose variance
does not grow with the latent dimension.

With ``train.reuse_reward_gradients`` the reward's gradient g = grad R_t(x_{t-1}) at each recorded action is taken
once per epoch (:func:`step_reward_gradients`), and every update of the epoch's inner epochs maximises the step
objective with R_t linearised there, <g, x_{t-1}(theta) - x_{t-1}> - beta KL (:func:`linearised_pathwise_loss`; the
KL stays exact). At the epoch's policy its gradient is the pathwise one on the same states and noise; its fixed points,
with g taken anew every epoch at the policy's own actions, are the pathwise update's, so the optimum is the same. The
reward and the reference's continuation run once per transition and epoch instead of once per update: the later
updates cost the policy's forward and backward only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msdda.diffusion import decode_latents
from msdda.train.config import TrainConfig
from msdda.train.loss import StepLoss, pathwise_step_loss
from msdda.train.rollout import Sampler, Trajectories, reference_continuation
from msdda.train.updates import KernelFunction, Transitions, transitions

__all__ = ["pathwise_loss", "linearised_pathwise_loss", "step_reward_gradients", "reference_step_reward",
           "StepRewardFunction"]

StepRewardFunction = Callable[[torch.Tensor, Transitions], torch.Tensor]
"""``R_t(action, batch)``: ``[N]`` step rewards of the actions x_{t-1} of ``batch``, differentiable in them."""


def pathwise_loss(policy: KernelFunction, batch: Transitions, config: TrainConfig,
                  step_reward: StepRewardFunction) -> StepLoss:
    """Minus the step objective E[R_t] - beta * KL of ``batch``, differentiated through the action."""
    kernel = policy(batch)
    kl = batch.kl_to_reference(kernel, config.beta)
    action = kernel.sample(noise=batch.noises)
    return pathwise_step_loss(step_reward(action, batch), kl, config.beta)


def linearised_pathwise_loss(policy: KernelFunction, batch: Transitions, config: TrainConfig) -> StepLoss:
    """Minus the step objective of ``batch`` with R_t linearised at its recorded actions, <g, x_{t-1}(theta) -
    x_{t-1}> - beta KL (g: ``batch.reward_gradients``), differentiated through the action as ``pathwise_loss``; its
    policy term is the linearised step-reward gain since the gradients were taken (0 at the first update)."""
    kernel = policy(batch)
    kl = batch.kl_to_reference(kernel, config.beta)
    action = kernel.sample(noise=batch.noises)
    gradient = batch.reward_gradients
    finite = torch.isfinite(gradient.flatten(1)).all(dim=1)
    moved = action - batch.next_latents
    gain = (moved * torch.where(torch.isfinite(gradient), gradient, 0.0)).flatten(1).sum(1)
    if config.train.proximal_weight and batch.reference is not None:  # the KL from the epoch's kernel, fixed variance
        kl_from_epoch = (moved**2 / batch.reference.variance).flatten(1).sum(1) / 2
        gain = gain - config.train.proximal_weight * config.beta * kl_from_epoch
    return pathwise_step_loss(torch.where(finite, gain, torch.nan), kl, config.beta)


@torch.enable_grad()
def step_reward_gradients(trajectories: Trajectories, step_reward: StepRewardFunction, batch_size: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, T, ...]`` grad R_t at every recorded action x_{t-1} of ``trajectories`` (zeros at the deterministic
    steps, NaN rows where R_t is not finite), ``batch_size`` rows at a time, in ``dtype``. Every process takes the
    steps in the same order, with as many forwards each (FSDP2 gathers weights in every forward)."""
    count = len(trajectories.prompts)
    actions = trajectories.latents[:, 1:]
    gradients = torch.zeros(actions.shape, dtype=dtype, device=actions.device)
    advantages = torch.zeros(count, len(trajectories.timesteps))
    for step in trajectories.stochastic.nonzero()[:, 0].tolist():
        for start in range(0, count, batch_size):
            rows = torch.arange(start, min(start + batch_size, count))
            batch = transitions(trajectories, advantages, rows, step, dtype)
            action = batch.next_latents.detach().requires_grad_(True)
            reward = step_reward(action, batch)
            finite = torch.isfinite(reward)
            (gradient,) = torch.autograd.grad(torch.where(finite, reward, 0.0).sum(), action)
            gradient = torch.where(finite.view(-1, *[1] * (gradient.ndim - 1)), gradient, torch.nan)
            gradients[rows.to(gradients.device), step] = gradient.detach().to(dtype)
    return gradients


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
