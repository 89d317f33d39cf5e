"""Gaussian reverse-step kernels of diffusers schedulers: mean, variance, log-prob and KL.

A stochastic sampler turns each denoising step into a Gaussian policy
p(x_{t-1} | x_t) = N(mean, variance). This module is the one place where msdda computes that kernel from a
scheduler and a model output, its log-density and the KL between two kernels; the trainer and the fused
sampler both call it, so the arithmetic cannot drift between them.

Supported: ``DDPMScheduler`` (variance types ``fixed_small``, ``fixed_small_log``, ``fixed_large``,
``learned``, ``learned_range``) and ``DDIMScheduler`` (any ``eta``; ``eta = 0`` is a deterministic step and
is reported with variance 0), each with ``epsilon``, ``v_prediction`` and ``sample`` prediction; and
``FlowMatchEulerDiscreteScheduler`` (SD3, FLUX: a velocity prediction), either with Flow-GRPO's SDE step or,
when the scheduler's ``stochastic_sampling`` is on, with diffusers' own re-noising step (see
:func:`step_kernel`).

Shapes: ``sample`` is ``[B, ...]``; ``timestep`` is an int, a 0-d tensor, or a ``[B]`` tensor (one timestep
per batch row, as the trainer uses when it shuffles steps); for a flow scheduler it is one of its float
``timesteps`` (sigma * num_train_timesteps). Variances come back broadcastable to the mean:
``[B, 1, ...]`` (or 0-d) for scheduler variances, full shape for a learned variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from msdda.errors import UserError

__all__ = [
    "StepKernel",
    "step_kernel",
    "previous_timestep",
    "flow_sigmas",
    "gaussian_log_prob",
    "gaussian_kl",
    "kernel_kl",
    "learns_variance",
    "check_learned_variances",
    "LEARNED_VARIANCE_TYPES",
    "initial_latents",
    "standard_normal",
    "SUPPORTED_SCHEDULERS",
    "DEFAULT_FLOW_NOISE_LEVEL",
]

SUPPORTED_SCHEDULERS = (DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler)
DEFAULT_FLOW_NOISE_LEVEL = 0.7
"""Flow-GRPO's default ``noise_level`` a of its SDE step, sigma_t = a sqrt(t / (1 - t))."""
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
"""DDPM variance types whose variance the model predicts (its extra output channels)."""
Reduction = Literal["sum", "mean", "none"]


