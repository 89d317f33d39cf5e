"""The MSDDA closed form: the normalised product of Gaussian step kernels raised to exponents.

For user weights w_i, adapter KL weights beta_i and a target KL weight beta, the step-optimal kernel for the
weighted reward sum_i w_i r_i is p_ref^(1 - sum l_i) * prod_i p_i^(l_i) with l_i = w_i * beta_i / beta. For
Gaussians N(mu_j, v_j) (the reference included, with exponent l_ref = 1 - sum l_i) the product is Gaussian:

    precision P = sum_j l_j / v_j            mean = (sum_j l_j mu_j / v_j) / P

Pure tensor maths, no diffusers: the sampler computes kernels with msdda.kernels and fuses them here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from msdda.errors import UserError

__all__ = ["fuse_gaussians", "exponents", "objective_beta", "reference_exponent", "REFERENCE_TOLERANCE"]

REFERENCE_TOLERANCE = 1e-8
"""The reference kernel is needed when |1 - sum(exponents)| exceeds this."""


def _check_finite_numbers(values: Sequence[float], name: str) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise UserError(f"{name} must be numbers, got {list(values)!r}") from error
    bad = [v for v in numbers if not math.isfinite(v)]
    if bad:
        raise UserError(f"{name} must be finite, got {numbers}")
    return numbers


def exponents(
    weights: Sequence[float], betas: Sequence[float] | None = None, beta: float | None = None
) -> list[float]:
    """The fusion exponents l_i = w_i * beta_i / beta.

    ``betas`` are the KL weights the adapters were trained with; ``beta`` is the KL weight of the fused
    objective. Left out, ``betas`` are all ``beta`` (so l_i = w_i). Left out, ``beta`` is the weights' mean of
    the betas, sum_i w_i beta_i / sum_i w_i: the adapters' common beta when they share one, and in general the
    beta that keeps sum_i l_i = sum_i w_i, so weights on the simplex need no reference kernel and a corner is
    its adapter alone; the reference enters at unequal betas only when ``beta`` is given.
    """
    weights = _check_finite_numbers(weights, "weights")
    if not weights:
        raise UserError("weights must name at least one adapter, got an empty list")
    negative = [w for w in weights if w < 0]
    if negative:
        raise UserError(f"weights must be >= 0, got {weights}; a negative weight would reward the opposite")
    if sum(weights) == 0:
        raise UserError(f"weights are all zero ({weights}); give at least one adapter a positive weight")
    if betas is None:
        if beta is not None:
            _check_positive_beta([beta], "beta")
        return list(weights)
    beta = objective_beta(weights, betas, beta)
    return [w * b / beta for w, b in zip(weights, betas)]


def objective_beta(weights: Sequence[float], betas: Sequence[float], beta: float | None = None) -> float:
    """The fused objective's KL weight: ``beta`` when given, else sum_i w_i beta_i / sum_i w_i (the adapters'
    common beta when they share one), checked to be a positive number like the adapters' ``betas``."""
    betas = _check_finite_numbers(betas, "betas")
    if len(betas) != len(weights):
        raise UserError(f"got {len(weights)} weights but {len(betas)} betas; give one beta per adapter")
    _check_positive_beta(betas, "betas")
    if beta is None:
        beta = betas[0] if max(betas) == min(betas) else sum(w * b for w, b in zip(weights, betas)) / sum(weights)
    _check_positive_beta([beta], "beta")
    return float(beta)


def _check_positive_beta(values: Sequence[float], name: str) -> None:
    values = _check_finite_numbers(values, name)
    if any(v <= 0 for v in values):
        raise UserError(f"{name} must be > 0 (a KL weight), got {values}")


def reference_exponent(exponents: Sequence[float]) -> float:
    """The reference kernel's exponent, 1 - sum(l_i); 0 (no reference needed) within REFERENCE_TOLERANCE."""
    remainder = 1.0 - math.fsum(float(l) for l in exponents)
    return 0.0 if abs(remainder) <= REFERENCE_TOLERANCE else remainder


