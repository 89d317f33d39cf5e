"""Stable Diffusion 3 and 3.5, and the embedded ``world-flow``: ``StableDiffusion3Pipeline``, an MMDiT transformer
predicting a flow velocity, with classifier-free guidance over the negative prompt's conditioning. Its joint text
sequence and pooled CLIP projection travel packed into one tensor (msdda.models.conditioning)."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from msdda.models.base import register_family
from msdda.models.conditioning import pack_conditioning, unpack_conditioning
from msdda.models.flow import FlowMatching
from msdda.models.sd import image_sides

__all__ = ["StableDiffusion3"]


class StableDiffusion3(FlowMatching):
    pipeline_class: ClassVar[type] = StableDiffusion3Pipeline
    denoiser_class: ClassVar[type] = SD3Transformer2DModel
    fusing_class_name: ClassVar[str] = "MSDDA3Pipeline"
    fusing_doc: ClassVar[str] = """Stable Diffusion 3 with K reward LoRAs on its transformer, fused per step with
    MSDDA on Flow-GRPO's SDE kernels (the adapters' own noise level and shift), SD3's classifier-free guidance per
    adapter."""

    def latent_shape(self, pipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        transformer, scale = pipeline.transformer, pipeline.vae_scale_factor
        return (batch, transformer.config.in_channels,
                *image_sides(pipeline, height, width, transformer.config.sample_size * scale, scale))

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The joint sequences with the pooled projections packed in; a pipeline without T5 (the flow world) gets
        ``max_sequence_length`` 0 unless one is given (diffusers' default would append 256 rows of zeros)."""
        if pipeline.text_encoder_3 is None and not tokens:
            tokens = {"max_sequence_length": 0}
        positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=True, negative_prompt=negative_prompt,
            **tokens)
        return pack_conditioning(positive, pooled), pack_conditioning(negative, negative_pooled)

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        """As StableDiffusion3Pipeline calls its transformer: keywords, the pooled projection split off the packed
        conditioning, one timestep per row."""
        sequence, pooled = unpack_conditioning(conditioning, inner.config.pooled_projection_dim)
        return model(hidden_states=sample, timestep=self.timesteps_per_row(timestep, sample),
                     encoder_hidden_states=sequence, pooled_projections=pooled).sample

    def stock_sampler_arguments(self, pipeline, eta: float) -> dict:
        """None (the stock pipeline samples with its Euler ODE step), but ``max_sequence_length=0`` where it has no
        T5, as msdda encodes its prompts."""
        return {} if pipeline.text_encoder_3 is not None else {"max_sequence_length": 0}


register_family(StableDiffusion3())
