"""Qwen-Image: ``QwenImagePipeline``, an MMDiT transformer on latents packed into 2x2 patches, conditioned on the last
hidden states of a Qwen2.5-VL language model, with true classifier-free guidance (the guided velocity rescaled to the
conditional one's norm per patch) and the pipeline's own sigmas shifted by the image's size.

The conditioning is the text sequence alone: QwenImagePipeline drops the prompt template's system part, keeps each
prompt's own tokens and pads the batch with rows of zeros that its attention mask hides. msdda pads every prompt to
``max_sequence_length`` rows (the stock ``__call__``'s 512 unless given), so that the conditionings of different
batches and of the negative branch stack, and the forward rebuilds the mask from the zero rows (a hidden state of
the language model is never exactly zero); with the mask, padding does not change the transformer's output. Latents
are ``[B, C, H, W]`` everywhere (the VAE's frame axis of one image dropped); the forward packs them as the pipeline
does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from msdda.errors import UserError
from msdda.models.base import register_family
from msdda.models.flow import PatchedFlowMatching

__all__ = ["QwenImage"]

DEFAULT_NEGATIVE_PROMPT = " "
"""The negative prompt where none is given: Qwen-Image's model card and Flow-GRPO's Qwen-Image training sample with
``negative_prompt=" "`` (QwenImagePipeline runs no guidance without one)."""


class QwenImage(PatchedFlowMatching):
    pipeline_class: ClassVar[type] = QwenImagePipeline
    denoiser_class: ClassVar[type] = QwenImageTransformer2DModel
    default_guidance_scale: ClassVar[float] = 4.0
    fusing_class_name: ClassVar[str] = "MSDDAQwenImagePipeline"
    fusing_doc: ClassVar[str] = """Qwen-Image with K reward LoRAs on its transformer, fused per step with MSDDA on
    Flow-GRPO's SDE kernels over QwenImagePipeline's own schedule (the dynamic shift of the adapters' resolution),
    Qwen-Image's true classifier-free guidance per adapter."""

    def enable_vae_gradient_checkpointing(self, pipeline) -> None:
        """None: diffusers' AutoencoderKLQwenImage has no gradient checkpointing, so the pathwise estimator keeps the
        decoder's activations (docs/training.md#qwen-image counts them)."""

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's own ``encode_prompt`` for the prompts and the negative prompt (``" "`` unless given), each
        zero-padded to ``max_sequence_length`` rows (the stock ``__call__``'s 512 unless given; prompts longer are
        cut there, as the pipeline cuts them)."""
        length = tokens.get("max_sequence_length", 512)
        if not 0 < length <= pipeline.tokenizer_max_length:
            raise UserError(f"max_sequence_length={length}: QwenImagePipeline encodes 1 to "
                            f"{pipeline.tokenizer_max_length} prompt tokens (its default 512)")
        if pipeline.transformer.config.guidance_embeds:
            raise UserError("this Qwen-Image transformer embeds a guidance scale (guidance_embeds); msdda runs "
                            "Qwen-Image with true classifier-free guidance only, as Qwen-Image ships")
        negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        return tuple(self._padded_sequence(pipeline, texts, device, length) for texts in (prompts, negatives))

    @staticmethod
    def _padded_sequence(pipeline, texts: list[str], device: torch.device, length: int) -> torch.Tensor:
        sequence, _ = pipeline.encode_prompt(texts, device=device, max_sequence_length=length)  # padded with zeros
        return torch.nn.functional.pad(sequence, (0, 0, 0, length - sequence.shape[1]))

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        """As QwenImagePipeline.__call__ calls its transformer: the latents packed into 2x2 patches with their shape
        for the rotary embedding, the text mask (None where no row is padded, as the pipeline passes it), the
        timestep divided by 1000 in the latents' dtype, no guidance embedding; the output unpacked to
        ``[B, C, H, W]``."""
        batch, channels, height, width = sample.shape
        packed = QwenImagePipeline._pack_latents(sample, batch, channels, height, width)
        mask = (conditioning != 0).any(dim=-1)
        timesteps = self.timesteps_per_row(timestep, sample)
        output = model(hidden_states=packed, timestep=timesteps.to(sample.dtype) / 1000, guidance=None,
                       encoder_hidden_states_mask=None if mask.all() else mask.long(),
                       encoder_hidden_states=conditioning, img_shapes=[[(1, height // 2, width // 2)]] * batch,
                       attention_kwargs={}, return_dict=False)[0]
        # sizes in latent pixels (a scale factor of 1); the VAE's frame axis dropped
        return QwenImagePipeline._unpack_latents(output, height, width, 1)[:, :, 0]

    def guide(self, unconditional: torch.Tensor, conditional: torch.Tensor, channels: int,
              guidance_scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: the guided velocity rescaled, patch by patch, to the norm of the
        conditional one over the patch's channels (its packed latents' last axis)."""
        batch, _, height, width = conditional.shape
        packed = [QwenImagePipeline._pack_latents(x, batch, channels, height, width)
                  for x in (unconditional, conditional)]
        combined = packed[0] + guidance_scale * (packed[1] - packed[0])
        rescaled = combined * (torch.norm(packed[1], dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return QwenImagePipeline._unpack_latents(rescaled, height, width, 1)[:, :, 0]

    def decode(self, pipeline, latents: torch.Tensor, grad: bool) -> torch.Tensor:
        """As QwenImagePipeline decodes: the latents given the VAE's frame axis, un-normalised by its per-channel
        ``latents_mean`` and ``latents_std``, the one frame decoded."""
        vae = pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            images = vae.decode(latents[:, :, None].to(vae.dtype) / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def stock_sampler_arguments(self, pipeline, eta: float) -> dict:
        """None (the stock pipeline samples with its Euler ODE step), but the negative prompt msdda guides with: the
        stock pipeline runs no guidance without one."""
        return {"negative_prompt": DEFAULT_NEGATIVE_PROMPT}


register_family(QwenImage())
