"""The optimality gauge against closed forms, and the state-replay mode reaching the step optimum it reads.

On the analytic world (Gaussian data, linear rewards, ``tweedie`` step rewards) the step optimum shifts the
reference's mean by d* = s^2 grad R_t / beta exactly, so a kernel shifted by alpha d* must read alpha, cosine 1, and
an implied beta of beta / alpha, whatever the states.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from msdda.kernels import StepKernel, step_kernel
from msdda.train.config import TrainConfig
from msdda.train.gauge import check_states, near_optimum, summarise
from msdda.train.pathwise import pathwise_loss
from msdda.train.stationarity import implied_beta, ratio_and_cosine, scale_beta, stationarity
from msdda.train.updates import Learner, update_pass
from msdda.world.analytic import GaussianWorld
from tests.test_train_analytic import Denoiser, _kernel, _sample, _tweedie

REWARD = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)


def gauge_of_shifted_kernel(world: GaussianWorld, alpha: float | list[float], beta: float, gauge_beta: float) -> dict:
    """The gauge at ``gauge_beta`` of the kernel that goes ``alpha`` of the way to the optimum at ``beta`` (a fraction
    per step where ``alpha`` is a list)."""
    timesteps = world.timesteps

    def kernels(step: int, x_t: torch.Tensor) -> tuple[StepKernel, StepKernel]:
        reference = world.reference_kernel(x_t, timesteps[step])
        optimum = world.optimal_kernel(x_t, timesteps[step], [REWARD], [1.0], beta)
        fraction = alpha[step] if isinstance(alpha, list) else alpha
        shifted = StepKernel(reference.mean + fraction * (optimum.mean - reference.mean), reference.variance)
        return shifted, reference

    def step_reward(step: int, action: torch.Tensor) -> torch.Tensor:
        return world.tweedie_step_reward(action, timesteps[step], REWARD)

    generator = torch.Generator().manual_seed(0)
    states = {step: torch.randn(64, world.dim, generator=generator, dtype=torch.float64)
              for step in range(len(timesteps))}
    checks = check_states(kernels, step_reward, states, gauge_beta, draws=3, generator=generator)
    return summarise({"reference": checks}, timesteps, gauge_beta, draws=3)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.7])
def test_the_gauge_reads_the_fraction_of_the_way_to_the_closed_form_optimum(alpha: float) -> None:
    """1 at the optimum, 0 at the reference, alpha in between and beyond; every step but DDPM's deterministic last."""
    world = GaussianWorld.default(dim=3, num_inference_steps=8, seed=0)
    beta = 0.2
    report = gauge_of_shifted_kernel(world, alpha, beta, beta)
    rows = report["sources"]["reference"]
    assert [row["step"] for row in rows] == list(range(len(world.timesteps) - 1))
    assert any(row["carries_kl"] for row in rows)
    for row in rows:
        assert row["ratio"] == pytest.approx(alpha, rel=1e-9, abs=1e-12)
        assert row["cosine"] == pytest.approx(1.0 if alpha else 0.0, abs=1e-9)
    assert report["max_ratio_deviation"] == pytest.approx(abs(alpha - 1), abs=1e-9)
    assert near_optimum(report, 0.1) == (alpha == 1.0)
    if alpha:
        assert report["implied_beta"] == pytest.approx(beta / alpha, rel=1e-9)
        assert report["scale_beta"] == pytest.approx(beta / alpha, rel=1e-9)
    else:
        assert report["implied_beta"] is None  # the reference does not move along the reward's gradient
        assert report["scale_beta"] is None


def test_a_restricted_family_at_its_best_member_meets_the_scale_condition_but_not_the_pointwise_one() -> None:
    """Shifts confined to the first coordinate (a family that cannot hold d*): the best member is d*'s projection,
    whose ratio and cosine are below 1 by the share of d* it cannot hold, and whose scale beta is the trained beta."""
    generator = torch.Generator().manual_seed(0)
    beta, variance = 0.3, torch.full((500, 1), 0.2, dtype=torch.float64)
    gradient = torch.randn(500, 3, generator=generator, dtype=torch.float64)
    optimum = variance * gradient / beta
    projected = optimum * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    check = stationarity(projected, variance, gradient[None], beta)
    ratio, cosine = ratio_and_cosine(check)
    held = float((projected**2).sum() / (optimum**2).sum()) ** 0.5
    assert ratio == pytest.approx(held, rel=1e-9) and cosine == pytest.approx(held, rel=1e-9) and held < 0.7
    assert scale_beta([check]) == pytest.approx(beta, rel=1e-9)
    assert scale_beta([stationarity(2 * projected, variance, gradient[None], beta)]) == pytest.approx(beta / 2)


def test_the_implied_beta_calibrates_an_adapter_trained_at_an_unknown_beta() -> None:
    """An adapter at its step optimum for beta 0.05, gauged as if it had been trained at 0.2 (a guess), reads
    four times the optimum's shift, and its implied beta is the 0.05 it was trained at."""
    world = GaussianWorld.default(dim=3, num_inference_steps=6, seed=1)
    report = gauge_of_shifted_kernel(world, alpha=1.0, beta=0.05, gauge_beta=0.2)
    assert report["implied_beta"] == pytest.approx(0.05, rel=1e-9)
    assert all(row["ratio"] == pytest.approx(4.0, rel=1e-9) for row in report["sources"]["reference"])


