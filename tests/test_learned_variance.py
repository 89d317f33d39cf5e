"""Learned variances: the trainer's step loss is exact with each kernel's own variance, and sampling refuses a
broken variance or a fused precision that is not positive."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from msdda.diffusion import BASE, adapter_kernels
from msdda.errors import UserError
from msdda.fuse.methods import FusionContext, get_method
from msdda.kernels import StepKernel, step_kernel
from msdda.train.config import TrainConfig
from msdda.train.pathwise import pathwise_loss
from msdda.train.policy_gradient import policy_gradient_loss
from msdda.train.updates import Transitions

SHAPE = (4, 3, 5, 5)
BETA = 0.3


def _scheduler(variance_type: str = "learned_range") -> DDPMScheduler:
    scheduler = DDPMScheduler(variance_type=variance_type)
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


class FixedOutputs(nn.Module):
    """A stand-in UNet: each routed group of batch rows (one per adapter name) gets its given output."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, rows: torch.Tensor, _timestep, _embeds) -> SimpleNamespace:
        output = torch.cat(self.outputs)
        assert len(output) == len(rows)
        return SimpleNamespace(sample=output)


def _learned_output(variance_type: str, value: float = 0.0) -> torch.Tensor:
    """Epsilon and variance channels (``learned``: the variance itself, 0.01; ``learned_range``: 0), with one
    variance element set to ``value`` (none when it is 0)."""
    output = _output(1)
    output[:, SHAPE[1]:] = 0.01 if variance_type == "learned" else 0.0
    if value:
        output[1, SHAPE[1] + 2, 3, 3] = value
    return output


@pytest.mark.parametrize("variance_type, value, what", [
    ("learned", 1e-30, None),  # the variance itself: a zero below is refused, a tiny positive one is not
    ("learned", -0.01, "1 zero or negative"),
    ("learned", math.nan, "1 NaN"),
    ("learned", math.inf, "1 infinite"),
    ("learned_range", math.nan, "1 NaN"),
    ("learned_range", 1e30, "1 infinite"),  # far out of range: the variance overflows
    ("learned_range", -1e30, "1 zero or negative"),  # ... or underflows to 0
])
def test_a_broken_learned_variance_is_refused_naming_the_adapter_and_the_step(variance_type, value, what) -> None:
    scheduler = _scheduler(variance_type)
    timestep = scheduler.timesteps[3]
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    unet = FixedOutputs([_learned_output(variance_type), _learned_output(variance_type, value)])

    def kernels() -> list[StepKernel]:
        return adapter_kernels(unet, scheduler, x_t, timestep, torch.empty(SHAPE[0], 0), None, ["a", "b"], 1.0, None)

    if what is None:
        assert not kernels()[1].is_deterministic
        return
    with pytest.raises(UserError, match=f"adapter 'b' predicts a variance .* at timestep {int(timestep)}: 1 of "
                                        f"{math.prod(SHAPE)} elements .*{what}"):
        kernels()


def test_a_zero_learned_variance_at_the_last_ddpm_step_is_its_deterministic_step() -> None:
    scheduler = _scheduler("learned")
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = _learned_output("learned")
    output[:, SHAPE[1]:] = 0.0
    (kernel,) = adapter_kernels(FixedOutputs([output]), scheduler, x_t, scheduler.timesteps[-1],
                                torch.empty(SHAPE[0], 0), None, [BASE], 1.0, None)
    assert int(scheduler.timesteps[-1]) == 0 and kernel.is_deterministic


def test_msdda_refuses_a_fused_precision_that_is_not_positive_naming_the_step_and_the_exponents() -> None:
    """Weights (1.5, 1.5) at equal betas give the reference exponent -2; with the adapters at the top of the
    learned range and the reference at the bottom, -2 / s_ref^2 + 3 / s_adapter^2 < 0 late in the chain."""
    scheduler = _scheduler("learned_range")
    timestep = scheduler.timesteps[-2]
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    wide, narrow = _learned_output("learned_range"), _learned_output("learned_range")
    wide[:, SHAPE[1]:], narrow[:, SHAPE[1]:] = 1.0, -1.0
    method = get_method("msdda")
    weights = [1.5, 1.5]
    context = FusionContext(unet=FixedOutputs([wide, wide, narrow]), scheduler=scheduler,
                            positive=torch.empty(SHAPE[0], 0), negative=None, adapter_names=["a", "b"],
                            weights=weights, exponents=method.exponents(weights, [0.1, 0.1], None),
                            guidance_scale=1.0, eta=None, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=rf"msdda at timestep {int(timestep)} with exponents \{{'a': 1.5, 'b': 1.5\}} "
                                        rf"and -2 for the reference: the fused precision is not positive at "
                                        rf"{math.prod(SHAPE)} of {math.prod(SHAPE)} elements"):
        method.kernel(context, len(scheduler.timesteps) - 2, timestep, x_t)
