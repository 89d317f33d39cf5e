"""What a model family declares, and the registry that finds a pipeline's family.

A model family is one diffusers pipeline class (and the fusing pipeline msdda derives from it) with everything
msdda does differently for it: which samplers it takes and how its scheduler is checked and set, its latents'
shape, how prompts are encoded into the one conditioning tensor ``[B, L, D]`` the rest of msdda carries, how its
denoiser is called, whether it is guided by classifier-free guidance or takes a distilled guidance scale, how its
LoRA is saved, and which sampler settings its adapters record. Like diffusers' per-family LoRA loader mixins, each
family states these as class attributes and methods, and no shared code asks which pipeline class it holds: adding
an architecture is one file in this package that subclasses :class:`ModelFamily` and calls :func:`register_family`.

Families are stateless: every method takes the pipeline (or the denoiser) it works on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from diffusers.models.modeling_utils import ModelMixin

from msdda.errors import UserError

__all__ = ["ModelFamily", "register_family", "family_of", "family_named", "family_of_denoiser", "pipeline_classes",
           "unwrapped"]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside DDP, DeepSpeed and torch.compile wrappers (``module``, ``_orig_mod``).

    accelerate's ``extract_model_from_parallel`` does the same but walks every submodule for compiled regions on
    each call, which costs a studio render at 10 steps about a tenth of its time; the denoiser is unwrapped at
    every step, so only the wrappers' own attributes are followed here.
    """
    inner = model
    while not isinstance(inner, ModelMixin):
        wrapped = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if not isinstance(wrapped, torch.nn.Module):
            break
        inner = wrapped
    return inner


