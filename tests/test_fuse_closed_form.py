"""msdda.fuse.fuse_gaussians against independent computations of the normalised product of Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msdda.fuse import exponents, fuse_gaussians, reference_exponent


def _grid_product(means: list[float], variances: list[float], powers: list[float]) -> tuple[float, float]:
    """Mean and variance of prod_j N(x; m_j, v_j)^(l_j), normalised numerically on a 1-D grid."""
    grid = np.linspace(-30, 30, 600_001)
    log_density = sum(
        l * (-0.5 * (grid - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v))
        for m, v, l in zip(means, variances, powers)
    )
    density = np.exp(log_density - log_density.max())
    density /= np.trapezoid(density, grid)
    mean = np.trapezoid(grid * density, grid)
    return float(mean), float(np.trapezoid((grid - mean) ** 2 * density, grid))


CASES = [
    # (means, variances, weights, betas, target beta, reference (mean, variance) or None)
    ([0.7], [0.5], [1.0], None, None, None),  # K = 1
    ([0.7, -1.2], [0.4, 0.4], [0.3, 0.7], None, None, None),  # equal variances
    ([0.7, -1.2], [0.4, 1.5], [0.3, 0.7], None, None, None),  # unequal variances
    ([0.7, -1.2, 2.0], [0.4, 1.5, 0.9], [0.2, 0.5, 0.3], None, None, None),  # K = 3
    ([0.7, -1.2], [0.4, 1.5], [0.5, 0.5], [0.5, 2.0], 1.0, (0.1, 0.8)),  # unequal betas, reference enters
    ([0.7, -1.2, 2.0], [0.4, 1.5, 0.9], [0.2, 0.3, 0.1], None, None, (0.3, 1.1)),  # sum w < 1 with reference
    ([0.7, -1.2], [0.4, 0.6], [0.8, 0.7], None, None, (0.3, 1.1)),  # sum w > 1: negative reference exponent
]


@pytest.mark.parametrize("means, variances, weights, betas, beta, reference", CASES)
def test_fusion_equals_numeric_product_on_a_grid(means, variances, weights, betas, beta, reference) -> None:
    powers = exponents(weights, betas, beta)
    kwargs = {}
    all_means, all_variances, all_powers = list(means), list(variances), list(powers)
    if reference is not None:
        kwargs = {"ref_mean": torch.tensor([reference[0]], dtype=torch.float64), "ref_variance": reference[1]}
        all_means.append(reference[0])
        all_variances.append(reference[1])
        all_powers.append(1 - sum(powers))
    mean, variance = fuse_gaussians(
        [torch.tensor([m], dtype=torch.float64) for m in means], variances, powers, **kwargs
    )
    expected_mean, expected_variance = _grid_product(all_means, all_variances, all_powers)
    assert float(mean) == pytest.approx(expected_mean, abs=1e-7)
    assert float(variance) == pytest.approx(expected_variance, rel=1e-6)


@pytest.mark.parametrize("num_kernels", [1, 2, 3])
@pytest.mark.parametrize("with_reference", [False, True])
def test_per_element_fusion_equals_fitted_log_density_sum(num_kernels: int, with_reference: bool) -> None:
    """Evaluate sum_j l_j log N_j on points, fit the quadratic back per element: its Gaussian is the fusion."""
    generator = torch.Generator().manual_seed(num_kernels)
    shape = (2, 3, 4)
    means = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(num_kernels)]
    variances = [torch.rand(shape, generator=generator, dtype=torch.float64) + 0.2 for _ in range(num_kernels)]
    powers = (torch.rand(num_kernels, generator=generator, dtype=torch.float64) + 0.1).tolist()
    if not with_reference:
        powers = [p / sum(powers) for p in powers]
    ref_mean = torch.randn(shape, generator=generator, dtype=torch.float64)
    ref_variance = torch.full(shape, 3.0, dtype=torch.float64)  # broad enough that the precision stays positive
    fused_mean, fused_variance = fuse_gaussians(
        means, variances, powers, ref_mean=ref_mean if with_reference else None,
        ref_variance=ref_variance if with_reference else None,
    )
    points = torch.linspace(-4, 4, 9, dtype=torch.float64).reshape(-1, 1, 1, 1)
    terms = list(zip(means, variances, powers))
    if with_reference:
        terms.append((ref_mean, ref_variance, 1 - sum(powers)))
    log_density = sum(l * torch.distributions.Normal(m, v.sqrt()).log_prob(points) for m, v, l in terms)
    for index in np.ndindex(*shape):
        quadratic, linear, _ = np.polyfit(points.flatten().numpy(), log_density[(slice(None), *index)].numpy(), 2)
        precision = -2 * quadratic
        assert float(fused_variance[index]) == pytest.approx(1 / precision, rel=1e-8)
        assert float(fused_mean[index]) == pytest.approx(linear / precision, rel=1e-8, abs=1e-10)


def test_equal_variances_give_the_weighted_mean_of_means() -> None:
    """With equal variances and equal betas MSDDA is output averaging (Diffusion Blend's DB-MPA)."""
    generator = torch.Generator().manual_seed(0)
    means = [torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3)]
    variance = torch.rand(2, 1, 1, 1, generator=generator) + 0.1  # one variance per row: per-timestep
    weights = [0.2, 0.3, 0.5]
    mean, fused_variance = fuse_gaussians(means, [variance] * 3, weights)
    torch.testing.assert_close(mean, sum(w * m for w, m in zip(weights, means)))
    torch.testing.assert_close(fused_variance, variance)


