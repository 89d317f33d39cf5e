"""The multi-adapter sampler: any registered fusion method (msdda.fuse.methods) through the one denoising loop.

Per step, every adapter a method needs (and the reference, when its exponent is not 0) is evaluated in ONE
batched UNet forward: the rows of the batch are routed to their LoRA with PEFT's mixed-adapter batches
(``adapter_names``, ``"__base__"`` for the reference). All methods draw the same initial noise and the same
per-step noise, so comparisons differ only in the method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msdda.fuse.methods import FusionContext, FusionMethod
from msdda.kernels import initial_latents

__all__ = ["sample_latents"]


@torch.no_grad()
def sample_latents(method: FusionMethod, context: FusionContext, num_inference_steps: int,
                   latents: torch.Tensor | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Run ``method`` from x_T (drawn as diffusers' StableDiffusionPipeline draws it, unless ``latents`` are
    given) to x_0 and return the x_0 latents. ``single`` with one adapter reproduces the stock pipeline with that
    LoRA loaded, pixel for pixel. ``progress`` wraps the timesteps (e.g. the pipeline's ``progress_bar``)."""
    scheduler, unet, positive = context.scheduler, context.unet, context.positive
    scheduler.set_timesteps(num_inference_steps, device=positive.device)
    if latents is None:
        shape = (len(positive), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = initial_latents(scheduler, shape, context.generator, positive)
    timesteps = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    return method.sample(context, latents, timesteps)