class ModelFamily(ABC):
    """One pipeline class's part in msdda; subclasses set the class attributes, write the abstract methods and
    override what else differs."""

    pipeline_class: ClassVar[type]
    """The stock diffusers pipeline class (its name is the ``_class_name`` of the base's ``model_index.json``)."""
    denoiser_class: ClassVar[type]
    """The class of the network that predicts each step and carries the LoRA."""
    denoiser_attribute: ClassVar[str] = "unet"
    """The pipeline attribute that holds the denoiser."""
    samplers: ClassVar[tuple[str, ...]]
    """The ``sampling.scheduler`` choices it takes."""
    noise_setting: ClassVar[str] = "eta"
    """The name of the sampler's one noise setting (``sampler_kernel``'s ``noise_scale``) in configs, adapter
    metadata and the fusing pipeline's ``__call__``: DDIM's ``eta``, or the flow SDE's ``flow_noise_level``."""
    lora_layers_argument: ClassVar[str] = "unet_lora_layers"
    """The keyword of the pipeline class's ``save_lora_weights`` that takes the denoiser's LoRA."""
    saves_lora_config: ClassVar[bool] = False
    """Whether the LoRA file carries the LoRA's config in its metadata, as diffusers' SD3, FLUX and SDXL LoRA
    scripts save it: without it, ``load_lora_weights`` takes lora_alpha = rank, which scales a LoRA trained at
    another alpha wrongly. (Stable Diffusion's adapters are saved without it, as they always were.)"""
    loading_kwargs: ClassVar[dict] = {}
    """Extra keywords for ``from_pretrained`` (e.g. no safety checker)."""
    default_guidance_scale: ClassVar[float] = 7.5
    """The fusing pipeline's guidance scale where no adapter records one."""
    fusing_class_name: ClassVar[str]
    """The name of the fusing pipeline msdda.fuse derives from ``pipeline_class``."""
    fusing_doc: ClassVar[str] = ""
    """Its docstring."""

    @property
    def name(self) -> str:
        """The pipeline class's name, as adapters record it (``pipeline_class``)."""
        return self.pipeline_class.__name__

    @property
    def flow(self) -> bool:
        """Whether its steps are Flow-GRPO's SDE steps of a flow-matching scheduler."""
        return self.noise_setting == "flow_noise_level"

    # ----------------------------------------------------------------------------------------------- loading
    def check_before_loading(self, base: str, location: str, sampler: str) -> None:
        """Refuse, from the base's configs alone, a sampler that cannot read this base (before any weights load)."""
        if sampler not in self.samplers:
            raise UserError(f"base model {base!r} is a {self.name}, which samples with sampling.scheduler in "
                            f"{list(self.samplers)}; got {sampler!r}")

    @abstractmethod
    def set_sampler(self, base: str, pipeline, sampler: str) -> None:
        """Give the loaded ``pipeline`` the scheduler ``sampler`` names, or refuse its own where msdda cannot step
        it."""

    def denoiser(self, pipeline) -> torch.nn.Module:
        return getattr(pipeline, self.denoiser_attribute)

    def prepare_denoiser(self, pipeline, channels_last: bool) -> None:
        """Put the loaded denoiser in its fastest memory layout where it has one (``channels_last`` asks for it)."""

    def claims_denoiser(self, inner: torch.nn.Module) -> bool:
        """Whether ``inner`` (unwrapped) is this family's denoiser, whose forward :meth:`forward` calls."""
        return isinstance(inner, self.denoiser_class)

    def enable_vae_gradient_checkpointing(self, pipeline) -> None:
        """Checkpoint the VAE decoder's blocks, through which the pathwise estimator backpropagates, where diffusers
        offers it for the family's VAE."""
        pipeline.vae.enable_gradient_checkpointing()

    # --------------------------------------------------------------------------------------- latents, schedule
    @abstractmethod
    def latent_shape(self, pipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        """The ``[B, C, H, W]`` shape of x_T for ``height`` x ``width`` pixels (None: the pipeline's default)."""

    def dynamic_shift_mu(self, pipeline, shape: tuple[int, ...], num_inference_steps: int) -> float | None:
        """The schedule's shift for latents of ``shape`` sampled in ``num_inference_steps`` where it depends on the
        image size (FLUX.2's on the steps too); None where it does not."""
        return None

    def set_timesteps(self, pipeline, num_inference_steps: int, device: torch.device, shape: tuple[int, ...]) -> None:
        """Set the scheduler to ``num_inference_steps`` as the pipeline's own ``__call__`` does."""
        pipeline.scheduler.set_timesteps(num_inference_steps, device=device)

    # -------------------------------------------------------------------------------------------- conditioning
    @abstractmethod
    def encode_prompts(self, pipeline, prompts: list[str], device: torch.device, negative_prompt,
                       guidance_scale: float | None, tokens: dict, size: tuple[int | None, int | None] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt conditioning, negative conditioning or None), each ``[B, L, D]``; ``tokens`` holds
        ``max_sequence_length`` where one was given; ``size`` is the images' (height, width) in pixels (None for either:
        the pipeline's default), for a family that conditions on it."""

    @abstractmethod
    def forward(self, model, inner: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float,
                conditioning: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for ``sample`` ``[B, C, H, W]``, as the stock pipeline calls ``model`` (maybe
        wrapped; ``inner`` is the diffusers model inside)."""

    def guide(self, unconditional: torch.Tensor, conditional: torch.Tensor, channels: int,
              guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance of the denoiser's outputs ``[B, C', H, W]`` as the stock pipeline applies it: on
        the ``channels`` prediction channels, with a learned variance (extra channels) kept as the conditional
        model's, as diffusers' pipelines do."""
        guided = unconditional[:, :channels] + guidance_scale * (conditional[:, :channels]
                                                                 - unconditional[:, :channels])
        if conditional.shape[1] == channels:
            return guided
        return torch.cat([guided, conditional[:, channels:]], dim=1)

    # --------------------------------------------------------------------------------------------- decoding
    def decode(self, pipeline, latents: torch.Tensor, grad: bool) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1], float32, from the VAE (its latents scaled, and shifted where its
        config has a shift factor)."""
        vae = pipeline.vae
        shift = vae.config.shift_factor or 0.0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------- adapters, metadata
    def save_lora(self, folder: Path, denoiser: torch.nn.Module, lora_state: dict[str, torch.Tensor]) -> None:
        """Write ``lora_state`` (PEFT keys) into ``folder`` as the stock ``load_lora_weights`` reads it."""
        arguments = {self.lora_layers_argument: lora_state}
        if self.saves_lora_config:  # e.g. transformer_lora_layers -> transformer_lora_adapter_metadata
            metadata = self.lora_layers_argument.replace("_lora_layers", "_lora_adapter_metadata")
            arguments[metadata] = denoiser.peft_config["default"].to_dict()
        self.pipeline_class.save_lora_weights(folder, safe_serialization=True, **arguments)

    def sampler_metadata(self, pipeline, noise_scale: float | None, shape: tuple[int, ...],
                         num_inference_steps: int) -> dict:
        """The sampler settings an adapter records (``AdapterMetadata`` fields) and fusion checks."""
        return {"eta": noise_scale}

    @abstractmethod
    def sampler_noise(self, scheduler, eta: float | None, flow_noise_level: float | None, recorded
                      ) -> tuple[float | None, str]:
        """The fusing pipeline's noise setting and its name from its ``__call__``'s ``eta`` and
        ``flow_noise_level`` (None: ``recorded(field, fallback)``, the adapters' metadata)."""

    def stock_sampler_arguments(self, pipeline, eta: float) -> dict:
        """The stock ``__call__``'s sampler keywords that sample as msdda's loop does."""
        return {}


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` the one for its pipeline class (by name, as ``model_index.json`` names it)."""
    _FAMILIES[family.name] = family
    return family


def pipeline_classes() -> list[str]:
    """The names of the pipeline classes msdda trains and fuses, sorted."""
    return sorted(_FAMILIES)


def family_named(class_name: str) -> ModelFamily | None:
    """The family of the pipeline class named ``class_name``; None for one msdda does not support."""
    return _FAMILIES.get(class_name)


def family_of(pipeline) -> ModelFamily:
    """The family of a pipeline object: its class's, or that of the nearest stock class it derives from (the
    fusing pipelines)."""
    for cls in type(pipeline).__mro__:
        family = _FAMILIES.get(cls.__name__)
        if family is not None and issubclass(cls, family.pipeline_class):
            return family
    raise UserError(f"msdda trains and fuses {pipeline_classes()}, not a {type(pipeline).__name__}")


def family_of_denoiser(inner: torch.nn.Module, default: str) -> ModelFamily:
    """The family whose denoiser ``inner`` (unwrapped) is; the family named ``default`` for any other module (a
    stand-in denoiser in tests is called as a UNet)."""
    for family in _FAMILIES.values():
        if family.claims_denoiser(inner):
            return family
    return _FAMILIES[default]
