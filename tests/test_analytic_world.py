"""The analytic worlds: their exact denoisers and step optima, and MSDDA fusion of those optima.

The tilt and fusion tests run on the DDPM world and on the flow world under each flow kernel (Flow-GRPO's
SDE at two noise levels, diffusers' stochastic_sampling step).
"""

from __future__ import annotations

import pytest
import torch

from msdda.fuse import exponents, fuse_gaussians, reference_exponent
from msdda.kernels import gaussian_log_prob
from msdda.world.analytic import FlowGaussianWorld, GaussianWorld

WORLDS = {
    "ddpm": lambda: GaussianWorld.default(dim=3, num_inference_steps=20, seed=0),
    "flow-sde": lambda: FlowGaussianWorld.default(dim=3, num_inference_steps=20, seed=0),
    "flow-sde-a1": lambda: FlowGaussianWorld.default(dim=3, num_inference_steps=20, seed=0, flow_noise_level=1.0),
    "flow-stochastic-sampling": lambda: FlowGaussianWorld.default(dim=3, num_inference_steps=20, seed=0,
                                                                  stochastic_sampling=True),
}


@pytest.fixture(scope="module", params=list(WORLDS))
def world(request: pytest.FixtureRequest) -> GaussianWorld | FlowGaussianWorld:
    return WORLDS[request.param]()


@pytest.fixture(scope="module")
def ddpm_world() -> GaussianWorld:
    return WORLDS["ddpm"]()


def _reward_vectors(count: int, dim: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(count)]


