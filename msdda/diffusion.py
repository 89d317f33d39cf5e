"""Diffusers glue shared by the trainer and the sampler: load a base pipeline, encode prompts, the denoiser's guided
outputs and step kernels, decode latents.

What differs between pipeline classes lives in their model families (msdda.models: one file per family, found from
the pipeline or its denoiser); this module is the one code path every caller takes for every family. The families
are told apart by the ``_class_name`` in the base's ``model_index.json`` before anything loads.

We wrap rather than call the pipelines' ``__call__`` because RL and fusion need each step's Gaussian kernel
(msdda.kernels), which the stock loops do not expose; everything else is the stock components and their own
``encode_prompt``.

The conditioning of a batch is ONE tensor ``[B, L, D]`` everywhere downstream (families pack their pooled text into
it: msdda.models.conditioning), and latents are ``[B, C, H, W]`` everywhere, as the VAE makes them (FLUX's forward
packs them into patches and back). :func:`adapter_kernels` is the one guided forward: the rollout, the update's
policy kernel (:func:`guided_output` is its output before the kernel), evaluation and every fusion method call it,
so pi_old in the rollout and pi_theta in the update come from one code path, and :func:`uses_guidance` is the one
place that decides whether classifier-free guidance runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from msdda.bases import local_base_names, resolve_base
from msdda.errors import InputNotFound, UserError
from msdda.kernels import (
    SUPPORTED_SCHEDULERS,
    StepKernel,
    check_learned_variances,
    initial_latents,
    standard_normal,
    step_kernel,
)
from msdda.models import family_named, family_of, family_of_denoiser, pipeline_classes
from msdda.models.base import unwrapped
from msdda.models.conditioning import pack_conditioning, unpack_conditioning
from msdda.routing import BASE, checkpoint_keeping_adapter_routing, mixed_adapter_batch
from msdda.step_scales import scaled_adapters

__all__ = ["resolve_base", "resolve_device", "pipeline_class_name", "load_base_pipeline", "denoiser_of",
           "is_flow_pipeline", "absent_components", "latent_shape", "dynamic_shift_mu", "prepare_sampling",
           "encode_prompts", "pack_conditioning", "unpack_conditioning", "unwrapped", "denoiser_forward",
           "uses_guidance", "guided_output", "sampler_kernel", "adapter_kernels", "decode_latents",
           "images_to_pil", "standard_normal", "mixed_adapter_batch", "checkpoint_keeping_adapter_routing", "BASE"]

_DEFAULT_DENOISER_FAMILY = "StableDiffusionPipeline"
"""The family whose forward calls a denoiser no family claims: a UNet's positional call (stand-ins in tests)."""


