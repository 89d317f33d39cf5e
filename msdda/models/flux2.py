"""FLUX.2 [dev]: ``Flux2Pipeline``, an MMDiT transformer on the VAE's latents patchified 2x2 (four times the
channels, half the sides) and normalised by the VAE's batch-norm statistics, conditioned on three hidden layers of a
Mistral Small 3 language model, with distilled guidance and Flux2Pipeline's own sigmas shifted by an empirical mu of
the image's size and the number of steps.

msdda's latents are the patchified ones (``[B, 4C, H/2, W/2]``): Flux2Pipeline draws its noise in that space and
steps there, so the SDE, the stored trajectories and the KL do too; the forward flattens them into the token
sequence and back, and decoding undoes the normalisation and the patching. The text sequence is padded to
``max_sequence_length`` tokens by the tokenizer, as the pipeline pads it, and the distilled guidance scale travels as
one value packed after it (msdda.models.conditioning), as FLUX.1-dev's does; there is no negative branch.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

from msdda.errors import UserError
from msdda.models.base import register_family
from msdda.models.conditioning import pack_conditioning, unpack_conditioning
from msdda.models.flow import FlowMatching
from msdda.models.sd import image_sides

__all__ = ["Flux2"]


class Flux2(FlowMatching):
    pipeline_class: ClassVar[type] = Flux2Pipeline
    denoiser_class: ClassVar[type] = Flux2Transformer2DModel
    dynamic_shift: ClassVar[bool] = True
    default_guidance_scale: ClassVar[float] = 4.0
    fusing_class_name: ClassVar[str] = "MSDDAFlux2Pipeline"
    fusing_doc: ClassVar[str] = """FLUX.2 [dev] with K reward LoRAs on its transformer, fused per step with MSDDA on
    Flow-GRPO's SDE kernels over Flux2Pipeline's own schedule (the empirical shift of the adapters' resolution and
    steps). The distilled guidance is an input of every adapter's forward (no negative rows)."""

    def latent_shape(self, pipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        """The patchified latents Flux2Pipeline draws: the transformer's input channels (four times the VAE's) at
        half the VAE latents' sides, which must be whole, so the image's sides are multiples of twice the VAE's scale
        factor (refused otherwise, where the pipeline rounds down). The default is the pipeline's 1024 px."""
        scale = pipeline.vae_scale_factor
        sides = image_sides(pipeline, height, width, pipeline.default_sample_size * scale, 2 * scale)
        return (batch, pipeline.transformer.config.in_channels, *(side // 2 for side in sides))

    def dynamic_shift_mu(self, pipeline, shape: tuple[int, ...], num_inference_steps: int) -> float | None:
        """mu as Flux2Pipeline computes it (``compute_empirical_mu``) from the image's sequence length (the
        patchified latents' pixels) and the number of steps; None where the scheduler's shift is fixed."""
        if not pipeline.scheduler.config.use_dynamic_shifting:
            return None
        return compute_empirical_mu(image_seq_len=shape[-2] * shape[-1], num_steps=num_inference_steps)

    def set_timesteps(self, pipeline, num_inference_steps: int, device: torch.device, shape: tuple[int, ...]) -> None:
        """Flux2Pipeline's own sigmas (1 to 1/N, evenly) and its empirical shift mu."""
        scheduler = pipeline.scheduler
        steps = num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=self.dynamic_shift_mu(pipeline, shape, steps))

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's own ``encode_prompt`` (``max_sequence_length`` tokens, its default 512) with the guidance
        scale packed after it; no negative conditioning. The text position ids it also returns follow from the
        sequence's length and are rebuilt in the forward."""
        if negative_prompt is not None:
            raise UserError(f"negative_prompt={negative_prompt!r}: FLUX.2 [dev] is sampled without a negative branch "
                            "(its guidance is distilled into the transformer); leave negative_prompt unset")
        if guidance_scale is None:
            raise UserError("Flux2Pipeline passes its transformer a guidance scale: pass guidance_scale (its "
                            "default is 4.0)")
        sequence, _ = pipeline.encode_prompt(prompts, device=device, **tokens)
        guidance = sequence.new_full((len(sequence), 1), float(guidance_scale))
        return pack_conditioning(sequence, guidance), None

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        """As Flux2Pipeline.__call__ calls its transformer: the patchified latents flattened into tokens with their
        position ids, the text's position ids, the timestep divided by 1000 in the latents' dtype, the guidance scale
        in float32 from the packed conditioning; the output scattered back to ``[B, C, H, W]`` by the ids."""
        sequence, guidance = unpack_conditioning(conditioning, 1)
        image_ids = Flux2Pipeline._prepare_latent_ids(sample).to(sample.device)
        text_ids = Flux2Pipeline._prepare_text_ids(sequence).to(sample.device)
        timesteps = self.timesteps_per_row(timestep, sample)
        output = model(hidden_states=Flux2Pipeline._pack_latents(sample), timestep=timesteps.to(sample.dtype) / 1000,
                       guidance=guidance[:, 0].float(), encoder_hidden_states=sequence, txt_ids=text_ids,
                       img_ids=image_ids, return_dict=False)[0]
        return Flux2Pipeline._unpack_latents_with_ids(output, image_ids)

    def decode(self, pipeline, latents: torch.Tensor, grad: bool) -> torch.Tensor:
        """As Flux2Pipeline decodes: the VAE's batch-norm statistics put back, the 2x2 patches undone, decoded."""
        vae = pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            unpatched = Flux2Pipeline._unpatchify_latents(latents * std + mean)
            images = vae.decode(unpatched.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


register_family(Flux2())
