"""Learned variances: the trainer's step loss is exact with each kernel's own variance, and sampling refuses a
broken variance or a fused precision that is not positive."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from msdda.kernels import StepKernel, step_kernel
from msdda.train.config import TrainConfig
from msdda.train.pathwise import pathwise_loss
from msdda.train.policy_gradient import policy_gradient_loss
from msdda.train.updates import Transitions

SHAPE = (4, 3, 5, 5)
BETA = 0.3


def _scheduler() -> DDPMScheduler:
    scheduler = DDPMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(10)
    return scheduler


def _output(seed: int) -> torch.Tensor:
    """A model output: epsilon, then learned_range variance channels spread over [-1.8, 1.8]."""
    generator = torch.Generator().manual_seed(seed)
    epsilon = torch.randn(SHAPE, generator=generator)
    channels = torch.rand(SHAPE, generator=generator) * 3.6 - 1.8
    return torch.cat([epsilon, channels], dim=1)


def _transitions(scheduler: DDPMScheduler, policy: StepKernel, reference: StepKernel, x_t: torch.Tensor,
                 noise: torch.Tensor) -> Transitions:
    x_prev = policy.sample(noise=noise).detach()
    return Transitions(step=2, timesteps=scheduler.timesteps, latents=x_t, next_latents=x_prev,
                       log_probs=policy.log_prob(x_prev).detach() - 0.1, advantages=torch.randn(SHAPE[0]),
                       reference=reference, noises=noise, prompts=[""] * SHAPE[0],
                       prompt_embeds=torch.empty(SHAPE[0], 0), negative_embeds=torch.empty(SHAPE[0], 0))


def _normal(kernel: StepKernel) -> torch.distributions.Normal:
    return torch.distributions.Normal(kernel.mean, kernel.variance.sqrt())


def test_the_step_losses_use_each_kernels_own_learned_variance() -> None:
    """The KL the policy-gradient and pathwise losses charge (and log) is torch's KL of the two diagonal Normals,
    the log-prob is the policy's learned Normal's, and the pathwise action is its reparameterised sample."""
    scheduler = _scheduler()
    timestep = int(scheduler.timesteps[2])
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = _output(1).requires_grad_()
    policy = step_kernel(scheduler, output, timestep, x_t)
    reference = step_kernel(scheduler, _output(2), timestep, x_t)
    assert policy.variance.shape == SHAPE and not torch.allclose(policy.variance, reference.variance)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    batch = _transitions(scheduler, policy, reference, x_t, noise)
    config = TrainConfig(beta=BETA)
    expected_kl = torch.distributions.kl_divergence(_normal(policy), _normal(reference)).sum(dim=(1, 2, 3)).mean()

    terms = policy_gradient_loss(lambda _batch: policy, batch, config)
    torch.testing.assert_close(terms.kl, expected_kl.detach())
    torch.testing.assert_close(terms.loss - terms.policy_loss, BETA * expected_kl.detach())
    log_prob = _normal(policy).log_prob(batch.next_latents).sum(dim=(1, 2, 3))
    torch.testing.assert_close(terms.approx_kl, 0.5 * ((log_prob - batch.log_probs) ** 2).mean().detach())

    actions = []

    def step_reward(action: torch.Tensor, _batch: Transitions) -> torch.Tensor:
        actions.append(action)
        return -(action**2).sum(dim=(1, 2, 3))

    terms = pathwise_loss(lambda _batch: policy, batch, config, step_reward)
    torch.testing.assert_close(terms.kl, expected_kl.detach())
    torch.testing.assert_close(actions[0], _normal(policy).loc + _normal(policy).scale * noise)
    # beta 0: the loss is minus the reward alone, whose gradient reaches the variance channels through the action
    reward_only = pathwise_loss(lambda _batch: policy, batch, TrainConfig(beta=0.0), step_reward)
    (gradient,) = torch.autograd.grad(reward_only.loss, output)
    assert float(gradient[:, SHAPE[1]:].abs().min()) > 0