def resolve_device(name: str) -> torch.device:
    """The device a sampling command runs on: ``"auto"`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asks for a GPU but torch sees none (torch {torch.__version__}): use "
                         "device cpu, or install a CUDA build of torch")
    return device


def _cannot_load(base: str, error: Exception) -> InputNotFound:
    named = " or ".join(repr(name) for name in local_base_names())
    return InputNotFound(f"cannot load base model {base!r}: {error}. Give a local diffusers folder, a Hub id that is "
                         f"in your cache (or reachable), or {named} for an embedded world")


def pipeline_class_name(base: str) -> str:
    """The pipeline class a base folder or Hub id declares (``model_index.json``'s ``_class_name``), read without
    loading any weights; refused unless msdda supports it."""
    location = resolve_base(base)
    try:
        declared = DiffusionPipeline.load_config(location, local_files_only=Path(location).is_dir())["_class_name"]
    except (OSError, KeyError) as error:
        raise _cannot_load(base, error) from error
    if family_named(declared) is None:
        raise UserError(f"base model {base!r} is a {declared}; msdda trains and fuses {pipeline_classes()} (other "
                        "pipelines are not supported yet)")
    return declared


def absent_components(location: str) -> dict[str, None]:
    """The components a pipeline folder or Hub id declares absent (``[null, null]`` in ``model_index.json``, as an SD3
    pipeline saved without T5 has), as the ``None`` keyword arguments diffusers' ``from_pretrained`` needs to load
    the pipeline without them."""
    config = DiffusionPipeline.load_config(location, local_files_only=Path(location).is_dir())
    return {name: None for name, value in config.items() if value == [None, None]}


def load_base_pipeline(base: str, scheduler: str = "ddim", dtype: torch.dtype = torch.float32,
                       channels_last: bool = True):
    """The base pipeline with a stochastic-capable scheduler, weights frozen, progress bars off.

    ``scheduler`` is one of the family's samplers: ``"ddim"`` (use eta > 0 for Gaussian kernels) or ``"ddpm"`` for
    a UNet, both built from the pipeline's own scheduler config so the noise schedule is unchanged; ``"flow"`` for
    SD3 and FLUX: the pipeline's own FlowMatchEulerDiscreteScheduler, stepped with Flow-GRPO's SDE.
    ``channels_last`` puts a UNet in the NHWC memory layout, where convolutions run faster. The pipeline class and
    the scheduler choice are checked before any weights load.
    """
    family = family_named(pipeline_class_name(base))
    location = resolve_base(base)
    try:
        family.check_before_loading(base, location, scheduler)
        extra = family.loading_kwargs | absent_components(location)
        pipeline = family.pipeline_class.from_pretrained(location, local_files_only=Path(location).is_dir(), **extra)
    except OSError as error:
        raise _cannot_load(base, error) from error
    if dtype != torch.float32:  # diffusers warns on every dtype cast, even a no-op one
        pipeline.to(dtype=dtype)
    family.set_sampler(base, pipeline, scheduler)
    assert isinstance(pipeline.scheduler, SUPPORTED_SCHEDULERS)
    for module in (family.denoiser(pipeline), pipeline.vae, *_text_encoders(pipeline)):
        module.requires_grad_(False)
    family.prepare_denoiser(pipeline, channels_last)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_flow_pipeline(pipeline) -> bool:
    """Whether ``pipeline`` is a flow-matching (SD3 or FLUX) pipeline, stepped with Flow-GRPO's SDE."""
    return family_of(pipeline).flow


def denoiser_of(pipeline) -> torch.nn.Module:
    """The network that predicts each step (and carries the LoRA): the UNet, or the SD3 or FLUX transformer."""
    return family_of(pipeline).denoiser(pipeline)


def _text_encoders(pipeline) -> list[torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [encoder for encoder in (getattr(pipeline, name, None) for name in names) if encoder is not None]


def latent_shape(pipeline, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """The ``[B, C, H, W]`` shape of x_T for images of ``height`` x ``width`` pixels (None: the pipeline's default, as
    its ``__call__`` takes it). A size whose sides do not fit the family's latents is refused rather than rounded,
    so that training, fusion and the recorded resolution agree."""
    return family_of(pipeline).latent_shape(pipeline, batch, height, width)


def dynamic_shift_mu(pipeline, shape: tuple[int, ...], num_inference_steps: int) -> float | None:
    """The dynamic shift mu for latents of ``shape`` sampled in ``num_inference_steps``, as the pipeline computes it
    (FLUX and Qwen-Image from the image's sequence length, FLUX.2 from it and the steps); None where the schedule's
    shift is fixed."""
    return family_of(pipeline).dynamic_shift_mu(pipeline, shape, num_inference_steps)


def prepare_sampling(pipeline, num_inference_steps: int, batch: int, generator: torch.Generator,
                     like: torch.Tensor, height: int | None = None, width: int | None = None,
                     latents: torch.Tensor | None = None) -> torch.Tensor:
    """Set ``pipeline.scheduler`` to ``num_inference_steps`` as the pipeline's own ``__call__`` does and return x_T
    (``latents`` when given, else drawn from ``generator`` in ``like``'s dtype and device, as the pipeline draws it).

    The flow kernels read the scheduler's sigmas, so the SDE steps between exactly the noise levels the stock
    pipeline's Euler steps use (FLUX: its own sigmas and the dynamic shift of the image's size).
    """
    if latents is not None and latents.ndim != 4:
        raise UserError(f"latents of shape {tuple(latents.shape)}: msdda's latents are [B, C, H, W], as the VAE makes "
                        "them (FluxPipeline's packed [B, patches, 4C] unpack with FluxPipeline._unpack_latents)")
    shape = latent_shape(pipeline, batch, height, width) if latents is None else tuple(latents.shape)
    family_of(pipeline).set_timesteps(pipeline, num_inference_steps, like.device, shape)
    return initial_latents(pipeline.scheduler, shape, generator, like) if latents is None else latents


@torch.no_grad()
def encode_prompts(pipeline, prompts: list[str], device: torch.device, negative_prompt: str | list[str] | None = None,
                   guidance_scale: float | None = None, max_sequence_length: int | None = None,
                   size: tuple[int | None, int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt conditioning, negative conditioning), each ``[B, L, D]``: the pipeline's own ``encode_prompt``, SD3's
    and FLUX's pooled outputs packed in (``pack_conditioning``).

    The negative conditioning is the empty prompt unless ``negative_prompt``; FLUX has none (None): FLUX.1-dev takes
    ``guidance_scale`` as an input of its transformer instead (packed after the pooled output, msdda.models.flux),
    and a transformer without guidance embeddings (FLUX.1-schnell) takes no guidance at all.
    ``max_sequence_length`` is T5's token count for SD3 and FLUX (None: the pipeline's default, 256 and 512; 0 for an
    SD3 pipeline without T5, as the embedded flow world, where diffusers' default would append 256 rows of zeros).
    ``size`` is the images' (height, width) in pixels, which SDXL conditions on (None for either: the pipeline's
    default).
    """
    tokens = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    return family_of(pipeline).encode_prompts(pipeline, prompts, device, negative_prompt, guidance_scale, tokens,
                                              size)


def denoiser_forward(model, sample: torch.Tensor, timestep: torch.Tensor | float, conditioning: torch.Tensor
                     ) -> torch.Tensor:
    """The denoiser's prediction (epsilon, v or x0 for a UNet; the flow velocity for SD3's or FLUX's transformer) for
    ``sample`` (``[B, C, H, W]``), called as the stock pipeline of its family calls it. ``model`` may be wrapped
    (DDP, DeepSpeed, torch.compile)."""
    inner = unwrapped(model)
    return family_of_denoiser(inner, _DEFAULT_DENOISER_FAMILY).forward(model, inner, sample, timestep, conditioning)


def uses_guidance(negative: torch.Tensor | None, guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: there is a negative conditioning (FLUX's distilled guidance has none)
    and the scale is above 1. The one place msdda decides it."""
    return negative is not None and guidance_scale > 1.0


def _guided_outputs(unet, latents: torch.Tensor, timestep: torch.Tensor | int, positive: torch.Tensor,
                    negative: torch.Tensor | None, names: list[str] | None, guidance_scale: float
                    ) -> list[torch.Tensor]:
    """The guided denoiser output of each named adapter (``names=None``: the denoiser as configured), from ONE
    batched forward of ``groups x halves x B`` rows (halves: the negative and positive conditioning under guidance),
    each adapter at its per-step scale where it has one (msdda.step_scales), guided as the denoiser's family guides
    (``ModelFamily.guide``)."""
    batch, groups = len(latents), len(names or [None])
    guided = uses_guidance(negative, guidance_scale)
    halves = 2 if guided else 1
    rows = torch.cat([latents] * groups * halves).to(positive.dtype)  # the denoiser runs in the pipeline's dtype
    embeds = torch.cat(([negative, positive] if guided else [positive]) * groups)
    if torch.is_tensor(timestep) and timestep.ndim:  # one timestep per row (the update's shuffled steps)
        timestep = timestep.repeat(groups * halves)
    with scaled_adapters(unet, timestep):
        if names is None:
            output = denoiser_forward(unet, rows, timestep, embeds)
        else:
            with mixed_adapter_batch(unet, [name for name in names for _ in range(batch * halves)]):
                output = denoiser_forward(unet, rows, timestep, embeds)
    family = family_of_denoiser(unwrapped(unet), _DEFAULT_DENOISER_FAMILY)
    outputs = []
    for chunk in output.chunk(groups):
        if guided:
            unconditional, conditional = chunk.chunk(2)
            chunk = family.guide(unconditional, conditional, latents.shape[1], guidance_scale)
        outputs.append(chunk)
    return outputs


def guided_output(unet, latents: torch.Tensor, timestep: torch.Tensor | int, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The denoiser's output with classifier-free guidance (one batched forward of 2B rows when guidance runs): the
    output :func:`adapter_kernels` makes its kernel of, with the denoiser as configured."""
    return _guided_outputs(unet, latents, timestep, prompt_embeds, negative_embeds, None, guidance_scale)[0]


def sampler_kernel(scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
                   noise_scale: float | None) -> StepKernel:
    """``step_kernel`` with the sampler's one noise setting ``noise_scale``: DDIM's eta, or the flow SDE's noise level
    a for FlowMatchEulerDiscreteScheduler (for both, 0 is the deterministic ODE step); DDPM takes None or 1."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return step_kernel(scheduler, model_output, timestep, sample, flow_noise_level=noise_scale)
    return step_kernel(scheduler, model_output, timestep, sample, eta=noise_scale)


def adapter_kernels(unet, scheduler, latents, timestep, positive, negative, names: list[str] | None,
                    guidance_scale: float, noise_scale: float | None) -> list[StepKernel]:
    """The step kernel of each named adapter ("__base__": the reference), from one batched forward of the denoiser
    (``unet``: a UNet or a flow transformer). ``noise_scale`` is the sampler's (``sampler_kernel``); ``timestep`` is
    0-d, or ``[B]`` for one per row.

    ``names=None`` runs the denoiser as it is configured (the policy with its adapter on; the soup: its weighted
    adapters all active). A learned variance that is not a positive finite number is refused, naming the adapter
    and the timestep.
    """
    outputs = _guided_outputs(unet, latents, timestep, positive, negative, names, guidance_scale)
    kernels = [sampler_kernel(scheduler, output, timestep, latents, noise_scale) for output in outputs]
    described = ["the denoiser with its active adapters"] if names is None else [
        "the base model" if name == BASE else f"adapter {name!r}" for name in names]
    check_learned_variances(scheduler, kernels, described, timestep)
    return kernels


def decode_latents(pipeline, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1], float32; differentiable in the latents when ``grad`` is asked."""
    return family_of(pipeline).decode(pipeline, latents, grad)


def images_to_pil(pipeline, images: torch.Tensor) -> list:
    """PIL images from ``[B, 3, H, W]`` tensors in [0, 1], with the pipeline's own image processor."""
    processor = pipeline.image_processor
    return processor.numpy_to_pil(processor.pt_to_numpy(images.detach().cpu().float()))