@dataclass(frozen=True)
class StepKernel:
    """One reverse step p(x_{t-1} | x_t) = N(mean, variance), plus the x0 estimate the mean was built from.

    ``variance`` broadcasts to ``mean``; it is 0 where the step is deterministic (DDIM with eta = 0, or the
    final DDPM step), in which case there is no density and ``log_prob`` refuses.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    @property
    def std(self) -> torch.Tensor:
        return self.variance.sqrt()

    @property
    def is_deterministic(self) -> bool:
        """True when every element of the step has zero variance."""
        return bool((self.variance == 0).all())

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_{t-1} = mean + std * noise (noise drawn from ``generator`` when not given)."""
        if noise is None:
            noise = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        return self.mean + self.std * noise

    def log_prob(self, x_prev: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
        """log p(x_prev | x_t), summed (or averaged) over all but the batch dimension."""
        return gaussian_log_prob(x_prev, self.mean, self.variance, reduction=reduction)


def _check_scheduler(scheduler: object) -> None:
    if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
        raise UserError(
            f"scheduler {type(scheduler).__name__} is not supported for Gaussian step kernels; use one of {names} "
            "(e.g. `DDIMScheduler.from_config(pipe.scheduler.config)` with eta > 0)"
        )
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.invert_sigmas:
            raise UserError("FlowMatchEulerDiscreteScheduler with invert_sigmas=True (Mochi) is not supported; use "
                            "invert_sigmas=False, where sigma = 1 is noise and the schedule ends at sigma = 0")
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise UserError("call scheduler.set_timesteps(num_inference_steps) before computing step kernels")
        return
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in _PREDICTION_TYPES:
        raise UserError(f"prediction_type {prediction_type!r} is not supported; use one of {_PREDICTION_TYPES}")
    if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type not in _DDPM_VARIANCE_TYPES:
        raise UserError(
            f"DDPMScheduler variance_type {scheduler.config.variance_type!r} is not supported; use one of "
            f"{_DDPM_VARIANCE_TYPES}"
        )


def learns_variance(scheduler: object) -> bool:
    """Whether the scheduler takes its variance from the model output (DDPM ``learned``/``learned_range``)."""
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in LEARNED_VARIANCE_TYPES


def _as_timesteps(timestep: int | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    timesteps = torch.as_tensor(timestep, device=device).long()
    if timesteps.ndim > 1:
        raise UserError(f"timestep must be an int, a 0-d tensor or a [B] tensor, got shape {tuple(timesteps.shape)}")
    return timesteps


def previous_timestep(
    scheduler: DDPMScheduler | DDIMScheduler, timestep: int | torch.Tensor
) -> torch.Tensor:
    """The timestep the scheduler steps to from ``timestep`` (-1 after the last step), elementwise."""
    _check_scheduler(scheduler)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise UserError("a flow scheduler steps between noise levels, not timesteps: use flow_sigmas(scheduler, "
                        "timestep) for the sigma a step starts from and the one it steps to")
    timesteps = _as_timesteps(timestep, timestep.device if torch.is_tensor(timestep) else None)
    if isinstance(scheduler, DDIMScheduler) or not (scheduler.custom_timesteps or scheduler.num_inference_steps):
        if isinstance(scheduler, DDIMScheduler) and scheduler.num_inference_steps is None:
            raise UserError("call scheduler.set_timesteps(num_inference_steps) before computing step kernels")
        stride = (
            scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            if scheduler.num_inference_steps
            else 1
        )
        return timesteps - stride
    schedule = scheduler.timesteps.to(timesteps.device).long()
    matches = schedule[None, :] == timesteps.reshape(-1, 1)
    if not bool(matches.any(dim=1).all()):
        missing = timesteps.reshape(-1)[~matches.any(dim=1)].tolist()
        raise UserError(f"timesteps {missing} are not in scheduler.timesteps; step only through the set schedule")
    index = matches.long().argmax(dim=1)
    following = torch.cat([schedule, schedule.new_tensor([-1])])
    return following[index + 1].reshape(timesteps.shape)


_device_copies: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _on_device(table: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``table`` on ``device``, copied once: a copy per step would make the GPU wait for the CPU at every step."""
    key = (id(table), device, dtype)
    if key not in _device_copies or _device_copies[key][0] is not table:  # the id of a freed table can come back
        _device_copies[key] = (table, table.to(device=device, dtype=dtype))
    return _device_copies[key][1]


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape 0-d or [B] per-timestep values to broadcast against a [B, ...] sample."""
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def flow_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma_next): the noise level a flow step starts from and the one it steps to, per row of ``like``.

    ``timestep`` is one of ``scheduler.timesteps`` (a float, 0-d or ``[B]``); sigma_next is 0 after the last
    step. Both come back in ``like``'s dtype, shaped to broadcast against it.
    """
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise UserError(f"flow_sigmas needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}; "
                        "DDPM and DDIM steps go between timesteps (previous_timestep)")
    _check_scheduler(scheduler)
    timesteps = torch.as_tensor(timestep, device=like.device)
    if not timesteps.is_floating_point():
        raise UserError(f"flow timesteps are floats (sigma * num_train_timesteps), got {timesteps.dtype} "
                        f"{timesteps.tolist()}: pass one of scheduler.timesteps, not a step index")
    if timesteps.ndim > 1:
        raise UserError(f"timestep must be a float, a 0-d tensor or a [B] tensor, got shape {tuple(timesteps.shape)}")
    schedule = _on_device(scheduler.timesteps, like.device, scheduler.timesteps.dtype)
    matches = schedule[None, :] == timesteps.to(schedule.dtype).reshape(-1, 1)
    if not bool(matches.any(dim=1).all()):
        missing = timesteps.reshape(-1)[~matches.any(dim=1)].tolist()
        raise UserError(f"timesteps {missing} are not in scheduler.timesteps; step only through the set schedule")
    index = matches.long().argmax(dim=1).reshape(timesteps.shape)
    sigmas = _on_device(scheduler.sigmas, like.device, like.dtype)
    return _per_row(sigmas[index], like), _per_row(sigmas[index + 1], like)


def _flow_step_kernel(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
) -> StepKernel:
    """The Gaussian kernel of a flow step from sigma to sigma_next < sigma, from the velocity prediction v.

    x0_hat = x - sigma v and eps_hat = x + (1 - sigma) v are the clean and noise estimates (x = (1 - sigma) x0
    + sigma eps). With the scheduler's ``stochastic_sampling`` the step is diffusers' re-noising of x0_hat:
    N((1 - sigma_next) x0_hat, sigma_next^2) (deterministic at the last step). Otherwise it is Flow-GRPO's SDE
    step (``sde_step_with_logprob``), with dt = sigma_next - sigma < 0 and s_t^2 = a^2 sigma / (1 - sigma):

        mean = x + [v + s_t^2 / (2 sigma) eps_hat] dt,        variance = s_t^2 (-dt)

    the Euler-Maruyama step of the reverse SDE whose drift is the ODE's v plus the score correction (the score
    is -eps_hat / sigma), so it keeps the ODE's marginals. As in Flow-GRPO, s_t^2 takes 1 - sigmas[1] as its
    denominator where sigma = 1 (the first step of a full schedule), and the last step (to sigma_next = 0)
    is noisy too. ``noise_level = 0`` gives the deterministic Euler (ODE) step.
    """
    compute = torch.promote_types(sample.dtype, torch.float32)  # Flow-GRPO: bf16 overflows here
    sample, model_output = sample.to(compute), model_output.to(compute)
    sigma, sigma_next = flow_sigmas(scheduler, timestep, sample)
    if bool((sigma <= 0).any()):
        raise UserError("a flow step from sigma = 0 (clean data) has no kernel; the schedule's last step is the "
                        "one to sigma = 0, so step only through scheduler.timesteps")
    pred_original_sample = sample - sigma * model_output
    if scheduler.config.stochastic_sampling:
        return StepKernel(mean=(1 - sigma_next) * pred_original_sample, variance=sigma_next**2,
                          pred_original_sample=pred_original_sample)
    pred_noise = sample + (1 - sigma) * model_output
    dt = sigma_next - sigma
    first_next = _on_device(scheduler.sigmas, sample.device, compute)[1]
    noise_scale_squared = noise_level**2 * sigma / (1 - torch.where(sigma == 1, first_next, sigma))
    mean = sample + (model_output + noise_scale_squared / (2 * sigma) * pred_noise) * dt
    return StepKernel(mean=mean, variance=noise_scale_squared * -dt, pred_original_sample=pred_original_sample)


def step_kernel(
    scheduler: DDPMScheduler | DDIMScheduler | FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: int | float | torch.Tensor,
    sample: torch.Tensor,
    eta: float | None = None,
    use_clipped_model_output: bool = False,
    flow_noise_level: float | None = None,
) -> StepKernel:
    """The Gaussian kernel that ``scheduler.step(model_output, timestep, sample, ...)`` samples from.

    ``mean + std * noise`` equals ``scheduler.step(...).prev_sample`` when the scheduler draws the same
    ``noise``. ``eta`` is DDIM's stochasticity (default 0, as in diffusers: a deterministic step); DDPM takes
    no eta. For learned variances the model output carries the variance channels after the prediction, as
    diffusers expects.

    For a ``FlowMatchEulerDiscreteScheduler`` the model output is the velocity. Its ``step`` is the
    deterministic Euler step, so the kernel is instead Flow-GRPO's SDE step with noise level
    ``flow_noise_level`` (a, default 0.7 as in Flow-GRPO), the one ``sde_step_with_logprob`` samples from; with
    ``stochastic_sampling=True`` in the scheduler's config it is diffusers' own stochastic step, which takes
    no noise level. The formulas are in :func:`_flow_step_kernel`.
    """
    _check_scheduler(scheduler)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if eta is not None or use_clipped_model_output:
            raise UserError("eta and use_clipped_model_output are DDIM settings; a flow step's noise is set by "
                            "flow_noise_level (Flow-GRPO's SDE) or the scheduler's stochastic_sampling")
        if scheduler.config.stochastic_sampling and flow_noise_level is not None:
            raise UserError(f"flow_noise_level={flow_noise_level} sets Flow-GRPO's SDE step, but the scheduler has "
                            "stochastic_sampling=True (its own step, whose noise is fixed); drop one of the two")
        noise_level = DEFAULT_FLOW_NOISE_LEVEL if flow_noise_level is None else flow_noise_level
        if not (noise_level >= 0 and math.isfinite(noise_level)):
            raise UserError(f"flow_noise_level must be a finite number >= 0 (Flow-GRPO uses 0.7), got {noise_level}")
        return _flow_step_kernel(scheduler, model_output, timestep, sample, noise_level)
    if flow_noise_level is not None:
        raise UserError(f"flow_noise_level={flow_noise_level} is a setting of flow schedulers; "
                        f"{type(scheduler).__name__} takes eta (DDIM) or nothing (DDPM)")
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if not is_ddim and eta not in (None, 1.0):
        raise UserError(f"eta={eta} is a DDIM setting; DDPMScheduler steps are always fully stochastic (eta=1)")
    if is_ddim and eta is None:
        eta = 0.0
    if is_ddim and not (eta >= 0 and math.isfinite(eta)):
        raise UserError(f"eta must be a finite number >= 0, got {eta}")

    # at least float32: in half precision 1 - alpha_bar rounds to 0 near the data and the variance vanishes
    compute = torch.promote_types(sample.dtype, torch.float32)
    sample, model_output = sample.to(compute), model_output.to(compute)
    timesteps = _as_timesteps(timestep, sample.device)
    prev_timesteps = previous_timestep(scheduler, timesteps)
    alphas_cumprod = _on_device(scheduler.alphas_cumprod, sample.device, sample.dtype)
    final_alpha = torch.full((), float(scheduler.final_alpha_cumprod) if is_ddim else 1.0, device=sample.device,
                             dtype=sample.dtype)
    alpha_prod_t = _per_row(alphas_cumprod[timesteps], sample)
    alpha_prod_t_prev = _per_row(
        torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final_alpha), sample
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    predicted_variance = None
    if learns_variance(scheduler):
        if model_output.shape[1] != 2 * sample.shape[1]:
            raise UserError(
                f"variance_type {scheduler.config.variance_type!r} needs a model output with {2 * sample.shape[1]} "
                f"channels (prediction, then variance), got {model_output.shape[1]}"
            )
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    else:
        pred_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    if scheduler.config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-limit, limit)

    # the posterior variance of q(x_{t-1} | x_t, x_0), shared by DDPM's fixed_small and DDIM
    posterior_variance = beta_prod_t_prev / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    if is_ddim:
        variance = eta**2 * posterior_variance
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
        mean = alpha_prod_t_prev.sqrt() * pred_original_sample + (1 - alpha_prod_t_prev - variance).sqrt() * pred_epsilon
    else:
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        mean = (
            alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t * pred_original_sample
            + current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t * sample
        )
        small = posterior_variance.clamp(min=1e-20)
        variance_type = scheduler.config.variance_type
        if variance_type in ("fixed_small", "fixed_small_log"):
            variance = small
        elif variance_type == "fixed_large":
            variance = current_beta_t
        elif variance_type == "learned":
            variance = predicted_variance
        else:  # learned_range: interpolate the log-variance between the two fixed choices
            fraction = (predicted_variance + 1) / 2
            variance = torch.exp(fraction * current_beta_t.log() + (1 - fraction) * small.log())
        stochastic = _per_row(_ddpm_step_is_stochastic(scheduler, timesteps, prev_timesteps), sample)
        variance = torch.where(stochastic, variance, torch.zeros_like(variance))
    return StepKernel(mean=mean, variance=variance, pred_original_sample=pred_original_sample)


def _ddpm_step_is_stochastic(scheduler: DDPMScheduler, timesteps: torch.Tensor,
                             prev_timesteps: torch.Tensor) -> torch.Tensor:
    """Whether DDPM's step from each timestep has a variance, elementwise.

    diffusers adds no noise at timestep 0. The step into x_0 (the previous timestep before the schedule: cumulative
    alpha 1) has a posterior variance of exactly 0, which diffusers clamps to 1e-20 to take its log and then samples
    from: a point mass in all but name, as is ``learned_range``'s interpolation from it, whose KL to any moved kernel
    is unbounded. msdda takes the exact 0 for the variances built on the posterior's: that step is deterministic, as
    improved DDPM's last step is. ``fixed_large`` and ``learned`` do not use it and keep their variance there.
    """
    stochastic = timesteps > 0
    if scheduler.config.variance_type in ("fixed_small", "fixed_small_log", "learned_range"):
        stochastic = stochastic & (prev_timesteps >= 0)
    return stochastic


def check_learned_variances(scheduler: DDPMScheduler | DDIMScheduler, kernels: Sequence[StepKernel],
                            names: Sequence[str], timestep: int | torch.Tensor) -> None:
    """Refuse kernels whose learned variance is NaN, infinite, zero or negative where the step is stochastic.

    A broken adapter (weights gone to NaN in a diverged run, variance channels far out of range) would
    otherwise sample NaN images, or noiseless steps, without a word. ``names`` name the kernels in the message
    (e.g. ``"adapter 'aesthetic'"``). The scheduler's own variances are valid by construction and cost nothing
    here; for a learned variance the check is one reduction per kernel and ONE host read for all of them, so a
    caller that checks every step's kernels together waits for the GPU once per step; the details of a failure
    are read only when there is one.
    """
    if not learns_variance(scheduler) or not kernels:
        return
    timesteps = _as_timesteps(timestep, kernels[0].variance.device)
    stochastic = _per_row(_ddpm_step_is_stochastic(scheduler, timesteps, previous_timestep(scheduler, timesteps)),
                          kernels[0].mean)
    broken = [~torch.isfinite(kernel.variance) | ((kernel.variance <= 0) & stochastic) for kernel in kernels]
    for name, kernel, bad, failed in zip(names, kernels, broken, torch.stack([b.any() for b in broken]).tolist()):
        if failed:
            variance = kernel.variance
            where = timesteps.tolist() if timesteps.ndim else int(timesteps)
            raise UserError(
                f"{name} predicts a variance that is not a positive finite number at timestep {where}: "
                f"{int(bad.sum())} of {variance.numel()} elements ({int(variance.isnan().sum())} NaN, "
                f"{int(variance.isinf().sum())} infinite, {int((variance <= 0).sum())} zero or negative). Its weights "
                "are broken (e.g. a training run that diverged) or its variance channels are far out of range: "
                "retrain it, or use an earlier checkpoint of it")


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return values
    dims = tuple(range(1, values.ndim))
    if reduction == "sum":
        return values.sum(dim=dims) if dims else values
    if reduction == "mean":
        return values.mean(dim=dims) if dims else values
    raise UserError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def _check_positive_variance(variance: torch.Tensor, what: str) -> None:
    if bool((variance <= 0).any()):
        raise UserError(
            f"{what} has zero variance: the step is deterministic (DDIM eta=0 or the final DDPM step) and has no "
            "density; sample with eta > 0, or leave deterministic steps out of log-probs and KLs"
        )


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor | float, reduction: Reduction = "sum"
) -> torch.Tensor:
    """log N(x; mean, variance) per element, reduced over all but the batch dimension."""
    variance = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device)
    _check_positive_variance(variance, "the kernel")
    log_density = -0.5 * ((x - mean) ** 2 / variance + variance.log() + math.log(2 * math.pi))
    return _reduce(log_density.expand(torch.broadcast_shapes(x.shape, mean.shape, variance.shape)), reduction)


def gaussian_kl(
    mean_p: torch.Tensor,
    variance_p: torch.Tensor | float,
    mean_q: torch.Tensor,
    variance_q: torch.Tensor | float,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """KL(N(mean_p, variance_p) || N(mean_q, variance_q)), exact, per element then reduced over non-batch dims.

    With equal variances this is ||mean_p - mean_q||^2 / (2 variance), the DPOK step penalty.
    """
    variance_p = torch.as_tensor(variance_p, dtype=mean_p.dtype, device=mean_p.device)
    variance_q = torch.as_tensor(variance_q, dtype=mean_p.dtype, device=mean_p.device)
    _check_positive_variance(variance_p, "the first kernel")
    _check_positive_variance(variance_q, "the second kernel")
    ratio = variance_p / variance_q
    kl = 0.5 * (ratio - 1 - ratio.log() + (mean_p - mean_q) ** 2 / variance_q)
    shape = torch.broadcast_shapes(mean_p.shape, mean_q.shape, variance_p.shape, variance_q.shape)
    return _reduce(kl.expand(shape), reduction)


def kernel_kl(p: StepKernel, q: StepKernel, reduction: Reduction = "sum") -> torch.Tensor:
    """KL(p || q) between two step kernels, each with its own variance (exact for learned variances too)."""
    return gaussian_kl(p.mean, p.variance, q.mean, q.variance, reduction=reduction)


def standard_normal(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A standard normal draw on ``like``'s device, in at least float32. It is drawn in ``like``'s dtype (the
    pipeline's), as diffusers draws its noise, so the values match diffusers' in every precision; the chain itself
    stays in float32 (float64 for a float64 chain)."""
    chain = torch.promote_types(like.dtype, torch.float32)
    # non_blocking: a blocking copy would make the CPU wait for all queued GPU work at every step
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(chain).to(like.device, non_blocking=True)


def initial_latents(scheduler: DDPMScheduler | DDIMScheduler | FlowMatchEulerDiscreteScheduler, shape: tuple[int, ...],
                    generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """x_T as diffusers' pipelines draw it: for DDPM/DDIM (StableDiffusionPipeline) a standard normal scaled by
    ``init_noise_sigma``; for a flow scheduler, which has none, x_1 ~ N(0, I) unscaled, as
    StableDiffusion3Pipeline.prepare_latents draws it (sigma = 1 is pure noise).

    ``like`` (e.g. the prompt embeddings) gives the device and the dtype the noise is drawn in.
    """
    noise = standard_normal(shape, generator, like)
    return noise if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else noise * scheduler.init_noise_sigma
