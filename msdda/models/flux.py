"""FLUX.1-dev and schnell: ``FluxPipeline``, an MMDiT transformer on latents packed into 2x2 patches, FluxPipeline's
own sigmas with the dynamic shift of the image's size, and distilled guidance.

FLUX's transformer takes the T5 sequence and the pooled CLIP output, packed into one tensor as SD3's are
(msdda.models.conditioning), and FLUX.1-dev's distilled guidance scale (an input the transformer embeds beside the
pooled text, with no negative branch) travels as one more value after the pooled output: FLUX's negative
conditioning is None, so no caller runs classifier-free guidance on it, and a rollout's stored conditioning replays
the guidance it was sampled with. Latents are ``[B, C, H, W]`` everywhere, as the VAE makes them; the forward packs and unpacks them
as FluxPipeline does, so the kernels, the loop and the stored trajectories do not know about the packing.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from msdda.errors import UserError
from msdda.models.base import register_family
from msdda.models.conditioning import pack_conditioning, unpack_conditioning
from msdda.models.flow import PatchedFlowMatching

__all__ = ["Flux"]


class Flux(PatchedFlowMatching):
    pipeline_class: ClassVar[type] = FluxPipeline
    denoiser_class: ClassVar[type] = FluxTransformer2DModel
    default_guidance_scale: ClassVar[float] = 3.5
    fusing_class_name: ClassVar[str] = "MSDDAFluxPipeline"
    fusing_doc: ClassVar[str] = """FLUX.1 with K reward LoRAs on its transformer, fused per step with MSDDA on
    Flow-GRPO's SDE kernels over FluxPipeline's own schedule (the dynamic shift of the adapters' resolution).
    FLUX.1-dev's distilled guidance is an input of every adapter's forward (no negative rows), so each step is one
    forward of K rows per image."""

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The T5 sequence with the pooled CLIP output and, for FLUX.1-dev, the guidance scale packed after it; no
        negative conditioning. The text position ids FluxPipeline also returns are zeros of the sequence's length,
        rebuilt in the forward."""
        if negative_prompt is not None:
            raise UserError(f"negative_prompt={negative_prompt!r}: FLUX.1 is sampled without a negative branch (its "
                            "guidance is distilled into the transformer), and msdda does not run FluxPipeline's "
                            "optional true CFG; leave negative_prompt unset")
        sequence, pooled, _ = pipeline.encode_prompt(prompts, None, device=device, **tokens)
        if pipeline.transformer.config.guidance_embeds:
            if guidance_scale is None:
                raise UserError("this FLUX transformer embeds its guidance scale (guidance_embeds, as FLUX.1-dev): "
                                "pass guidance_scale (FluxPipeline's default is 3.5)")
            pooled = torch.cat([pooled, pooled.new_full((len(pooled), 1), float(guidance_scale))], dim=1)
        return pack_conditioning(sequence, pooled), None

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        """As FluxPipeline.__call__ calls its transformer: the latents packed into 2x2 patches with their position
        ids, zero text ids, the timestep divided by 1000 in the latents' dtype, the guidance scale (FLUX.1-dev) from
        the packed conditioning; the output unpacked to ``[B, C, H, W]``."""
        config = inner.config
        guided = config.guidance_embeds
        sequence, pooled = unpack_conditioning(conditioning, config.pooled_projection_dim + guided)
        guidance = pooled[:, -1] if guided else None
        pooled = pooled[:, :config.pooled_projection_dim]
        batch, channels, height, width = sample.shape
        packed = FluxPipeline._pack_latents(sample, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, sample.device, sample.dtype)
        text_ids = torch.zeros(sequence.shape[1], 3, device=sample.device, dtype=sequence.dtype)
        timesteps = self.timesteps_per_row(timestep, sample)
        output = model(hidden_states=packed, timestep=timesteps.to(sample.dtype) / 1000, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=sequence, txt_ids=text_ids,
                       img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(output, height, width, 1)  # sizes in latent pixels: a scale factor of 1


register_family(Flux())