def test_epsilon_predictor_is_the_regression_of_noise_on_x_t(ddpm_world: GaussianWorld) -> None:
    """Monte Carlo: least squares of eps on [x_t, 1] over forward-diffused data recovers (A, b)."""
    world = ddpm_world
    generator = torch.Generator().manual_seed(0)
    count = 400_000
    x0 = world.data_mean + torch.randn(count, world.dim, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(world.data_cov).T
    for timestep in (950, 500, 50):
        noise = torch.randn(count, world.dim, generator=generator, dtype=torch.float64)
        ab = world.alpha_bar(timestep)
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
        design = torch.cat([x_t, torch.ones(count, 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, noise).solution
        gain, offset = world.epsilon_affine(timestep)
        torch.testing.assert_close(solution[:-1].T, gain, atol=1e-2, rtol=0)
        torch.testing.assert_close(solution[-1], offset, atol=1e-2, rtol=0)


def test_optimal_kernel_is_the_reference_tilted_by_the_step_reward(world: GaussianWorld | FlowGaussianWorld) -> None:
    """log pi*(x) - log p_ref(x) - R_t(x) / beta does not depend on x (it is -log Z)."""
    generator = torch.Generator().manual_seed(1)
    rewards, weights, beta = _reward_vectors(2), [0.4, 0.6], 0.05
    x_t = torch.randn(1, world.dim, generator=generator, dtype=torch.float64)
    for timestep in world.timesteps[:-1]:  # the last DDPM (and stochastic_sampling) step is deterministic
        reference = world.reference_kernel(x_t, timestep)
        optimum = world.optimal_kernel(x_t, timestep, rewards, weights, beta)
        points = reference.mean + torch.randn(64, world.dim, generator=generator, dtype=torch.float64)
        step_reward = sum(w * world.tweedie_step_reward(points, timestep, a) for w, a in zip(weights, rewards))
        log_partition = (
            gaussian_log_prob(points, optimum.mean, optimum.variance)
            - gaussian_log_prob(points, reference.mean, reference.variance)
            - step_reward / beta
        )
        assert float(log_partition.std()) < 1e-8 * max(1.0, float(log_partition.abs().max()))


@pytest.mark.parametrize(
    "weights, betas, beta",
    [
        ([0.5, 0.5], [0.1, 0.1], 0.1),
        ([0.2, 0.8], [0.1, 0.1], 0.1),
        ([0.9, 0.1], [0.05, 0.2], 0.1),  # unequal betas: the reference enters
        ([0.2, 0.3, 0.5], [0.1, 0.1, 0.1], 0.1),
        ([0.3, 0.3, 0.1], [0.1, 0.2, 0.1], 0.15),  # K = 3, unequal betas, sum w != 1
    ],
)
def test_fusing_single_reward_optima_gives_the_weighted_optimum_at_every_step(world, weights, betas, beta) -> None:
    rewards = _reward_vectors(len(weights))
    powers = exponents(weights, betas, beta)
    x_t = torch.randn(8, world.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    for timestep in world.timesteps:
        singles = [world.optimal_kernel(x_t, timestep, [a], [1.0], b) for a, b in zip(rewards, betas)]
        reference = world.reference_kernel(x_t, timestep)
        fused_mean, fused_variance = fuse_gaussians(
            [k.mean for k in singles], [k.variance for k in singles], powers,
            ref_mean=reference.mean if reference_exponent(powers) else None,
            ref_variance=reference.variance if reference_exponent(powers) else None,
        )
        target = world.optimal_kernel(x_t, timestep, rewards, weights, beta)
        torch.testing.assert_close(fused_mean, target.mean, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(fused_variance.expand_as(target.variance), target.variance, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("weights, betas, beta", [([0.3, 0.7], [0.5, 0.5], 0.5), ([0.6, 0.3, 0.4], [0.5, 1.0, 0.5], 0.5)])
def test_sampling_with_fused_kernels_matches_the_exact_optimal_chain(ddpm_world, weights, betas, beta) -> None:
    """Run the whole chain with kernels + fusion; compare x0's moments to the closed-form propagation."""
    world = ddpm_world
    rewards = _reward_vectors(len(weights))
    powers = exponents(weights, betas, beta)
    uses_reference = reference_exponent(powers) != 0.0

    def fused_kernel(x_t: torch.Tensor, timestep: int):
        singles = [world.optimal_kernel(x_t, timestep, [a], [1.0], b) for a, b in zip(rewards, betas)]
        reference = world.reference_kernel(x_t, timestep)
        mean, variance = fuse_gaussians(
            [k.mean for k in singles], [k.variance for k in singles], powers,
            ref_mean=reference.mean if uses_reference else None,
            ref_variance=reference.variance if uses_reference else None,
        )
        return type(reference)(mean=mean, variance=variance, pred_original_sample=reference.pred_original_sample)

    count = 50_000
    samples = world.sample_chain(fused_kernel, count, torch.Generator().manual_seed(3))
    mean, cov = world.optimal_chain_moments(rewards, weights, beta)
    base_mean, _ = world.optimal_chain_moments(rewards, [0.0] * len(weights), beta)
    assert float((mean - base_mean).norm()) > 0.5  # the rewards really move the distribution

    standard_error = (cov.diagonal() / count).sqrt()
    assert bool(((samples.mean(0) - mean).abs() < 5 * standard_error).all())
    sample_cov = torch.cov(samples.T)
    cov_error = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / count).sqrt()
    assert bool(((sample_cov - cov).abs() < 5 * cov_error).all())


def test_quadratic_optimum_is_the_learned_variance_reference_tilted_by_the_step_reward(ddpm_world) -> None:
    """With learned_range variance channels at -1 the reference keeps the posterior variance; the quadratic
    reward's optimum is that reference tilted by exp(R / beta) (log pi* - log p_ref - R / beta is -log Z), and
    narrower than it."""
    learned = GaussianWorld.default(dim=3, num_inference_steps=20, seed=0, variance_type="learned_range")
    generator = torch.Generator().manual_seed(4)
    centre, curvature, beta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.7, 0.2
    x_t = torch.randn(1, learned.dim, generator=generator, dtype=torch.float64)
    for timestep in learned.timesteps[:-1]:
        reference = learned.reference_kernel(x_t, timestep)
        fixed = ddpm_world.reference_kernel(x_t, timestep).variance.expand(1, 3)
        torch.testing.assert_close(reference.variance, fixed, rtol=1e-12, atol=0)
        optimum = learned.quadratic_optimal_kernel(x_t, timestep, centre, curvature, beta)
        assert bool((optimum.variance < reference.variance).all())
        points = reference.mean + torch.randn(64, learned.dim, generator=generator, dtype=torch.float64)
        log_partition = (gaussian_log_prob(points, optimum.mean, optimum.variance)
                         - gaussian_log_prob(points, reference.mean, reference.variance)
                         - learned.quadratic_step_reward(points, centre, curvature) / beta)
        assert float(log_partition.std()) < 1e-8 * max(1.0, float(log_partition.abs().max()))
