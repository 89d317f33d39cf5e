"""Stable Diffusion 1.x and 2.x, and the embedded ``world`` and ``world-lv``: ``StableDiffusionPipeline``, a UNet
stepped by DDIM (eta > 0 for Gaussian kernels) or DDPM (also with a learned variance), with classifier-free guidance
over the negative prompt's conditioning."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from msdda.errors import UserError
from msdda.kernels import LEARNED_VARIANCE_TYPES
from msdda.models.base import ModelFamily, register_family

__all__ = ["StableDiffusion", "image_sides"]

_SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def image_sides(pipeline, height: int | None, width: int | None, default: int, multiple: int) -> list[int]:
    """The latents' sides for an image of ``height`` x ``width`` pixels (None: ``default``), refused unless each is a
    multiple of ``multiple`` px (rounding would make training, fusion and the recorded resolution disagree)."""
    scale, sides = pipeline.vae_scale_factor, []
    for name, pixels in (("height", height), ("width", width)):
        pixels = default if pixels is None else int(pixels)
        if pixels < multiple or pixels % multiple:
            fitting = max(multiple, pixels // multiple * multiple)
            raise UserError(f"{name} {pixels} px does not fit a {type(pipeline).__name__}, whose image sides are "
                            f"multiples of {multiple} px (e.g. sampling.resolution: {fitting})")
        sides.append(pixels // scale)
    return sides


class StableDiffusion(ModelFamily):
    pipeline_class: ClassVar[type] = StableDiffusionPipeline
    denoiser_class: ClassVar[type] = UNet2DConditionModel
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")
    loading_kwargs: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}
    fusing_class_name: ClassVar[str] = "MSDDAPipeline"
    fusing_doc: ClassVar[str] = """Stable Diffusion (or the embedded world) with K reward LoRAs, fused per step with
    MSDDA. Its ``from_pretrained`` gives the fusing pipeline of the base's own class (e.g. an :class:`MSDDA3Pipeline`
    for a Stable Diffusion 3 base)."""

    def claims_denoiser(self, inner: torch.nn.Module) -> bool:
        """A UNet without SDXL's added text-and-time embedding."""
        return isinstance(inner, UNet2DConditionModel) and inner.config.addition_embed_type != "text_time"

    def check_before_loading(self, base: str, location: str, sampler: str) -> None:
        """Also refuse DDIM on a base whose UNet predicts its variance, from the scheduler config alone: DDIM's step
        has no variance channels to read, and its kernels would be those of another model."""
        from pathlib import Path

        super().check_before_loading(base, location, sampler)
        variance_type = DDPMScheduler.load_config(location, subfolder="scheduler",
                                                  local_files_only=Path(location).is_dir()).get("variance_type")
        if sampler == "ddim" and variance_type in LEARNED_VARIANCE_TYPES:
            raise UserError(f"base {base!r} predicts its step variance (variance_type {variance_type!r}), which DDIM "
                            "cannot use: set sampling.scheduler: ddpm")

    def set_sampler(self, base: str, pipeline, sampler: str) -> None:
        """DDIM or DDPM built from the pipeline's own scheduler config, so the noise schedule is unchanged."""
        pipeline.scheduler = _SCHEDULERS[sampler].from_config(pipeline.scheduler.config)

    def prepare_denoiser(self, pipeline, channels_last: bool) -> None:
        if channels_last:  # NHWC convolutions (benchmarks/ measures the gain; the VAE's convolutions do not gain)
            pipeline.unet.to(memory_format=torch.channels_last)

    def latent_shape(self, pipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        unet, scale = pipeline.unet, pipeline.vae_scale_factor
        return (batch, unet.config.in_channels,
                *image_sides(pipeline, height, width, unet.config.sample_size * scale, scale))

    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tokens:
            raise UserError(f"max_sequence_length={tokens['max_sequence_length']} sets the T5 token count of SD3 and "
                            f"FLUX; a {type(pipeline).__name__} encodes its CLIP tokenizer's 77 tokens: leave it unset")
        return pipeline.encode_prompt(prompts, device, 1, True, negative_prompt)

    def forward(self, model, inner, sample, timestep, conditioning) -> torch.Tensor:
        return model(sample, timestep, conditioning).sample

    def sampler_noise(self, scheduler, eta, flow_noise_level, recorded) -> tuple[float | None, str]:
        if flow_noise_level is not None:
            raise UserError(f"flow_noise_level={flow_noise_level} is a setting of flow (SD3, FLUX) samplers; this "
                            f"{type(scheduler).__name__} takes eta")
        if isinstance(scheduler, DDPMScheduler):
            return None, "eta"
        return (recorded("eta", 1.0) if eta is None else eta), "eta"

    def stock_sampler_arguments(self, pipeline, eta: float) -> dict:
        return {"eta": eta}


register_family(StableDiffusion())
