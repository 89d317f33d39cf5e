"""The step-level loss, trained on the analytic world, converges to the closed-form step optimum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msdda.kernels import gaussian_kl, step_kernel
from msdda.train.loss import PerPromptStatTracker, pathwise_step_loss, step_loss
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


def _train(world: GaussianWorld, reward_vector: torch.Tensor, beta: float, iterations: int, batch: int,
           estimator: str) -> Denoiser:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    policy = Denoiser(world)
    optimiser = torch.optim.Adam(policy.parameters(), lr=3e-3)
    tracker = PerPromptStatTracker(buffer_size=batch, min_count=batch, normalisation="center")
    stochastic_steps = world.timesteps[:-1]  # the last DDPM step is deterministic: nothing to learn there
    for iteration in range(iterations):
        for group in optimiser.param_groups:
            group["lr"] = 3e-3 * (1 - iteration / iterations) + 3e-4
        transitions = []
        with torch.no_grad():
            x = torch.randn(batch, world.dim, generator=generator, dtype=torch.float64)
            for timestep in world.timesteps:
                kernel = step_kernel(world.scheduler, policy(x, timestep), timestep, x)
                x_prev = kernel.sample(generator=generator)
                if timestep in stochastic_steps:
                    # the trainer's tweedie step reward with its state baseline: R_t - V(x_t), V = a . x0_hat(x_t)
                    reward = world.tweedie_step_reward(x_prev, timestep, reward_vector)
                    state_value = world.x0_estimate(x, timestep) @ reward_vector
                    transitions.append((timestep, x, x_prev, kernel.log_prob(x_prev), reward - state_value,
                                        (x_prev - kernel.mean) / kernel.std))
                x = x_prev
        optimiser.zero_grad()
        for timestep, x_t, x_prev, old_log_prob, reward, noise in transitions:
            kernel = step_kernel(world.scheduler, policy(x_t, timestep), timestep, x_t)
            reference = world.reference_kernel(x_t, timestep)
            kl = gaussian_kl(kernel.mean, kernel.variance, reference.mean, reference.variance)
            if estimator == "pathwise":  # the trainer's pathwise estimator: R_t's gradient through the action
                action = kernel.mean + kernel.std * noise
                loss = pathwise_step_loss(world.tweedie_step_reward(action, timestep, reward_vector), kl, beta)
            else:
                advantages = tracker.update([timestep] * batch, reward.numpy())
                loss = step_loss(kernel.log_prob(x_prev), old_log_prob, torch.as_tensor(advantages), kl, beta,
                                 clip_range=0.2)
            (loss.loss / len(transitions)).backward()
        optimiser.step()
    return policy


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["policy-gradient", "pathwise"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_trained_mean_shift_matches_the_closed_form_step_optimum(beta: float, estimator: str) -> None:
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
