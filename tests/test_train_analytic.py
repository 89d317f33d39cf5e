"""The trainer's own update code, run on the analytic world, converges to the closed-form step optimum.

The world's trajectories are recorded as the rollout records them (msdda.train.rollout.Trajectories) and trained
by the trainer's functions: the per-prompt advantages, the update pass and the policy-gradient and pathwise
losses, with a small learned denoiser in place of the UNet.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from msdda.kernels import StepKernel, step_kernel
from msdda.train.advantages import PerPromptStatTracker, per_prompt_advantages
from msdda.train.config import TrainConfig
from msdda.train.pathwise import pathwise_loss
from msdda.train.policy_gradient import policy_gradient_loss
from msdda.train.rollout import Trajectories
from msdda.train.updates import Learner, Transitions, update_pass
from msdda.world.analytic import GaussianWorld


class Denoiser(nn.Module):
    """The exact epsilon predictor plus a learned correction (zero at start): the policy being fine-tuned."""

    def __init__(self, world: GaussianWorld) -> None:
        super().__init__()
        self.world = world
        self.index = {t: i for i, t in enumerate(world.timesteps)}
        self.embedding = nn.Embedding(len(world.timesteps), 32)
        self.correction = nn.Sequential(nn.Linear(world.dim + 32, 64), nn.SiLU(), nn.Linear(64, world.dim))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)

    def forward(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        embedding = self.embedding(torch.full((len(x_t),), self.index[timestep]))
        correction = self.correction(torch.cat([x_t.float(), embedding], dim=1)).double()
        return self.world.epsilon(x_t, timestep) + correction


def _kernel(world: GaussianWorld, policy: Denoiser, batch: Transitions) -> StepKernel:
    """The trainer's KernelFunction for the denoiser: its epsilon through the scheduler's step kernel."""
    timestep = int(batch.timestep)
    return step_kernel(world.scheduler, policy(batch.latents, timestep), timestep, batch.latents)


@torch.no_grad()
def _sample(world: GaussianWorld, policy: Denoiser, reward_vector: torch.Tensor, batch: int,
            generator: torch.Generator) -> Trajectories:
    """Trajectories over the world's stochastic steps (the last DDPM step is deterministic: nothing to learn
    there), with the ``tweedie`` step reward R_t = a . x0_hat(x_{t-1}) and its state value a . x0_hat(x_t)."""
    x = torch.randn(batch, world.dim, generator=generator, dtype=torch.float64)
    states, log_probs, noises, reference_means, reference_variances, rewards, values = [x], [], [], [], [], [], []
    stochastic_steps = world.timesteps[:-1]
    for timestep in stochastic_steps:
        kernel = step_kernel(world.scheduler, policy(x, timestep), timestep, x)
        x_prev = kernel.sample(generator=generator)
        reference = world.reference_kernel(x, timestep)
        log_probs.append(kernel.log_prob(x_prev))
        noises.append((x_prev - kernel.mean) / kernel.std)
        reference_means.append(reference.mean)
        reference_variances.append(reference.variance.expand(batch, 1))
        rewards.append(world.tweedie_step_reward(x_prev, timestep, reward_vector))
        values.append(world.x0_estimate(x, timestep) @ reward_vector)
        states.append(x_prev)
        x = x_prev
    nothing = torch.empty(batch, 0)
    return Trajectories(
        prompts=[""] * batch, prompt_embeds=nothing, negative_embeds=nothing, timesteps=torch.tensor(stochastic_steps),
        latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), noises=torch.stack(noises, dim=1),
        reference_means=torch.stack(reference_means, dim=1),
        reference_variances=torch.stack(reference_variances, dim=1),
        step_rewards=torch.stack(rewards, dim=1), images=nothing, state_values=torch.stack(values, dim=1))


def _train(world: GaussianWorld, reward_vector: torch.Tensor, beta: float, iterations: int, batch: int,
           estimator: str) -> Denoiser:
    """One on-policy gradient step per iteration over every transition of a fresh batch, as the trainer takes
    it with train.batch_size = the batch and no accumulation beyond one trajectory's steps."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    steps = len(world.timesteps) - 1
    config = TrainConfig(beta=beta)
    config.reward.step_reward, config.train.estimator = "tweedie", estimator
    config.sampling.num_inference_steps, config.train.batch_size = steps, batch
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config.trained_steps)
    policy = Denoiser(world)
    policy, optimizer = accelerator.prepare(policy, torch.optim.Adam(policy.parameters(), lr=3e-3))
    learner = Learner(accelerator, policy, optimizer, list(policy.parameters()), config.train.max_grad_norm)
    tracker = PerPromptStatTracker(buffer_size=batch, min_count=batch, normalisation="center")
    kernel = partial(_kernel, world, policy)
    if estimator == "pathwise":  # R_t's gradient through the action, as the trainer's pathwise estimator takes it
        loss = partial(pathwise_loss, kernel, config=config,
                       step_reward=lambda action, batch: world.tweedie_step_reward(action, int(batch.timestep),
                                                                                   reward_vector))
    else:
        loss = partial(policy_gradient_loss, kernel, config=config)
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (1 - iteration / iterations) + 3e-4
        trajectories = _sample(world, policy, reward_vector, batch, generator)
        if estimator == "pathwise":
            advantages = torch.zeros(batch, steps, dtype=torch.float64)
        else:  # the trainer's tweedie advantages with its state baseline: R_t - V(x_t), per (prompt, step)
            rewards = (trajectories.step_rewards - trajectories.state_values).numpy()
            advantages = torch.as_tensor(per_prompt_advantages(rewards, trajectories.prompts, tracker, "tweedie"))
        update_pass(loss, trajectories, advantages, config, learner, seeds=[iteration], dtype=torch.float64)
    return policy


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["policy-gradient", "pathwise"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_trained_mean_shift_matches_the_closed_form_step_optimum(beta: float, estimator: str,
                                                                 fresh_accelerator_state) -> None:
    """Within 10% over the whole trajectory, and per step wherever the optimum moves the kernel visibly.

    At the last stochastic step (t=125, kernel std 0.01) the optimal shift is 1% of a std; the shared MLP's
    approximation error (about 0.4 std there) swamps so small a target, whatever the RL estimator does, so
    per-step relative errors are asserted only where the exact shift is at least 5% of the kernel's std.
    """
    world = GaussianWorld.default(dim=2, num_inference_steps=8, seed=0)
    reward_vector = torch.tensor([1.0, -0.5], dtype=torch.float64)
    policy = _train(world, reward_vector, beta, iterations=400, batch=512, estimator=estimator)
    x_t = torch.randn(256, world.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    learned_shifts, exact_shifts = [], []
    with torch.no_grad():
        for timestep in world.timesteps[:-1]:
            learned = step_kernel(world.scheduler, policy(x_t, timestep), timestep, x_t).mean
            reference = world.reference_kernel(x_t, timestep)
            exact = (world.optimal_kernel(x_t, timestep, [reward_vector], [1.0], beta).mean - reference.mean)[0]
            shift = (learned - reference.mean).mean(0)
            learned_shifts.append(shift)
            exact_shifts.append(exact)
            if float(exact.norm()) >= 0.05 * float(reference.variance.sqrt()):
                relative_error = float((shift - exact).norm() / exact.norm())
                assert relative_error < 0.10, f"step {timestep}: learned {shift.tolist()} vs exact {exact.tolist()}"
    learned_all, exact_all = torch.cat(learned_shifts), torch.cat(exact_shifts)
    assert float((learned_all - exact_all).norm() / exact_all.norm()) < 0.10
