"""An analytic world where every step optimum is known in closed form.

Data x0 ~ N(m0, S0) in d dimensions are diffused by a diffusers ``DDPMScheduler``. The ideal epsilon
predictor is then affine in x_t, so the reference kernel is exact; with linear rewards r_i(x) = a_i . x and
the ``tweedie`` step reward R_t(x_{t-1}) = r(E[x0 | x_{t-1}]), the step reward is linear in x_{t-1} and the
KL-regularised step optimum p_ref * exp(R_t / beta) / Z is the reference Gaussian with its mean shifted by
variance * grad R_t / beta. This lets tests check fusion, sampling and training against exact answers.

Learned variances: with a ``learned_range`` scheduler the reference model also outputs its variance channels
(at -1: the posterior variance, as ``fixed_small``), so a policy can move its variance too. A quadratic reward
of the next state, R(x_{t-1}) = -c ||x_{t-1} - a||^2, has a step optimum with a different variance from the
reference's: the reference Gaussian N(mu, s^2) tilted by exp(R / beta) is Gaussian with precision
1 / s^2 + 2 c / beta and mean (mu / s^2 + 2 c a / beta) / precision (``quadratic_optimal_kernel``).

Everything is float64 so that closed-form comparisons hold to 1e-10, far below the tolerances tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler

from msdda.errors import UserError
from msdda.kernels import StepKernel, previous_timestep, step_kernel
from msdda.sampling import denoise

__all__ = ["GaussianWorld", "VARIANCE_TYPES"]

VARIANCE_TYPES = ("fixed_small", "learned_range")
"""The DDPM variance types the world supports: the posterior variance, fixed or as the model's own output."""


