"""The one denoising loop: rollouts, evaluation and fusion all step through it.

Every caller differs in two things only: how to get this step's Gaussian kernel (the adapter, the reference,
a fused product, a deterministic continuation) and what to keep of the step (log-probs, KLs, states). The
loop owns the rest: the order of the random draws (the kernel first, which may draw, e.g. diffusion-blend's
adapter choice; then the step's noise, as diffusers' StableDiffusionPipeline draws it), and the sample
x_{t-1} = mean + std * noise.

Without a generator the loop is deterministic and steps to the kernel's mean (the ``rollout`` step reward's
reference continuation). The loop adds no ``no_grad``: a caller that needs gradients through the chain (the
pathwise update) gets them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from msdda.errors import UserError
from msdda.kernels import StepKernel, standard_normal

__all__ = ["Step", "KernelFunction", "Recorder", "denoise"]


@dataclass(frozen=True)
class Step:
    """One step of the loop, as a recorder sees it: the kernel at x_t and the x_{t-1} drawn from it."""

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    """x_t."""
    kernel: StepKernel
    noise: torch.Tensor | None
    """The standard normal draw (None on a deterministic loop)."""
    next_latents: torch.Tensor
    """x_{t-1}."""


KernelFunction = Callable[[int, torch.Tensor, torch.Tensor], StepKernel]
"""(step index, timestep, x_t) -> the Gaussian kernel to sample x_{t-1} from."""
Recorder = Callable[[Step], None]
"""Called after every step with what the step computed."""


def denoise(timesteps: Iterable[torch.Tensor], latents: torch.Tensor, kernel_at: KernelFunction,
            generator: torch.Generator | None = None, noise_like: torch.Tensor | None = None,
            record: Recorder | None = None, start_index: int = 0) -> torch.Tensor:
    """Step ``latents`` through ``timesteps`` with the kernels ``kernel_at`` gives; returns the last latents.

    ``generator`` draws each step's noise in ``noise_like``'s dtype on its device (the pipeline's prompt
    embeddings, as diffusers draws it); without one every step goes to its kernel's mean. ``start_index`` is
    the index of the first timestep in the full schedule, for a loop that starts part way (a continuation).
    ``timesteps`` may be a progress bar over the schedule.
    """
    if generator is not None and noise_like is None:
        raise UserError("denoise draws its noise like noise_like (e.g. the prompt embeddings): pass noise_like")
    for index, timestep in enumerate(timesteps, start=start_index):
        kernel = kernel_at(index, timestep, latents)
        if generator is None:
            noise, next_latents = None, kernel.mean
        else:
            noise = standard_normal(latents.shape, generator, noise_like)
            next_latents = kernel.sample(noise=noise)
        if record is not None:
            record(Step(index, timestep, latents, kernel, noise, next_latents))
        latents = next_latents
    return latents