def test_the_bias_correction_reads_noisy_reward_gradients_without_shrinking_the_ratio() -> None:
    """With per-draw gradient noise three times the mean gradient, the squared norm of two draws' mean is mostly
    noise: uncorrected, an adapter at its optimum would read a ratio near 0.43; corrected, near 1."""
    generator = torch.Generator().manual_seed(0)
    states, dim, beta, variance = 4000, 16, 0.1, torch.full((4000, 1), 0.3, dtype=torch.float64)
    gradient = torch.randn(states, dim, generator=generator, dtype=torch.float64)
    draws = gradient + 3 * torch.randn(2, states, dim, generator=generator, dtype=torch.float64)
    shift = variance * gradient / beta  # exactly at the optimum
    ratio, cosine = ratio_and_cosine(stationarity(shift, variance, draws, beta))
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert cosine == pytest.approx(1.0, abs=0.03)
    uncorrected, _ = ratio_and_cosine(stationarity(shift, variance, draws.mean(dim=0, keepdim=True), beta))
    assert uncorrected < 0.5


def test_state_replay_with_fresh_noise_reaches_the_step_optimum_from_states_collected_once(
        fresh_accelerator_state) -> None:
    """States sampled once from the reference and reused for every update, each drawing its own action noise (the
    state-replay mode, ``train.fresh_noise``): the learned shift reaches the closed-form optimum, and the gauge,
    on held-out states, reads it within 2% of 1 at every step that carries KL (the last stochastic step's optimal
    shift is under 2% of the path's KL and a few percent of its std, below the shared MLP's approximation error)."""
    from accelerate import Accelerator

    world = GaussianWorld.default(dim=3, num_inference_steps=6, seed=0)
    beta, steps, batch, updates = 0.5, len(world.timesteps) - 1, 128, 150
    config = TrainConfig(beta=beta)
    config.reward.step_reward, config.train.estimator, config.train.fresh_noise = "tweedie", "pathwise", True
    config.sampling.num_inference_steps, config.train.batch_size = steps, batch
    torch.manual_seed(0)
    policy = Denoiser(world)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config.trained_steps)
    policy, optimizer = accelerator.prepare(policy, torch.optim.Adam(policy.parameters(), lr=2e-2))
    learner = Learner(accelerator, policy, optimizer, list(policy.parameters()), config.train.max_grad_norm,
                      torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=updates, eta_min=1e-4))
    step_reward = _tweedie(world, REWARD)
    states = _sample(world, policy, step_reward, batch, torch.Generator().manual_seed(1))  # the reference's
    states.noises = None  # nothing of the rollout's draws is reused
    kernel = partial(_kernel, world, policy)
    loss = partial(pathwise_loss, kernel, config=config,
                   step_reward=lambda action, batch: step_reward(action, batch.latents, int(batch.timestep))[0])
    update_pass(loss, states, torch.zeros(batch, steps, dtype=torch.float64), config, learner, seeds=range(updates),
                dtype=torch.float64)
    assert learner.optimizer_steps == updates

    def kernels(step: int, x_t: torch.Tensor) -> tuple[StepKernel, StepKernel]:
        timestep = world.timesteps[step]
        return step_kernel(world.scheduler, policy(x_t, timestep), timestep, x_t), world.reference_kernel(x_t, timestep)

    def tweedie(step: int, action: torch.Tensor) -> torch.Tensor:
        return world.tweedie_step_reward(action, world.timesteps[step], REWARD)

    generator = torch.Generator().manual_seed(7)
    held_out = {step: _sample(world, policy, step_reward, 128, generator).latents[:, step] for step in range(steps)}
    report = summarise({"adapter": check_states(kernels, tweedie, held_out, beta, 2, generator)}, world.timesteps,
                       beta, 2)
    carrying = [row for row in report["sources"]["adapter"] if row["carries_kl"]]
    assert len(carrying) >= 3
    for row in carrying:
        assert row["ratio"] == pytest.approx(1.0, abs=0.02), row
        assert row["cosine"] > 0.99, row
    assert near_optimum(report, 0.02)
    assert report["implied_beta"] == pytest.approx(beta, rel=0.05)


def test_no_implied_beta_where_the_reward_gradient_is_lost_in_its_noise() -> None:
    """Bias-corrected, the gradient's energy can come out negative where its draws are mostly noise: no beta is
    implied then (not a negative one)."""
    check = stationarity(torch.ones(1, 2), torch.ones(1, 1), torch.tensor([[[1.0, 3.0]], [[1.0, -1.0]]]), 1.0)
    assert float(check.gradient_energy.sum()) < 0 < float(check.shift_dot_gradient.sum())
    assert implied_beta([check]) == float("inf")
