"""How near a step kernel is to its step optimum: the pathwise first-order condition, as pure tensor maths.

For a Gaussian step kernel pi = N(mu_ref + d, s^2) with the reference's variance and a differentiable step reward
R_t, the step objective E_{x_{t-1} ~ pi}[R_t(x_{t-1})] - beta KL(pi || p_ref) has the gradient in d

    E[grad R_t(x_{t-1})] - beta d / s^2,

so it is stationary where the mean shift equals

    d* = s^2 / beta * E_{x_{t-1} ~ pi(.|x_t)} [grad R_t(x_{t-1})]        (../shared/DESIGN.md, "step optimum")

Over the states of a step, |d| / |d*| (1 at the optimum, 0 at the reference) and cos(d, d*) say how far an adapter
went and whether in the right direction; both are read as ratios of sums over states (root mean squares), which stay
defined where the reward's gradient at a single state is lost in its noise. Where the condition holds with another
beta', d = s^2 / beta' E[grad R]: the beta that fits the shifts best in the KL metric, sum |d - s^2 g / b|^2 / (2 s^2)
minimised over b, is the *implied beta*

    b = sum s^2 |g|^2 / sum <d, g>,

equal to the trained beta at the optimum, larger where the adapter stopped short, and the beta at which an adapter
trained elsewhere (without a step-level KL) is step-optimal for a reward, so that MSDDA's exponents fit it.

E[grad R] is estimated from K draws of x_{t-1}. The squared norm of their mean overestimates |E grad R|^2 by the
draws' variance over K; the energies here remove that bias (per state they can then be negative; their sums over
states are what is read), so that few draws do not make an adapter look short of its optimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["Stationarity", "stationarity", "ratio_and_cosine", "implied_beta", "scale_beta"]


@dataclass(frozen=True)
class Stationarity:
    """The first-order condition's parts at N states of one step, each ``[N]`` float64."""

    shift_energy: torch.Tensor
    """|d|^2."""
    target_energy: torch.Tensor
    """|d*|^2 = |s^2 g|^2 / beta^2, bias-corrected."""
    alignment: torch.Tensor
    """<d, d*>."""
    kl: torch.Tensor
    """|d|^2 / (2 s^2) summed over elements: the KL the shift spends (with the reference's variance)."""
    optimum_kl: torch.Tensor
    """s^2 |g|^2 / (2 beta^2), bias-corrected: the KL the optimum's shift spends."""
    shift_dot_gradient: torch.Tensor
    """<d, g>: the implied beta's denominator."""
    gradient_energy: torch.Tensor
    """s^2 |g|^2, bias-corrected: its numerator."""

    @staticmethod
    def concatenate(parts: Sequence[Stationarity]) -> Stationarity:
        """The states of ``parts`` (of one step) together."""
        return Stationarity(**{f.name: torch.cat([getattr(part, f.name) for part in parts]) for f in fields(Stationarity)})


def stationarity(shift: torch.Tensor, variance: torch.Tensor, gradients: torch.Tensor, beta: float) -> Stationarity:
    """The parts of the pathwise first-order condition at N states.

    Args:
        shift: ``[N, ...]`` d = mu_theta(x_t) - mu_ref(x_t).
        variance: the step's variance s^2, broadcastable to ``shift`` (the reference's: the KL's metric).
        gradients: ``[K, N, ...]`` grad R_t at K independent draws x_{t-1} ~ pi_theta(.|x_t) per state (K >= 2 for
            the bias correction; with K = 1 the energies keep their bias).
        beta: the KL weight the condition is checked for (> 0).
    """
    variance = torch.as_tensor(variance, device=shift.device).double().expand_as(shift).flatten(1)
    shift, gradients = shift.double().flatten(1), gradients.double().flatten(2)
    draws = gradients.shape[0]
    gradient = gradients.mean(dim=0)

    def energy(scale: torch.Tensor) -> torch.Tensor:
        """sum scale * g^2 over elements, less the draws' contribution sum scale * Var(g) / K."""
        value = (scale * gradient * gradient).sum(dim=1)
        if draws > 1:
            spread = gradients - gradient
            value = value - (scale * spread * spread).sum(dim=(0, 2)) / (draws * (draws - 1))
        return value

    weighted = energy(variance * variance)  # |s^2 g|^2
    plain = energy(variance)  # s^2 |g|^2
    return Stationarity(shift_energy=(shift * shift).sum(dim=1), target_energy=weighted / beta**2,
                        alignment=(shift * variance * gradient).sum(dim=1) / beta,
                        kl=(shift * shift / variance).sum(dim=1) / 2, optimum_kl=plain / (2 * beta**2),
                        shift_dot_gradient=(shift * gradient).sum(dim=1), gradient_energy=plain)


def ratio_and_cosine(check: Stationarity) -> tuple[float, float]:
    """|d| / |d*| and cos(d, d*) over the states of ``check``, as root-mean-square ratios: sqrt(sum |d|^2 / sum
    |d*|^2) and sum <d, d*> / sqrt(sum |d|^2 sum |d*|^2). NaN where the states show no reward gradient above its
    noise (sum |d*|^2 <= 0)."""
    shift, target = float(check.shift_energy.sum()), float(check.target_energy.sum())
    if target <= 0:
        return float("nan"), float("nan")
    cosine = float(check.alignment.sum()) / (shift * target) ** 0.5 if shift > 0 else 0.0
    return (shift / target) ** 0.5, cosine


def scale_beta(checks: Sequence[Stationarity]) -> float:
    """The beta at which the shifts of ``checks`` are optimal in their own direction: scaling every shift d by a
    factor c changes the step objective by c <g, d> - beta c^2 |d|^2 / (2 s^2), stationary at c = 1 where
    beta = sum <d, g> / sum |d|^2 / s^2 (with a locally linear reward: the step-reward gain over twice the KL).
    A family of adapters that cannot hold d* (cos(d, d*) < 1) can still meet this condition at its best member; it
    is the one condition a restricted family must meet. ``nan`` where nothing moved."""
    along = sum(float(check.shift_dot_gradient.sum()) for check in checks)
    spent = sum(2 * float(check.kl.sum()) for check in checks)
    return along / spent if spent > 0 else float("nan")


def implied_beta(checks: Sequence[Stationarity]) -> float:
    """The beta at which the shifts of ``checks`` (any steps and states) best satisfy the first-order condition, in
    the KL metric; ``inf`` where they do not move along the reward's gradient at all, or where the states show no
    reward gradient above its noise (the bias-corrected energy is not positive)."""
    along = sum(float(check.shift_dot_gradient.sum()) for check in checks)
    energy = sum(float(check.gradient_energy.sum()) for check in checks)
    return energy / along if along > 0 and energy > 0 else float("inf")
