"""Analytic worlds where every step optimum is known in closed form.

Data x0 ~ N(m0, S0) in d dimensions are noised as x = alpha x0 + sigma eps: by a diffusers ``DDPMScheduler``
(alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); :class:`GaussianWorld`) or along a flow-matching path
(alpha = 1 - s, sigma = s at noise level s; :class:`FlowGaussianWorld`). The conditional expectations
E[eps | x] and E[x0 | x] are then affine in x, so the ideal epsilon and velocity predictors, and with them the
reference kernels, are exact; with linear rewards r_i(x) = a_i . x and the ``tweedie`` step reward
R_t(x_{t-1}) = r(E[x0 | x_{t-1}]), the step reward is linear in x_{t-1} and the KL-regularised step optimum
p_ref * exp(R_t / beta) / Z is the reference Gaussian with its mean shifted by variance * grad R_t / beta. This
lets tests check kernels, fusion, sampling and training against exact answers.

Everything is float64 so that closed-form comparisons hold to 1e-10, far below the tolerances tested.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from msdda.errors import UserError
from msdda.kernels import StepKernel, flow_sigmas, previous_timestep, step_kernel
from msdda.sampling import denoise

__all__ = ["GaussianWorld", "FlowGaussianWorld", "VARIANCE_TYPES"]

VARIANCE_TYPES = ("fixed_small", "learned_range")
"""The DDPM variance types the world supports: the posterior variance, fixed or as the model's own output."""

Timestep = int | float
"""A DDPM world's timesteps are ints; a flow world's are its scheduler's float timesteps."""


