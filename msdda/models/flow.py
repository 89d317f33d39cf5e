"""What the flow-matching families (SD3, FLUX, Qwen-Image) share: an MMDiT transformer predicting a velocity, stepped
by FlowMatchEulerDiscreteScheduler with Flow-GRPO's SDE (msdda.kernels); and what FLUX and Qwen-Image share beside it:
latents the transformer sees packed into 2x2 patches, and the pipeline's own sigmas shifted by the image's size.

SD3's transformer takes two text tensors, the joint sequence and the pooled CLIP projection; they travel as one
(msdda.models.conditioning), and the family's forward splits them again.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from msdda.errors import UserError
from msdda.kernels import DEFAULT_FLOW_NOISE_LEVEL
from msdda.models.base import ModelFamily
from msdda.models.sd import image_sides

__all__ = ["FlowMatching", "PatchedFlowMatching"]


class FlowMatching(ModelFamily):
    """A flow-matching transformer pipeline; SD3 and FLUX subclass it."""

    denoiser_attribute: ClassVar[str] = "transformer"
    samplers: ClassVar[tuple[str, ...]] = ("flow",)
    noise_setting: ClassVar[str] = "flow_noise_level"
    lora_layers_argument: ClassVar[str] = "transformer_lora_layers"
    saves_lora_config: ClassVar[bool] = True
    dynamic_shift: ClassVar[bool] = False
    """Whether msdda reproduces the pipeline's shift of the schedule by the image size (``use_dynamic_shifting``)."""

    def set_sampler(self, base: str, pipeline, sampler: str) -> None:
        """Keep the pipeline's own FlowMatchEulerDiscreteScheduler (its shift kept), refused where msdda cannot
        reproduce its schedule step by step."""
        scheduler = pipeline.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise UserError(f"base model {base!r} has a {type(scheduler).__name__}; msdda's flow kernels need its "
                            "FlowMatchEulerDiscreteScheduler (the one SD3 and FLUX ship)")
        config = scheduler.config
        if config.use_dynamic_shifting and not self.dynamic_shift:
            raise UserError(f"base model {base!r}'s scheduler shifts its schedule by the image size "
                            f"(use_dynamic_shifting), which msdda reproduces for {self.name} only where the stock "
                            "pipeline shifts by the image size (FLUX, Qwen-Image): use an SD3 base with a fixed "
                            "shift (SD 3 and 3.5 have shift 3.0)")
        if config.stochastic_sampling:
            raise UserError(f"base model {base!r}'s scheduler has stochastic_sampling=True; msdda trains with "
                            "Flow-GRPO's SDE step (sampling.flow_noise_level): save the base with "
                            "stochastic_sampling=False")

    @staticmethod
    def timesteps_per_row(timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
        """One timestep per row (the transformers' timestep embeddings need a ``[B]`` tensor)."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        return timesteps.expand(len(sample)) if timesteps.ndim == 0 else timesteps

    def sampler_metadata(self, pipeline, noise_scale: float | None, shape: tuple[int, ...],
                         num_inference_steps: int) -> dict:
        mu = self.dynamic_shift_mu(pipeline, shape, num_inference_steps)
        return {"eta": None, "flow_noise_level": noise_scale, "flow_mu": mu,
                "flow_shift": float(pipeline.scheduler.config.shift) if mu is None else None}

    def sampler_noise(self, scheduler, eta, flow_noise_level, recorded) -> tuple[float | None, str]:
        if eta is not None:
            raise UserError(f"eta={eta} is DDIM's setting; a flow (SD3, FLUX) sampler's noise is flow_noise_level")
        default = recorded("flow_noise_level", DEFAULT_FLOW_NOISE_LEVEL)
        return (default if flow_noise_level is None else flow_noise_level), "flow_noise_level"


class PatchedFlowMatching(FlowMatching):
    """A flow transformer on latents packed into 2x2 patches, with the stock pipeline's sigmas (1 to 1/N, evenly)
    shifted by the image's sequence length: FLUX.1 and Qwen-Image, whose pipelines compute both alike. Latents stay
    ``[B, C, H, W]`` outside the family's forward, which packs them as its pipeline does."""

    dynamic_shift: ClassVar[bool] = True

    def latent_shape(self, pipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        """The latents must split into 2x2 patches, so the image's sides are multiples of twice the VAE's scale
        factor; a size that does not fit is refused rather than rounded down as the pipelines do (they warn). The
        default is the pipeline's (1024 px)."""
        scale = pipeline.vae_scale_factor
        return (batch, pipeline.transformer.config.in_channels // 4,
                *image_sides(pipeline, height, width, pipeline.default_sample_size * scale, 2 * scale))

    def dynamic_shift_mu(self, pipeline, shape: tuple[int, ...], num_inference_steps: int) -> float | None:
        """mu as the pipeline computes it from the image's sequence length (the number of 2x2 patches) and the
        scheduler's config, whatever the steps; None where the scheduler's shift is fixed (it then ignores mu)."""
        config = pipeline.scheduler.config
        if not config.use_dynamic_shifting:
            return None
        sequence_length = (shape[-2] // 2) * (shape[-1] // 2)
        return float(calculate_shift(sequence_length, config.get("base_image_seq_len", 256),
                                     config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                     config.get("max_shift", 1.15)))

    def set_timesteps(self, pipeline, num_inference_steps: int, device: torch.device, shape: tuple[int, ...]) -> None:
        """The pipeline's own sigmas (1 to 1/N, evenly) and the dynamic shift mu of the image's size."""
        scheduler = pipeline.scheduler
        steps = num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=self.dynamic_shift_mu(pipeline, shape, steps))
