"""The multi-adapter sampler: MSDDA and the retraining-free baselines behind one denoising loop.

Per step, every adapter that enters (and the reference, when its exponent is not 0) is evaluated in ONE
batched UNet forward: the rows of the batch are routed to their LoRA with PEFT's mixed-adapter batches
(``adapter_names``, ``"__base__"`` for the reference). Guidance is applied per adapter, each adapter's
Gaussian kernel comes from msdda.kernels, and msdda.fuse.fuse_gaussians gives the fused kernel we sample
from. The baselines (``base``, ``single``, ``soup``, ``output-average``, ``diffusion-blend``, ``code``)
run through the same loop with the same noise draws, so comparisons differ only in the method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from msdda.diffusion import BASE, adapter_kernels, standard_normal
from msdda.fuse.closed_form import fuse_gaussians, reference_exponent
from msdda.kernels import StepKernel

__all__ = ["METHODS", "FusionPlan", "sample_latents"]

METHODS = ("msdda", "base", "single", "soup", "output-average", "diffusion-blend", "code")


@dataclass(frozen=True)
class FusionPlan:
    """What one sampling run computes per step: which adapters enter, with which exponents."""

    method: str
    adapter_names: list[str]
    weights: list[float]
    exponents: list[float]
    guidance_scale: float
    eta: float | None
    code_candidates: int = 20
    code_block: int = 5
    reward: Callable | None = None
    decode: Callable | None = None

    @property
    def reference_exponent(self) -> float:
        return reference_exponent(self.exponents) if self.method == "msdda" else 0.0


def _fused_step(unet, scheduler, latents, timestep, positive, negative, plan: FusionPlan, step_index: int,
                generator: torch.Generator) -> StepKernel:
    method = plan.method
    if method in ("base", "soup", "single"):
        names = {"base": [BASE], "soup": None,
                 "single": [plan.adapter_names[int(torch.tensor(plan.weights).argmax())]]}[method]
        return adapter_kernels(unet, scheduler, latents, timestep, positive, negative, names, plan.guidance_scale,
                        plan.eta)[0]
    if method == "diffusion-blend":
        choice = int(torch.multinomial(torch.tensor(plan.weights, dtype=torch.float64), 1, generator=generator))
        return adapter_kernels(unet, scheduler, latents, timestep, positive, negative, [plan.adapter_names[choice]],
                        plan.guidance_scale, plan.eta)[0]
    entering = [(name, exponent) for name, exponent in zip(plan.adapter_names, plan.exponents) if exponent > 0]
    ref_exponent = plan.reference_exponent
    names = [name for name, _ in entering] + ([BASE] if ref_exponent else [])
    kernels = adapter_kernels(unet, scheduler, latents, timestep, positive, negative, names, plan.guidance_scale, plan.eta)
    if len(entering) == 1 and not ref_exponent:  # one adapter with exponent 1: its own kernel, bit for bit
        return kernels[0]
    entering_kernels = kernels[: len(entering)]
    if method == "output-average":
        # DB-MPA averages the guided model outputs: the means (linear in the output) and, for a learned_range
        # variance (linear in log-variance), the log-variances
        shares = [w / sum(plan.weights) for _, w in entering]
        mean = sum(share * k.mean for share, k in zip(shares, entering_kernels))
        variance = torch.exp(sum(share * k.variance.log() for share, k in zip(shares, entering_kernels)))
        return StepKernel(mean=mean, variance=variance, pred_original_sample=entering_kernels[0].pred_original_sample)
    reference = kernels[-1] if ref_exponent else None
    mean, variance = fuse_gaussians([k.mean for k in entering_kernels], [k.variance for k in entering_kernels],
                                    [exponent for _, exponent in entering],
                                    ref_mean=reference.mean if reference else None,
                                    ref_variance=reference.variance if reference else None)
    return StepKernel(mean=mean, variance=variance, pred_original_sample=entering_kernels[0].pred_original_sample)


@torch.no_grad()
def sample_latents(unet, scheduler, positive: torch.Tensor, negative: torch.Tensor | None, plan: FusionPlan,
                   num_inference_steps: int, generator: torch.Generator, latents: torch.Tensor | None = None,
                   prompts: Sequence[str] | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Run the denoising loop with ``plan`` and return x_0 latents.

    Noise is drawn as diffusers' StableDiffusionPipeline draws it (initial latents, then one draw per step), so
    ``single`` with one adapter reproduces the stock pipeline with that LoRA loaded, pixel for pixel.
    """
    scheduler.set_timesteps(num_inference_steps, device=positive.device)
    if latents is None:
        shape = (len(positive), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = standard_normal(shape, generator, positive)
        latents = latents * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    steps = enumerate(timesteps) if progress is None else progress(list(enumerate(timesteps)))
    for index, timestep in steps:
        if plan.method == "code" and index % plan.code_block == 0:
            latents = _code_block(unet, scheduler, latents, timesteps[index:index + plan.code_block], positive,
                                  negative, plan, generator, prompts)
            continue
        if plan.method == "code":
            continue
        kernel = _fused_step(unet, scheduler, latents, timestep, positive, negative, plan, index, generator)
        noise = standard_normal(latents.shape, generator, positive)
        latents = kernel.mean + kernel.std * noise
    return latents


def _code_block(unet, scheduler, latents, block_timesteps, positive, negative, plan: FusionPlan, generator,
                prompts) -> torch.Tensor:
    """CoDe: draw N candidate continuations of B base steps, keep the one whose x0 estimate scores best.

    The score is the weighted reward sum_i w_i r_i of the one-step clean estimate at the block's end.
    """
    if plan.reward is None or plan.decode is None or prompts is None:
        raise ValueError("method 'code' needs the rewards while sampling: pass rewards for every adapter")
    batch, candidates = len(latents), plan.code_candidates
    states = latents.repeat_interleave(candidates, dim=0)
    positive_n = positive.repeat_interleave(candidates, dim=0)
    negative_n = negative.repeat_interleave(candidates, dim=0) if negative is not None else None
    kernel = None
    for timestep in block_timesteps:
        kernel = adapter_kernels(unet, scheduler, states, timestep, positive_n, negative_n, [BASE], plan.guidance_scale,
                          plan.eta)[0]
        noise = standard_normal(states.shape, generator, positive)
        states = kernel.mean + kernel.std * noise
    estimate_timestep = block_timesteps[-1]
    final_block = int(estimate_timestep) == int(scheduler.timesteps[-1])
    if final_block:
        clean = states
    else:
        next_index = (scheduler.timesteps == estimate_timestep).nonzero()[0, 0] + 1
        clean = adapter_kernels(unet, scheduler, states, scheduler.timesteps[next_index], positive_n, negative_n, [BASE],
                         plan.guidance_scale, plan.eta)[0].pred_original_sample
    scores = plan.reward(plan.decode(clean), [p for p in prompts for _ in range(candidates)])
    best = scores.reshape(batch, candidates).argmax(dim=1)
    return states.reshape(batch, candidates, *states.shape[1:])[torch.arange(batch), best]
