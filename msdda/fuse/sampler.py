"""The multi-adapter sampler: any registered fusion method (msdda.fuse.methods) through the one denoising loop.

Per step, every adapter a method needs (and the reference, when its exponent is not 0) is evaluated in ONE
batched UNet forward: the rows of the batch are routed to their LoRA with PEFT's mixed-adapter batches
(``adapter_names``, ``"__base__"`` for the reference). All methods draw the same initial noise and the same
per-step noise, so comparisons differ only in the method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msdda.diffusion import prepare_sampling
from msdda.fuse.methods import FusionContext, FusionMethod

__all__ = ["sample_latents"]


@torch.no_grad()
def sample_latents(pipeline, method: FusionMethod, context: FusionContext, num_inference_steps: int,
                   latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                   progress: Callable | None = None) -> torch.Tensor:
    """Run ``method`` from x_T (drawn as the stock ``pipeline`` draws it, unless ``latents`` are given; ``height`` x
    ``width`` pixels, None: the pipeline's default) to x_0 and return the x_0 latents. ``single`` with one adapter
    reproduces the stock pipeline with that LoRA loaded, pixel for pixel. ``progress`` wraps the timesteps (e.g. the
    pipeline's ``progress_bar``)."""
    scheduler = context.scheduler
    latents = prepare_sampling(pipeline, num_inference_steps, len(context.positive), context.generator,
                               context.positive, height, width, latents)
    timesteps = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    return method.sample(context, latents, timesteps)
