"""The trainer's own update code, run on the analytic world, converges to the closed-form step optimum.

The world's trajectories are recorded as the rollout records them (msdda.train.rollout.Trajectories) and trained
by the trainer's functions: the per-prompt advantages, the update pass and the policy-gradient and pathwise
losses, with a small learned denoiser in place of the UNet.
"""

from __future__ import annotations

from collections.abc import Callable
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


StepReward = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``(x_{t-1}, x_t, timestep) -> (R_t(x_{t-1}), V(x_t))``: a step reward and its state baseline, ``[B]`` each."""


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


class MeanAndVariancePolicy(nn.Module):
    """The reference's output (epsilon, then ``learned_range`` variance channels) plus, per step, an affine
    correction of epsilon in x_t and an offset of the log-variance, all zero at start: a policy that moves its
    variance as well as its mean, and whose family holds the quadratic reward's step optimum exactly (an affine
    mean, a constant variance).

    ``learned_range`` variance channels v set log s^2 = log s_small^2 + (v + 1) / 2 * log(s_large^2 / s_small^2);
    at high noise the range is narrow (s_large^2 / s_small^2 near 1), so a step in v barely moves the variance.
    The offset is therefore a step in log s^2 itself, rescaled by the range that msdda.kernels gives at v = +-1.
    """

    def __init__(self, world: GaussianWorld) -> None:
        super().__init__()
        self.world = world
        self.index = {t: i for i, t in enumerate(world.timesteps)}
        steps, dim = len(world.timesteps), world.dim
        self.weight = nn.Parameter(torch.zeros(steps, dim, dim, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(steps, dim, dtype=torch.float64))
        self.log_variance_offset = nn.Parameter(torch.zeros(steps, dim, dtype=torch.float64))
        x = torch.zeros(1, dim, dtype=torch.float64)
        ends = [[step_kernel(world.scheduler, torch.cat([x, torch.full_like(x, end)], dim=1), t, x).variance
                 for end in (-1.0, 1.0)] for t in world.timesteps[:-1]]
        self.log_range = [float((large / small).log().mean()) for small, large in ends]

    def forward(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        i = self.index[timestep]
        variance_channels = 2 * self.log_variance_offset[i] / self.log_range[i]
        correction = torch.cat([x_t @ self.weight[i].T + self.bias[i], variance_channels.expand_as(x_t)], dim=1)
        return self.world.reference_output(x_t, timestep) + correction


def _kernel(world: GaussianWorld, policy: nn.Module, batch: Transitions) -> StepKernel:
    """The trainer's KernelFunction for the policy: its output through the scheduler's step kernel."""
    timestep = int(batch.timestep)
    return step_kernel(world.scheduler, policy(batch.latents, timestep), timestep, batch.latents)


def _tweedie(world: GaussianWorld, reward_vector: torch.Tensor) -> StepReward:
    """The ``tweedie`` step reward R_t = a . x0_hat(x_{t-1}) and its state value a . x0_hat(x_t)."""
    def step_reward(x_prev: torch.Tensor, x_t: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        value = world.x0_estimate(x_t, timestep) @ reward_vector
        return world.tweedie_step_reward(x_prev, timestep, reward_vector), value

    return step_reward


@torch.no_grad()
def _sample(world: GaussianWorld, policy: nn.Module, step_reward: StepReward, batch: int,
            generator: torch.Generator) -> Trajectories:
    """Trajectories over the world's stochastic steps (the last DDPM step is deterministic: nothing to learn
    there), recorded as the rollout records them, scored by ``step_reward``."""
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
        reference_variances.append(reference.variance.expand(reference.mean.shape))
        reward, value = step_reward(x_prev, x, timestep)
        rewards.append(reward)
        values.append(value)
        states.append(x_prev)
        x = x_prev
    nothing = torch.empty(batch, 0)
    return Trajectories(
        prompts=[""] * batch, prompt_embeds=nothing, negative_embeds=nothing, timesteps=torch.tensor(stochastic_steps),
        stochastic=torch.ones(len(stochastic_steps), dtype=torch.bool),
        latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), noises=torch.stack(noises, dim=1),
        reference_means=torch.stack(reference_means, dim=1),
        reference_variances=torch.stack(reference_variances, dim=1),
        step_rewards=torch.stack(rewards, dim=1), images=nothing, state_values=torch.stack(values, dim=1))


def _train(world: GaussianWorld, policy: nn.Module, step_reward: StepReward, beta: float, iterations: int,
           batch: int, estimator: str, learning_rate: float = 3e-3) -> nn.Module:
    """One on-policy gradient step per iteration over every transition of a fresh batch, as the trainer takes
    it with train.batch_size = the batch and no accumulation beyond one trajectory's steps; the learning rate
    decays linearly to a tenth."""
    from accelerate import Accelerator

    generator = torch.Generator().manual_seed(1)
    steps = len(world.timesteps) - 1
    config = TrainConfig(beta=beta)
    config.reward.step_reward, config.train.estimator = "tweedie", estimator
    config.sampling.num_inference_steps, config.train.batch_size = steps, batch
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config.trained_steps)
    policy, optimizer = accelerator.prepare(policy, torch.optim.Adam(policy.parameters(), lr=learning_rate))
    learner = Learner(accelerator, policy, optimizer, list(policy.parameters()), config.train.max_grad_norm)
    tracker = PerPromptStatTracker(buffer_size=batch, min_count=batch, normalisation="center")
    kernel = partial(_kernel, world, policy)
    if estimator == "pathwise":  # R_t's gradient through the action, as the trainer's pathwise estimator takes it
        loss = partial(pathwise_loss, kernel, config=config,
                       step_reward=lambda action, batch: step_reward(action, batch.latents, int(batch.timestep))[0])
    else:
        loss = partial(policy_gradient_loss, kernel, config=config)
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (1 - iteration / iterations) + learning_rate / 10
        trajectories = _sample(world, policy, step_reward, batch, generator)
        if estimator == "pathwise":
            advantages = torch.zeros(batch, steps, dtype=torch.float64)
        else:  # the trainer's tweedie advantages with its state baseline: R_t - V(x_t), per (prompt, step)
            rewards = (trajectories.step_rewards - trajectories.state_values).numpy()
            advantages = torch.as_tensor(per_prompt_advantages(rewards, trajectories.prompts, tracker, "tweedie"))
        update_pass(loss, trajectories, advantages, config, learner, seeds=[iteration], dtype=torch.float64)
    return policy


QUADRATIC_CENTRE, QUADRATIC_CURVATURE, QUADRATIC_BETA = torch.tensor([1.0, -0.5], dtype=torch.float64), 1.0, 0.5
"""The quadratic reward -c |x_{t-1} - a|^2 of the learned-variance tests, and their KL weight."""


def quadratic_world() -> tuple[GaussianWorld, StepReward]:
    """The learned-variance world of 4 steps and the quadratic step reward (with its value at the reference's mean as
    V(x_t))."""
    world = GaussianWorld.default(dim=2, num_inference_steps=4, seed=0, variance_type="learned_range")

    def quadratic(x_prev: torch.Tensor, x_t: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        baseline = world.reference_kernel(x_t, timestep).mean
        return (world.quadratic_step_reward(x_prev, QUADRATIC_CENTRE, QUADRATIC_CURVATURE),
                world.quadratic_step_reward(baseline, QUADRATIC_CENTRE, QUADRATIC_CURVATURE))

    return world, quadratic


def assert_at_quadratic_optimum(world: GaussianWorld, policy: nn.Module) -> None:
    """At every stochastic step, the learned variance within 6% of the quadratic optimum's v* and the learned mean
    within 0.15 of v*'s std of its m* (RMS over x_t); 1 / v* = 1 / s^2 + 2 c / beta, m* = (mu / s^2 + 2 c a / beta) v*
    (written out here, apart from the world's ``quadratic_optimal_kernel``)."""
    centre, curvature, beta = QUADRATIC_CENTRE, QUADRATIC_CURVATURE, QUADRATIC_BETA
    x_t = torch.randn(64, world.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        for timestep in world.timesteps[:-1]:
            learned = step_kernel(world.scheduler, policy(x_t, timestep), timestep, x_t)
            reference = world.reference_kernel(x_t, timestep)
            optimal_variance = 1 / (1 / reference.variance + 2 * curvature / beta)
            optimal_mean = (reference.mean / reference.variance + 2 * curvature * centre / beta) * optimal_variance
            if timestep > world.timesteps[-2]:
                assert float((reference.variance / optimal_variance).min()) > 2.5  # the optimum really narrows
            variance_error = float((learned.variance / optimal_variance - 1).abs().max())
            assert variance_error < 0.06, f"step {timestep}: variance {learned.variance[0].tolist()} vs " \
                                          f"{optimal_variance[0].tolist()}"
            mean_error = float(((learned.mean - optimal_mean) / optimal_variance.sqrt()).pow(2).mean().sqrt())
            assert mean_error < 0.15, f"step {timestep}: mean off by {mean_error:.3f} std (RMS)"


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
    torch.manual_seed(0)
    policy = _train(world, Denoiser(world), _tweedie(world, reward_vector), beta, iterations=400, batch=512,
                    estimator=estimator)
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


@pytest.mark.parametrize("estimator", ["pathwise", pytest.param("policy-gradient", marks=pytest.mark.slow)])
def test_a_learned_variance_policy_converges_to_the_narrower_quadratic_step_optimum(estimator: str,
                                                                                     fresh_accelerator_state) -> None:
    """A quadratic reward of the next state tilts the reference N(mu, s^2) into N(m*, v*) with
    1 / v* = 1 / s^2 + 2 c / beta and m* = (mu / s^2 + 2 c a / beta) v* (``assert_at_quadratic_optimum``). The
    policy's family holds it exactly, so at every stochastic step the learned
    variance must reach v* within 6% (it starts at s^2, 2.8 and 4.5 times v* at the first two steps) and the
    learned mean m* within 0.15 of v*'s std (RMS over x_t; it starts 1.3 and 1.8 stds away at those steps; the
    last stochastic step's s^2 = 1e-4 is too small for the tilt to move it: there the policy must stay put).
    Both estimators move the variance: pathwise through x_{t-1} = mean + std * noise (a few seconds), the policy
    gradient through the log-prob's variance term (noisier: twice the batch, four times the iterations)."""
    world, quadratic = quadratic_world()
    iterations = 150 if estimator == "pathwise" else 600
    policy = _train(world, MeanAndVariancePolicy(world), quadratic, QUADRATIC_BETA, iterations=iterations, batch=512,
                    estimator=estimator, learning_rate=0.05)
    assert_at_quadratic_optimum(world, policy)
