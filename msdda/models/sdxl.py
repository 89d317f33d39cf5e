"""Stable Diffusion XL: ``StableDiffusionXLPipeline``, a UNet conditioned on the two text encoders' joint sequence
and, through its added embeddings, on the second encoder's pooled projection and six "time ids" (the image's
original size, crop corner and target size), stepped by DDIM or DDPM with classifier-free guidance.

The pooled projection and the time ids travel packed after the sequence in the one conditioning tensor, as SD3's
pooled projection does (msdda.models.conditioning), and the forward hands them to the UNet as
``added_cond_kwargs``, as the stock ``__call__`` does. The time ids are the stock defaults for an image of the
sampled size: original and target size that size, crop corner (0, 0).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from msdda.errors import UserError
from msdda.models.base import register_family
from msdda.models.conditioning import pack_conditioning, unpack_conditioning
from msdda.models.sd import StableDiffusion

__all__ = ["StableDiffusionXL"]

TIME_IDS = 6
"""original (height, width), crop (top, left), target (height, width)."""


class StableDiffusionXL(StableDiffusion):
    pipeline_class: ClassVar[type] = StableDiffusionXLPipeline
    loading_kwargs: ClassVar[dict] = {}
    saves_lora_config: ClassVar[bool] = True
    default_guidance_scale: ClassVar[float] = 5.0
    fusing_class_name: ClassVar[str] = "MSDDAXLPipeline"
    fusing_doc: ClassVar[str] = """Stable Diffusion XL with K reward LoRAs on its UNet, fused per step with MSDDA
    (classifier-free guidance per adapter, the pooled text and time ids of every row as the stock pipeline makes
    them)."""

    def claims_denoiser(self, inner: torch.nn.Module) -> bool:
        """A UNet with SDXL's added text-and-time embedding."""
        return isinstance(inner, UNet2DConditionModel) and inner.config.addition_embed_type == "text_time"

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both encoders' joint sequence, with the pooled projection and the time ids of ``size`` packed after it;
        the negative's pooled projection is zeros for an empty negative prompt, as the stock pipeline's
        ``force_zeros_for_empty_prompt`` makes it."""
        if tokens:
            raise UserError(f"max_sequence_length={tokens['max_sequence_length']} sets the T5 token count of SD3 and "
                            "FLUX; SDXL encodes its CLIP tokenizers' 77 tokens: leave it unset")
        positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompts, None, device, 1, True, negative_prompt)
        default = pipeline.default_sample_size * pipeline.vae_scale_factor
        height, width = (default if side is None else int(side) for side in size or (None, None))
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=positive.dtype, device=device)
        time_ids = time_ids.expand(len(prompts), TIME_IDS)
        return (pack_conditioning(positive, torch.cat([pooled, time_ids], dim=1)),
                pack_conditioning(negative, torch.cat([negative_pooled, time_ids], dim=1)))

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        """As the stock ``__call__`` calls its UNet: the sequence as ``encoder_hidden_states``, the pooled projection
        and the time ids as ``added_cond_kwargs``."""
        config = inner.config
        pooled_dim = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim * TIME_IDS
        sequence, extra = unpack_conditioning(conditioning, pooled_dim + TIME_IDS)
        added = {"text_embeds": extra[:, :pooled_dim], "time_ids": extra[:, pooled_dim:]}
        return model(sample, timestep, encoder_hidden_states=sequence, added_cond_kwargs=added).sample


register_family(StableDiffusionXL())