def _random_gaussian(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random mean and correlated covariance (eigenvalues >= 0.1) in ``dim`` dimensions."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    data_cov = factor @ factor.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    data_mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    return data_mean, data_cov


class _GaussianData(ABC):
    """Gaussian data seen through x = alpha x0 + sigma eps: the arithmetic both worlds share.

    A world says where a timestep puts x (:meth:`levels`), where its step lands (:meth:`next_levels`), its
    reference kernel and its schedule; this class turns those into marginals, Tweedie estimates, step
    rewards, step optima, sampled chains and exactly propagated moments.
    """

    def __init__(self, data_mean: torch.Tensor, data_cov: torch.Tensor) -> None:
        self.data_mean = torch.as_tensor(data_mean, dtype=torch.float64)
        self.data_cov = torch.as_tensor(data_cov, dtype=torch.float64)
        if self.data_mean.ndim != 1 or self.data_cov.shape != (self.dim, self.dim):
            raise UserError(f"data_mean must be [d] and data_cov [d, d], got {tuple(self.data_mean.shape)} and "
                             f"{tuple(self.data_cov.shape)}")
        torch.linalg.cholesky(self.data_cov)  # raises if not positive definite

    @property
    def dim(self) -> int:
        return self.data_mean.shape[0]

    @property
    @abstractmethod
    def timesteps(self) -> list[Timestep]:
        """The schedule's timesteps, in sampling order."""

    @abstractmethod
    def levels(self, timestep: Timestep) -> tuple[float, float]:
        """(alpha, sigma) with x_t = alpha x0 + sigma eps at ``timestep``."""

    @abstractmethod
    def next_levels(self, timestep: Timestep) -> tuple[float, float]:
        """(alpha, sigma) of the state x_{t-1} that the step leaving ``timestep`` lands in."""

    @abstractmethod
    def reference_kernel(self, x_t: torch.Tensor, timestep: Timestep) -> StepKernel:
        """The reference policy p_ref(x_{t-1} | x_t), through msdda.kernels like any diffusers model."""

    def marginal_at(self, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x = alpha x0 + sigma eps."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return alpha * self.data_mean, alpha**2 * self.data_cov + sigma**2 * eye

    def epsilon_affine_at(self, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) with E[eps | x] = A x + b, the regression of eps on x (Cov(eps, x) = sigma I)."""
        mean, cov = self.marginal_at(alpha, sigma)
        gain = sigma * torch.linalg.inv(cov)
        return gain, -gain @ mean

    def x0_affine_at(self, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with E[x0 | x] = M x + c (Tweedie; Cov(x0, x) = alpha S0): the identity where sigma = 0."""
        mean, cov = self.marginal_at(alpha, sigma)
        gain = alpha * self.data_cov @ torch.linalg.inv(cov)
        return gain, self.data_mean - gain @ mean

    def tweedie_step_reward(self, x_prev: torch.Tensor, timestep: Timestep, reward_vector: torch.Tensor) -> torch.Tensor:
        """R_t(x_{t-1}) = a . E[x0 | x_{t-1}], the ``tweedie`` step reward of the step leaving ``timestep``."""
        gain, offset = self.x0_affine_at(*self.next_levels(timestep))
        return (x_prev @ gain.T + offset) @ torch.as_tensor(reward_vector, dtype=torch.float64)

    def tweedie_reward_gradient(self, timestep: Timestep, reward_vector: torch.Tensor) -> torch.Tensor:
        """d R_t / d x_{t-1} = M_{t-1}^T a, constant because everything is affine."""
        gain, _ = self.x0_affine_at(*self.next_levels(timestep))
        return gain.T @ torch.as_tensor(reward_vector, dtype=torch.float64)

    def optimal_kernel(
        self,
        x_t: torch.Tensor,
        timestep: Timestep,
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

    def quadratic_optimal_kernel(self, x_t: torch.Tensor, timestep: Timestep, centre: torch.Tensor, curvature: float,
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
        kernel: Callable[[torch.Tensor, Timestep], StepKernel],
        num_samples: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Run a policy given as ``kernel(x_t, timestep)`` from x_T ~ N(0, I) over the schedule; returns x0."""
        x = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return denoise(self.timesteps, x, lambda _index, timestep, x_t: kernel(x_t, timestep), generator, x)

    def chain_moments(
        self, kernel: Callable[[torch.Tensor, Timestep], StepKernel]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Exact mean and covariance of x_{t-1} after every step of a policy run from x_T ~ N(0, I).

        Holds for kernels whose mean is affine in x_t and whose variance does not depend on x_t (every kernel
        of these worlds): the affine map is read off the kernel at x_t = 0 and at the unit vectors, so the
        kernel arithmetic under test is the one msdda.kernels computes, with no Monte Carlo error.
        """
        eye = torch.eye(self.dim, dtype=torch.float64)
        points = torch.cat([torch.zeros(1, self.dim, dtype=torch.float64), eye])
        mean, cov, moments = torch.zeros(self.dim, dtype=torch.float64), eye, []
        for timestep in self.timesteps:
            step = kernel(points, timestep)
            offset = step.mean[0]
            transition = (step.mean[1:] - offset).T
            variance = torch.as_tensor(step.variance, dtype=torch.float64).expand(points.shape)[0]
            mean, cov = transition @ mean + offset, transition @ cov @ transition.T + torch.diag(variance)
            moments.append((mean, cov))
        return moments


class GaussianWorld(_GaussianData):
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
        super().__init__(data_mean, data_cov)
        self.scheduler = scheduler

    @classmethod
    def default(cls, dim: int = 3, num_inference_steps: int = 20, seed: int = 0,
                variance_type: str = "fixed_small") -> GaussianWorld:
        """A random correlated Gaussian in ``dim`` dimensions under SD's linear 1000-step DDPM schedule;
        ``variance_type`` ``learned_range`` makes the variance part of the model's output."""
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  variance_type=variance_type, prediction_type="epsilon")
        scheduler.set_timesteps(num_inference_steps)
        return cls(*_random_gaussian(dim, seed), scheduler)

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.scheduler.timesteps]

    def alpha_bar(self, timestep: int) -> float:
        """The cumulative signal fraction at ``timestep``; 1 at timestep -1 (clean data)."""
        return 1.0 if timestep < 0 else float(self.scheduler.alphas_cumprod[timestep].double())

    def previous(self, timestep: int) -> int:
        return int(previous_timestep(self.scheduler, timestep))

    def levels(self, timestep: int) -> tuple[float, float]:
        ab = self.alpha_bar(timestep)
        return ab**0.5, (1 - ab) ** 0.5

    def next_levels(self, timestep: int) -> tuple[float, float]:
        return self.levels(self.previous(timestep))

    def marginal(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        return self.marginal_at(*self.levels(timestep))

    def epsilon_affine(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) with E[eps | x_t] = A x_t + b: the exact epsilon predictor."""
        return self.epsilon_affine_at(*self.levels(timestep))

    def x0_affine(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with E[x0 | x_t] = M x_t + c (Tweedie); the identity at timestep -1."""
        return self.x0_affine_at(*self.levels(timestep))

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
        return step_kernel(self.scheduler, self.reference_output(x_t, timestep), timestep, x_t)

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


class FlowGaussianWorld(_GaussianData):
    """Gaussian data on a flow-matching path x_s = (1 - s) x0 + s eps: exact velocity, exact step optima.

    The ideal velocity v(x_s, s) = E[eps - x0 | x_s] is affine in x_s, and the reference kernel is the one
    msdda.kernels builds from it for a ``FlowMatchEulerDiscreteScheduler``: Flow-GRPO's SDE step with noise
    level ``flow_noise_level`` (a; 0 is the Euler ODE step), or diffusers' own step where the scheduler has
    ``stochastic_sampling=True`` (then ``flow_noise_level`` must be None).

    Args:
        data_mean: ``[d]`` mean m0 of the data.
        data_cov: ``[d, d]`` positive-definite covariance S0 of the data.
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` with ``set_timesteps`` called.
        flow_noise_level: the SDE's a (None: msdda.kernels' default, Flow-GRPO's 0.7).
    """

    def __init__(self, data_mean: torch.Tensor, data_cov: torch.Tensor, scheduler: FlowMatchEulerDiscreteScheduler,
                 flow_noise_level: float | None = None) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise UserError(f"the flow world needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
                            " (GaussianWorld is the DDPM one)")
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise UserError("call scheduler.set_timesteps(num_inference_steps) before building the world")
        super().__init__(data_mean, data_cov)
        self.scheduler = scheduler
        self.flow_noise_level = flow_noise_level

    @classmethod
    def default(cls, dim: int = 3, num_inference_steps: int = 20, seed: int = 0, shift: float = 3.0,
                flow_noise_level: float | None = None, stochastic_sampling: bool = False) -> FlowGaussianWorld:
        """A random correlated Gaussian in ``dim`` dimensions under SD3's flow schedule (shift 3)."""
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic_sampling)
        scheduler.set_timesteps(num_inference_steps)
        return cls(*_random_gaussian(dim, seed), scheduler, flow_noise_level)

    @property
    def timesteps(self) -> list[float]:
        return [float(t) for t in self.scheduler.timesteps]

    def noise_levels(self, timestep: float) -> tuple[float, float]:
        """(s, s_next): the scheduler's sigma at ``timestep`` and the one its step goes to (0 after the last)."""
        sigma, sigma_next = flow_sigmas(self.scheduler, timestep, torch.zeros((), dtype=torch.float64))
        return float(sigma), float(sigma_next)

    def levels(self, timestep: float) -> tuple[float, float]:
        sigma, _ = self.noise_levels(timestep)
        return 1 - sigma, sigma

    def next_levels(self, timestep: float) -> tuple[float, float]:
        _, sigma_next = self.noise_levels(timestep)
        return 1 - sigma_next, sigma_next

    def marginal(self, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x_s = (1 - s) x0 + s eps."""
        return self.marginal_at(*self.levels(timestep))

    def velocity(self, x_t: torch.Tensor, timestep: float) -> torch.Tensor:
        """The ideal velocity E[eps - x0 | x_s] for a batch ``[B, d]``."""
        eps_gain, eps_offset = self.epsilon_affine_at(*self.levels(timestep))
        x0_gain, x0_offset = self.x0_affine_at(*self.levels(timestep))
        return x_t @ (eps_gain - x0_gain).T + (eps_offset - x0_offset)

    def reference_kernel(self, x_t: torch.Tensor, timestep: float) -> StepKernel:
        return step_kernel(self.scheduler, self.velocity(x_t, timestep), timestep, x_t,
                           flow_noise_level=self.flow_noise_level)
