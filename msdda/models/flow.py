"""What the flow-matching families (SD3, FLUX) share: an MMDiT transformer predicting a velocity, stepped by
FlowMatchEulerDiscreteScheduler with Flow-GRPO's SDE (msdda.kernels), and the pooled text output packed into the one
conditioning tensor.

SD3's transformer takes two text tensors, the joint sequence and the pooled CLIP projection; they travel as one
(msdda.models.conditioning), and the family's forward splits them again.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from msdda.errors import UserError
from msdda.kernels import DEFAULT_FLOW_NOISE_LEVEL
from msdda.models.base import ModelFamily

__all__ = ["FlowMatching"]


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
                            "(use_dynamic_shifting), which msdda reproduces for FluxPipeline bases only: use an SD3 "
                            "base with a fixed shift (SD 3 and 3.5 have shift 3.0)")
        if config.stochastic_sampling:
            raise UserError(f"base model {base!r}'s scheduler has stochastic_sampling=True; msdda trains with "
                            "Flow-GRPO's SDE step (sampling.flow_noise_level): save the base with "
                            "stochastic_sampling=False")

    @staticmethod
    def timesteps_per_row(timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
        """One timestep per row (the transformers' timestep embeddings need a ``[B]`` tensor)."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        return timesteps.expand(len(sample)) if timesteps.ndim == 0 else timesteps

    def sampler_metadata(self, pipeline, noise_scale: float | None, shape: tuple[int, ...]) -> dict:
        mu = self.dynamic_shift_mu(pipeline, shape)
        return {"eta": None, "flow_noise_level": noise_scale, "flow_mu": mu,
                "flow_shift": float(pipeline.scheduler.config.shift) if mu is None else None}

    def sampler_noise(self, scheduler, eta, flow_noise_level, recorded) -> tuple[float | None, str]:
        if eta is not None:
            raise UserError(f"eta={eta} is DDIM's setting; a flow (SD3, FLUX) sampler's noise is flow_noise_level")
        default = recorded("flow_noise_level", DEFAULT_FLOW_NOISE_LEVEL)
        return (default if flow_noise_level is None else flow_noise_level), "flow_noise_level"