def test_deterministic_steps_use_the_equal_variance_limit() -> None:
    means = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    mean, variance = fuse_gaussians(means, [0.0, 0.0], [0.25, 0.75])
    torch.testing.assert_close(mean, torch.tensor([2.5, -1.0]))
    torch.testing.assert_close(variance, torch.zeros(()))
    with pytest.raises(ValueError, match="deterministic"):
        fuse_gaussians(means, [0.0, 1.0], [0.25, 0.75])


def test_exponents() -> None:
    assert exponents([0.3, 0.7]) == [0.3, 0.7]
    assert exponents([0.5, 0.5], [0.1, 0.1]) == [0.5, 0.5]
    assert exponents([0.5, 0.5], [0.1, 0.4], 0.2) == pytest.approx([0.25, 1.0])
    assert reference_exponent([0.25, 1.0]) == pytest.approx(-0.25)
    assert reference_exponent([0.3, 0.7]) == 0.0


def test_without_beta_the_fused_beta_is_the_weights_mean_of_the_betas() -> None:
    """sum_i w_i beta_i / sum_i w_i: equal betas give their common value (l = w), simplex weights need no
    reference (sum l = 1), a corner is its adapter alone, and off the simplex sum l = sum w."""
    assert exponents([0.3, 0.7], [0.1, 0.1]) == pytest.approx([0.3, 0.7])
    beta = 0.25 * 0.1 + 0.75 * 0.4
    assert exponents([0.25, 0.75], [0.1, 0.4]) == pytest.approx([0.25 * 0.1 / beta, 0.75 * 0.4 / beta])
    assert sum(exponents([0.25, 0.75], [0.1, 0.4])) == pytest.approx(1.0)
    assert exponents([1.0, 0.0], [0.1, 0.4]) == pytest.approx([1.0, 0.0])
    assert sum(exponents([1.0, 1.0], [0.1, 0.4])) == pytest.approx(2.0)
    assert exponents([0.5, 0.5], [0.1, 0.4], 0.1) == pytest.approx([0.5, 2.0])  # a given beta is kept


@pytest.mark.parametrize(
    "weights, betas, beta, message",
    [
        ([0.5, -0.1], None, None, "must be >= 0"),
        ([0.5, float("nan")], None, None, "finite"),
        ([0.0, 0.0], None, None, "all zero"),
        ([], None, None, "at least one"),
        ([0.5, 0.5], [0.1], None, "one beta per adapter"),
        ([0.5, 0.5], [0.1, -0.2], 1.0, "KL weight"),
        ([0.5, 0.5], [0.1, 0.1], 0.0, "KL weight"),
    ],
)
def test_exponents_refuse_bad_weights(weights, betas, beta, message) -> None:
    with pytest.raises(ValueError, match=message):
        exponents(weights, betas, beta)


def test_fusion_refuses_bad_input() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="not positive"):
        # exponents sum to 3: reference exponent -2 with a sharper reference than the adapters
        fuse_gaussians([a, b], [1.0, 1.0], [1.5, 1.5], ref_mean=a, ref_variance=0.1)
    with pytest.raises(ValueError, match="exponents must be >= 0"):
        fuse_gaussians([a, b], [1.0, 1.0], [1.2, -0.2])
    with pytest.raises(ValueError, match="finite"):
        fuse_gaussians([a, b], [1.0, 1.0], [float("nan"), 1.0])
    with pytest.raises(ValueError, match="all zero"):
        fuse_gaussians([a, b], [1.0, 1.0], [0.0, 0.0], ref_mean=a, ref_variance=1.0)
    with pytest.raises(ValueError, match="pass ref_mean and ref_variance"):
        fuse_gaussians([a, b], [1.0, 1.0], [0.3, 0.3])
    with pytest.raises(ValueError, match="does not broadcast"):
        fuse_gaussians([a, b], [torch.ones(4), 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="means\\[1\\] has shape"):
        fuse_gaussians([a, torch.ones(3, 2)], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="one of each"):
        fuse_gaussians([a, b], [1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match=">= 0 everywhere"):
        fuse_gaussians([a, b], [1.0, -1.0], [0.5, 0.5])
    broken = torch.ones(2, 3)
    broken[0, 1], broken[1, 2] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"variances\[1\] must be finite and >= 0 everywhere; it has 1 NaN, "
                                         r"1 infinite"):
        fuse_gaussians([a, b], [1.0, broken], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"not positive at 6 of 6 elements .* reference exponent -2 \(1 - the sum of "
                                         r"the adapters' exponents \[1.5, 1.5\]\)"):
        fuse_gaussians([a, b], [1.0, 1.0], [1.5, 1.5], ref_mean=a, ref_variance=0.1)