class GaussianWorld:
    """Gaussian data under a DDPM schedule: exact denoiser, linear rewards, exact step optima.

    Args:
        data_mean: ``[d]`` mean m0 of the data.
        data_cov: ``[d, d]`` positive-definite covariance S0 of the data.
        scheduler: a ``DDPMScheduler`` with epsilon prediction, no clipping, a variance type of
            ``VARIANCE_TYPES`` and ``set_timesteps`` called.
    """

    def __init__(self, data_mean: torch.Tensor, data_cov: torch.Tensor, scheduler: DDPMScheduler) -> None:
        if scheduler.config.prediction_type != "epsilon" or scheduler.config.clip_sample:
            raise UserError("the analytic world needs an epsilon-predicting DDPMScheduler with clip_sample=False")
        if scheduler.config.variance_type not in VARIANCE_TYPES:
            raise UserError(f"the analytic world's variance_type must be one of {VARIANCE_TYPES} (its reference "
                             f"kernel has the posterior variance), got {scheduler.config.variance_type!r}")
        if scheduler.num_inference_steps is None:
            raise UserError("call scheduler.set_timesteps(num_inference_steps) before building the world")
        self.data_mean = torch.as_tensor(data_mean, dtype=torch.float64)
        self.data_cov = torch.as_tensor(data_cov, dtype=torch.float64)
        if self.data_mean.ndim != 1 or self.data_cov.shape != (self.dim, self.dim):
            raise UserError(f"data_mean must be [d] and data_cov [d, d], got {tuple(self.data_mean.shape)} and "
                             f"{tuple(self.data_cov.shape)}")
        torch.linalg.cholesky(self.data_cov)  # raises if not positive definite
        self.scheduler = scheduler

    @classmethod
    def default(cls, dim: int = 3, num_inference_steps: int = 20, seed: int = 0,
                variance_type: str = "fixed_small") -> GaussianWorld:
        """A random correlated Gaussian in ``dim`` dimensions under SD's linear 1000-step DDPM schedule;
        ``variance_type`` ``learned_range`` makes the variance part of the model's output."""
        generator = torch.Generator().manual_seed(seed)
        factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
        data_cov = factor @ factor.T + 0.1 * torch.eye(dim, dtype=torch.float64)
        data_mean = torch.randn(dim, generator=generator, dtype=torch.float64)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  variance_type=variance_type, prediction_type="epsilon")
        scheduler.set_timesteps(num_inference_steps)
        return cls(data_mean, data_cov, scheduler)

    @property
    def dim(self) -> int:
        return self.data_mean.shape[0]

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.scheduler.timesteps]

    def alpha_bar(self, timestep: int) -> float:
        """The cumulative signal fraction at ``timestep``; 1 at timestep -1 (clean data)."""
        return 1.0 if timestep < 0 else float(self.scheduler.alphas_cumprod[timestep].double())

    def previous(self, timestep: int) -> int:
        return int(previous_timestep(self.scheduler, timestep))

    def marginal(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        ab = self.alpha_bar(timestep)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return ab**0.5 * self.data_mean, ab * self.data_cov + (1 - ab) * eye

    def epsilon_affine(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) with E[eps | x_t] = A x_t + b: the exact epsilon predictor."""
        ab = self.alpha_bar(timestep)
        mean, cov = self.marginal(timestep)
        gain = (1 - ab) ** 0.5 * torch.linalg.inv(cov)
        return gain, -gain @ mean

    def x0_affine(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with E[x0 | x_t] = M x_t + c (Tweedie); the identity at timestep -1."""
        ab = self.alpha_bar(timestep)
        eye = torch.eye(self.dim, dtype=torch.float64)
        if timestep < 0:
            return eye, torch.zeros(self.dim, dtype=torch.float64)
        gain, offset = self.epsilon_affine(timestep)
        return (eye - (1 - ab) ** 0.5 * gain) / ab**0.5, -(1 - ab) ** 0.5 * offset / ab**0.5

    def epsilon(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """The ideal epsilon prediction for a batch ``[B, d]``."""
        gain, offset = self.epsilon_affine(timestep)
        return x_t @ gain.T + offset

    def x0_estimate(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """E[x0 | x_timestep] for a batch ``[B, d]``."""
        gain, offset = self.x0_affine(timestep)
        return x @ gain.T + offset

    @property
    def learns_variance(self) -> bool:
        """Whether the model output carries variance channels after the epsilon prediction."""
        return self.scheduler.config.variance_type == "learned_range"

    def reference_output(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """The reference model's output ``[B, d]``: the ideal epsilon, followed with ``learned_range`` by ``[B, d]``
        variance channels at -1 (the lower end of the range: the posterior variance)."""
        epsilon = self.epsilon(x_t, timestep)
        return torch.cat([epsilon, -torch.ones_like(epsilon)], dim=1) if self.learns_variance else epsilon

    def reference_kernel(self, x_t: torch.Tensor, timestep: int) -> StepKernel:
        """The reference policy p_ref(x_{t-1} | x_t), through msdda.kernels like any diffusers model."""
        return step_kernel(self.scheduler, self.reference_output(x_t, timestep), timestep, x_t)

    def tweedie_step_reward(self, x_prev: torch.Tensor, timestep: int, reward_vector: torch.Tensor) -> torch.Tensor:
        """R_t(x_{t-1}) = a . E[x0 | x_{t-1}], the ``tweedie`` step reward of the step leaving ``timestep``."""
        return self.x0_estimate(x_prev, self.previous(timestep)) @ torch.as_tensor(reward_vector, dtype=torch.float64)

    def tweedie_reward_gradient(self, timestep: int, reward_vector: torch.Tensor) -> torch.Tensor:
        """d R_t / d x_{t-1} = M_{t-1}^T a, constant because everything is affine."""
        gain, _ = self.x0_affine(self.previous(timestep))
        return gain.T @ torch.as_tensor(reward_vector, dtype=torch.float64)

    def optimal_kernel(
        self,
        x_t: torch.Tensor,
        timestep: int,
        reward_vectors: Sequence[torch.Tensor],
        weights: Sequence[float],
        beta: float,
    ) -> StepKernel:
        """The step optimum for the reward sum_i w_i a_i . x with KL weight beta: p_ref tilted by exp(R_t / beta)."""
        reference = self.reference_kernel(x_t, timestep)
        gradient = sum(w * self.tweedie_reward_gradient(timestep, a) for w, a in zip(weights, reward_vectors))
        mean = reference.mean + reference.variance * gradient / beta
        return StepKernel(mean=mean, variance=reference.variance, pred_original_sample=reference.pred_original_sample)

    @staticmethod
    def quadratic_step_reward(x_prev: torch.Tensor, centre: torch.Tensor, curvature: float) -> torch.Tensor:
        """R(x_{t-1}) = -curvature * ||x_{t-1} - centre||^2 for a batch ``[B, d]``: a reward of the next state whose
        step optimum narrows the kernel (see ``quadratic_optimal_kernel``)."""
        return -curvature * ((x_prev - torch.as_tensor(centre, dtype=x_prev.dtype)) ** 2).sum(dim=1)

    def quadratic_optimal_kernel(self, x_t: torch.Tensor, timestep: int, centre: torch.Tensor, curvature: float,
                                 beta: float) -> StepKernel:
        """The step optimum for ``quadratic_step_reward`` with KL weight beta: p_ref * exp(R / beta) / Z, the
        reference Gaussian N(mu, s^2) times an unnormalised Gaussian in x_{t-1} with precision 2 c / beta at the
        centre. Its variance 1 / (1 / s^2 + 2 c / beta) is below the reference's."""
        reference = self.reference_kernel(x_t, timestep)
        tilt = 2 * curvature / beta
        precision = 1 / reference.variance + tilt
        mean = (reference.mean / reference.variance + tilt * torch.as_tensor(centre, dtype=x_t.dtype)) / precision
        return StepKernel(mean=mean, variance=1 / precision, pred_original_sample=reference.pred_original_sample)

    def sample_chain(
        self,
        kernel: Callable[[torch.Tensor, int], StepKernel],
        num_samples: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Run a policy given as ``kernel(x_t, timestep)`` from x_T ~ N(0, I) over the schedule; returns x0."""
        x = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return denoise(self.timesteps, x, lambda _index, timestep, x_t: kernel(x_t, timestep), generator, x)

    def optimal_chain_moments(
        self, reward_vectors: Sequence[torch.Tensor], weights: Sequence[float], beta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean and covariance of x0 under the chain of step optima, propagated in closed form.

        Derived here from the DDPM posterior coefficients directly (not through msdda.kernels), so tests can
        hold the kernel-and-fusion sampler against it. x_{t-1} = F x_t + h + s_t z with
        F = c0 (I - sqrt(1-ab) A) / sqrt(ab) + ct I, h = -c0 sqrt(1-ab) b / sqrt(ab) + s_t^2 grad / beta.
        """
        eye = torch.eye(self.dim, dtype=torch.float64)
        mean = torch.zeros(self.dim, dtype=torch.float64)
        cov = eye.clone()
        for timestep in self.timesteps:
            ab, ab_prev = self.alpha_bar(timestep), self.alpha_bar(self.previous(timestep))
            alpha = ab / ab_prev
            coeff_x0 = ab_prev**0.5 * (1 - alpha) / (1 - ab)
            coeff_xt = alpha**0.5 * (1 - ab_prev) / (1 - ab)
            variance = (1 - ab_prev) / (1 - ab) * (1 - alpha) if timestep > 0 else 0.0
            gain, offset = self.epsilon_affine(timestep)
            transition = coeff_x0 * (eye - (1 - ab) ** 0.5 * gain) / ab**0.5 + coeff_xt * eye
            gradient = sum(w * self.tweedie_reward_gradient(timestep, a) for w, a in zip(weights, reward_vectors))
            shift = -coeff_x0 * (1 - ab) ** 0.5 * offset / ab**0.5 + variance * gradient / beta
            mean = transition @ mean + shift
            cov = transition @ cov @ transition.T + variance * eye
        return mean, cov