def fuse_gaussians(
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor | float],
    exponents: Sequence[float],
    ref_mean: torch.Tensor | None = None,
    ref_variance: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse K Gaussian kernels N(means[i], variances[i]) with exponents l_i (and the reference) into one.

    Args:
        means: K tensors of one shape ``S``.
        variances: K tensors or floats broadcastable to ``S`` (scalar, per-row ``[B, 1, ...]`` or per-element).
        exponents: K floats l_i >= 0 (see :func:`exponents`).
        ref_mean, ref_variance: the reference kernel; required when 1 - sum(l_i) is not 0 (to 1e-8).

    Returns:
        ``(mean, variance)``: mean of shape ``S``, variance broadcastable to ``S``.

    Where every kernel has variance 0 (a deterministic step) there is no precision; the fused step is the
    equal-variance limit: mean = sum_j l_j mu_j, variance 0. Mixing zero and non-zero variances at one
    element has no well-defined limit and is refused.

    Raises:
        UserError (a ValueError): on mismatched lengths or shapes, negative/NaN exponents, negative, NaN or
        infinite variances, a missing reference, or a fused precision that is not positive (possible only when
        the reference's exponent is negative and its variance smaller than the adapters').

    The checks cost one host read per call, whatever K.
    """
    exponent_values = _check_finite_numbers(exponents, "exponents")
    if not means:
        raise UserError("means must hold at least one kernel mean, got none")
    if not (len(means) == len(variances) == len(exponent_values)):
        raise UserError(
            f"got {len(means)} means, {len(variances)} variances and {len(exponent_values)} exponents; "
            "give one of each per kernel"
        )
    if any(l < 0 for l in exponent_values):
        raise UserError(f"exponents must be >= 0, got {exponent_values}")
    if sum(exponent_values) == 0:
        raise UserError(f"exponents are all zero ({exponent_values}); give at least one kernel a positive weight")

    shape = means[0].shape
    for index, mean in enumerate(means):
        if mean.shape != shape:
            raise UserError(f"means[{index}] has shape {tuple(mean.shape)}, but means[0] has {tuple(shape)}")

    ref_exponent = reference_exponent(exponent_values)
    all_means = list(means)
    all_variances = list(variances)
    all_exponents = list(exponent_values)
    if ref_exponent != 0.0:
        if ref_mean is None or ref_variance is None:
            raise UserError(
                f"the exponents sum to {1 - ref_exponent:.6g}, so the reference kernel enters with exponent "
                f"{ref_exponent:.6g}: pass ref_mean and ref_variance (or use weights that sum to 1 with equal betas)"
            )
        if ref_mean.shape != shape:
            raise UserError(f"ref_mean has shape {tuple(ref_mean.shape)}, but the kernel means have {tuple(shape)}")
        all_means.append(ref_mean)
        all_variances.append(ref_variance)
        all_exponents.append(ref_exponent)

    dtype, device = means[0].dtype, means[0].device
    names = [f"variances[{index}]" for index in range(len(means))] + ["ref_variance"]
    variance_tensors = []
    for name, variance in zip(names, all_variances):
        variance = torch.as_tensor(variance, dtype=dtype, device=device)
        try:
            torch.broadcast_shapes(variance.shape, shape)
        except RuntimeError as error:
            raise UserError(
                f"{name} has shape {tuple(variance.shape)}, which does not broadcast to the means' {tuple(shape)}"
            ) from error
        variance_tensors.append(variance)

    variance_shape = torch.broadcast_shapes(*(v.shape for v in variance_tensors))
    zero = torch.stack([(v == 0).expand(variance_shape) for v in variance_tensors])
    all_zero, any_zero = zero.all(dim=0), zero.any(dim=0)

    precision = torch.zeros(variance_shape, dtype=dtype, device=device)
    weighted_mean = torch.zeros(torch.broadcast_shapes(variance_shape, shape), dtype=dtype, device=device)
    limit_mean = torch.zeros_like(weighted_mean)
    for mean, variance, exponent in zip(all_means, variance_tensors, all_exponents):
        safe_variance = torch.where(all_zero, torch.ones_like(variance), variance)
        precision = precision + exponent / safe_variance
        weighted_mean = weighted_mean + (exponent / safe_variance) * mean
        limit_mean = limit_mean + exponent * mean

    # every check in one host read (a GPU sync per check would stall the sampler at every step); the details of
    # a failure are read only when there is one
    invalid = [~torch.isfinite(v) | (v < 0) for v in variance_tensors]
    not_positive = ((precision <= 0) & ~all_zero).expand(weighted_mean.shape)
    failed = torch.stack([b.any() for b in invalid] + [(any_zero & ~all_zero).any(), not_positive.any()]).tolist()
    for name, variance, bad, flag in zip(names, variance_tensors, invalid, failed):
        if flag:
            raise UserError(
                f"{name} must be finite and >= 0 everywhere; it has {int(variance.isnan().sum())} NaN, "
                f"{int(variance.isinf().sum())} infinite and {int((variance < 0).sum())} negative elements (a broken "
                "adapter's learned variance?)")
    if failed[-2]:
        raise UserError(
            "some kernels have zero variance where others do not; a deterministic step can only be fused with "
            "other deterministic steps"
        )
    if failed[-1]:
        raise UserError(
            f"the fused precision is not positive at {int(not_positive.sum())} of {not_positive.numel()} elements "
            f"(min {float(precision[~all_zero].min()):.4g}): the reference exponent {ref_exponent:.4g} (1 - the sum of "
            f"the adapters' exponents {[round(l, 6) for l in exponent_values]}) outweighs the adapters where the "
            "reference's variance is the smaller; lower the weights or raise the target beta so that sum(l_i) is "
            "nearer 1"
        )
    fused_mean = torch.where(all_zero, limit_mean, weighted_mean / torch.where(all_zero, 1.0, precision))
    fused_variance = torch.where(all_zero, torch.zeros_like(precision), 1 / precision)
    return fused_mean, fused_variance
