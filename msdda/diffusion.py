"""Diffusers glue shared by the trainer and the sampler: load a base pipeline, encode prompts, the denoiser's guided
outputs and step kernels, decode latents.

Three pipeline classes are supported, told apart by the ``_class_name`` in the base's ``model_index.json``:
``StableDiffusionPipeline`` (a UNet with DDPM or DDIM steps; SD 1.x, 2.x and the embedded world), and two whose
MMDiT transformer predicts a flow velocity with FlowMatchEulerDiscreteScheduler: ``StableDiffusion3Pipeline`` (SD 3
and 3.5) and ``FluxPipeline`` (FLUX.1-dev and schnell); their steps are made Gaussian with Flow-GRPO's SDE
(msdda.kernels).

We wrap rather than call the pipelines' ``__call__`` because RL and fusion need each step's Gaussian kernel
(msdda.kernels), which the stock loops do not expose; everything else is the stock components and their own
``encode_prompt``.

The conditioning of a batch is ONE tensor ``[B, L, D]`` everywhere downstream: rollouts store it, updates index
its rows, guidance concatenates its negative and positive halves. Stable Diffusion's is the text encoder's
sequence. SD3's transformer takes two tensors, the joint text sequence ``[B, L, D]`` and the pooled CLIP
projection ``[B, P]``; we carry the pooled projection as ``ceil(P / D)`` zero-padded rows after the sequence
(``pack_conditioning``), and ``denoiser_forward`` splits them off again, so that every caller has one code path
for both classes. FLUX's transformer takes the T5 sequence and the pooled CLIP output the same way, and FLUX.1-dev's
distilled guidance scale (an input the transformer embeds beside the pooled text, with no negative branch) travels
as one more value after the pooled output: FLUX's negative conditioning is None, so no caller runs classifier-free
guidance on it, and a rollout's stored conditioning replays the guidance it was sampled with.

Latents are ``[B, C, H, W]`` everywhere, as the VAE makes them; FLUX's transformer sees them packed into a sequence of
2x2 patches with their position ids, and ``denoiser_forward`` packs and unpacks them as FluxPipeline does, so the
kernels, the loop and the stored trajectories do not know about the packing. Each class's schedule, latent shape and
initial noise come from ``prepare_sampling``, which sets the scheduler as the pipeline's own ``__call__`` does (FLUX:
its sigmas and the dynamic shift mu from the image's sequence length).
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.utils.checkpoint
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from msdda.errors import InputNotFound, UserError
from msdda.kernels import (
    SUPPORTED_SCHEDULERS,
    StepKernel,
    check_learned_variances,
    initial_latents,
    standard_normal,
    step_kernel,
)

__all__ = ["WORLD", "WORLD_LEARNED_VARIANCE", "WORLD_FLOW", "resolve_base", "resolve_device", "pipeline_class_name",
           "load_base_pipeline", "denoiser_of", "is_flow_pipeline", "absent_components", "latent_shape",
           "dynamic_shift_mu", "prepare_sampling", "encode_prompts", "pack_conditioning", "unpack_conditioning",
           "denoiser_forward", "guided_output", "apply_guidance", "sampler_kernel", "decode_latents", "images_to_pil",
           "standard_normal",
           "mixed_adapter_batch", "checkpoint_keeping_adapter_routing", "adapter_kernels", "BASE", "PIPELINES",
           "SAMPLERS"]

WORLD = "world"
"""The base name of the embedded default world."""
WORLD_LEARNED_VARIANCE = "world-lv"
"""The base name of the embedded world whose UNet predicts its step variance (sample it with ``ddpm``)."""
WORLD_FLOW = "world-flow"
"""The base name of the embedded flow world: a tiny SD3 transformer on the world's data (sample it with ``flow``)."""
BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch: the reference model's rows."""
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
             "FluxPipeline": FluxPipeline}
"""The base pipeline classes msdda trains on, by the ``_class_name`` of their ``model_index.json``."""
SAMPLERS = {"StableDiffusionPipeline": ("ddim", "ddpm"), "StableDiffusion3Pipeline": ("flow",),
            "FluxPipeline": ("flow",)}
"""The ``sampling.scheduler`` choices of each pipeline class: DDIM (eta > 0) or DDPM steps for a UNet, Flow-GRPO's
SDE step (``flow``) for a flow-matching transformer."""


def resolve_base(base: str) -> str:
    """A local folder or Hub id for ``base``; ``"world"`` is the shipped embedded world, ``"world-lv"`` its
    learned-variance twin, ``"world-flow"`` its flow-matching twin."""
    if base == WORLD:
        from msdda.world import world_path

        return str(world_path())
    if base == WORLD_LEARNED_VARIANCE:
        from msdda.world import learned_variance_world_path

        return str(learned_variance_world_path())
    if base == WORLD_FLOW:
        from msdda.world import flow_world_path

        return str(flow_world_path())
    return base


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
    return InputNotFound(f"cannot load base model {base!r}: {error}. Give a local diffusers folder, a Hub id that is "
                         f"in your cache (or reachable), or '{WORLD}' for the embedded world")


def pipeline_class_name(base: str) -> str:
    """The pipeline class a base folder or Hub id declares (``model_index.json``'s ``_class_name``), read without
    loading any weights; refused unless msdda supports it."""
    location = resolve_base(base)
    try:
        declared = DiffusionPipeline.load_config(location, local_files_only=Path(location).is_dir())["_class_name"]
    except (OSError, KeyError) as error:
        raise _cannot_load(base, error) from error
    if declared not in PIPELINES:
        raise UserError(f"base model {base!r} is a {declared}; msdda trains and fuses {sorted(PIPELINES)} (other "
                        "pipelines, e.g. Flux2Pipeline, are not supported yet)")
    return declared


def absent_components(location: str) -> dict[str, None]:
    """The components a pipeline folder or Hub id declares absent (``[null, null]`` in ``model_index.json``, as an SD3
    pipeline saved without T5 has), as the ``None`` keyword arguments diffusers' ``from_pretrained`` needs to load
    the pipeline without them."""
    config = DiffusionPipeline.load_config(location, local_files_only=Path(location).is_dir())
    return {name: None for name, value in config.items() if value == [None, None]}


def _check_flow_scheduler(base: str, pipeline) -> None:
    """Refuse a flow scheduler whose schedule msdda cannot reproduce step by step."""
    scheduler = pipeline.scheduler
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise UserError(f"base model {base!r} has a {type(scheduler).__name__}; msdda's flow kernels need its "
                        "FlowMatchEulerDiscreteScheduler (the one SD3 and FLUX ship)")
    config = scheduler.config
    if config.use_dynamic_shifting and not isinstance(pipeline, FluxPipeline):
        raise UserError(f"base model {base!r}'s scheduler shifts its schedule by the image size (use_dynamic_shifting), "
                        "which msdda reproduces for FluxPipeline bases only: use an SD3 base with a fixed shift (SD 3 "
                        "and 3.5 have shift 3.0)")
    if config.stochastic_sampling:
        raise UserError(f"base model {base!r}'s scheduler has stochastic_sampling=True; msdda trains with Flow-GRPO's "
                        "SDE step (sampling.flow_noise_level): save the base with stochastic_sampling=False")


def load_base_pipeline(base: str, scheduler: str = "ddim", dtype: torch.dtype = torch.float32,
                       channels_last: bool = True):
    """The base pipeline with a stochastic-capable scheduler, weights frozen, progress bars off.

    For a ``StableDiffusionPipeline``, ``scheduler`` is ``"ddim"`` (use eta > 0 for Gaussian kernels) or ``"ddpm"``,
    both built from the pipeline's own scheduler config so the noise schedule is unchanged; ``channels_last`` puts
    the UNet in the NHWC memory layout, where convolutions run faster. For a ``StableDiffusion3Pipeline`` it is
    ``"flow"``: the pipeline's own FlowMatchEulerDiscreteScheduler (its shift kept), stepped with Flow-GRPO's SDE; the
    same for a ``FluxPipeline``, whose dynamic shift ``prepare_sampling`` sets as FluxPipeline does.
    The pipeline class and the scheduler choice are checked before any weights load.
    """
    declared = pipeline_class_name(base)
    if scheduler not in SAMPLERS[declared]:
        raise UserError(f"base model {base!r} is a {declared}, which samples with sampling.scheduler in "
                        f"{list(SAMPLERS[declared])}; got {scheduler!r}")
    location = resolve_base(base)
    extra = {"safety_checker": None, "requires_safety_checker": False} if declared == "StableDiffusionPipeline" else {}
    try:
        extra |= absent_components(location)
        _check_scheduler_reads_the_variance(base, location, scheduler, Path(location).is_dir())
        pipeline = PIPELINES[declared].from_pretrained(location, local_files_only=Path(location).is_dir(), **extra)
    except OSError as error:
        raise _cannot_load(base, error) from error
    if dtype != torch.float32:  # diffusers warns on every dtype cast, even a no-op one
        pipeline.to(dtype=dtype)
    if scheduler == "flow":
        _check_flow_scheduler(base, pipeline)
    else:
        pipeline.scheduler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler].from_config(
            pipeline.scheduler.config)
    assert isinstance(pipeline.scheduler, SUPPORTED_SCHEDULERS)
    for module in (denoiser_of(pipeline), pipeline.vae, *_text_encoders(pipeline)):
        module.requires_grad_(False)
    if channels_last and not is_flow_pipeline(pipeline):  # NHWC convolutions (benchmarks/ measures the gain; the
        pipeline.unet.to(memory_format=torch.channels_last)  # VAE's convolutions and the transformer do not gain)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_flow_pipeline(pipeline) -> bool:
    """Whether ``pipeline`` is a flow-matching (SD3 or FLUX) pipeline, whose denoiser is ``pipeline.transformer``."""
    return isinstance(pipeline, (StableDiffusion3Pipeline, FluxPipeline))


def denoiser_of(pipeline) -> torch.nn.Module:
    """The network that predicts each step (and carries the LoRA): the UNet, or the SD3 or FLUX transformer."""
    return pipeline.transformer if is_flow_pipeline(pipeline) else pipeline.unet


def _text_encoders(pipeline) -> list[torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [encoder for encoder in (getattr(pipeline, name, None) for name in names) if encoder is not None]


def latent_shape(pipeline, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """The ``[B, C, H, W]`` shape of x_T for images of ``height`` x ``width`` pixels (None: the pipeline's default, as
    its ``__call__`` takes it: the denoiser's sample size, or FLUX's 1024 px).

    FLUX's latents must split into 2x2 patches, so its sides are multiples of twice the VAE's scale factor; a size that
    does not fit is refused rather than rounded down as FluxPipeline does (it warns), so that training, fusion and the
    recorded resolution agree.
    """
    scale = pipeline.vae_scale_factor
    flux = isinstance(pipeline, FluxPipeline)
    multiple = 2 * scale if flux else scale
    if flux:
        default, channels = pipeline.default_sample_size * scale, pipeline.transformer.config.in_channels // 4
    else:
        denoiser = denoiser_of(pipeline)
        default, channels = denoiser.config.sample_size * scale, denoiser.config.in_channels
    sides = []
    for name, pixels in (("height", height), ("width", width)):
        pixels = default if pixels is None else int(pixels)
        if pixels < multiple or pixels % multiple:
            fitting = max(multiple, pixels // multiple * multiple)
            raise UserError(f"{name} {pixels} px does not fit a {type(pipeline).__name__}, whose image sides are "
                            f"multiples of {multiple} px (e.g. sampling.resolution: {fitting})")
        sides.append(pixels // scale)
    return (batch, channels, *sides)


def dynamic_shift_mu(pipeline, shape: tuple[int, ...]) -> float | None:
    """FLUX's dynamic shift mu for latents of ``shape``, as FluxPipeline computes it from the image's sequence length
    (the number of 2x2 patches) and the scheduler's config; None where the schedule's shift is fixed."""
    config = pipeline.scheduler.config
    if not (isinstance(pipeline, FluxPipeline) and config.use_dynamic_shifting):
        return None
    sequence_length = (shape[-2] // 2) * (shape[-1] // 2)
    return float(calculate_shift(sequence_length, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15)))


def prepare_sampling(pipeline, num_inference_steps: int, batch: int, generator: torch.Generator,
                     like: torch.Tensor, height: int | None = None, width: int | None = None,
                     latents: torch.Tensor | None = None) -> torch.Tensor:
    """Set ``pipeline.scheduler`` to ``num_inference_steps`` as the pipeline's own ``__call__`` does and return x_T
    (``latents`` when given, else drawn from ``generator`` in ``like``'s dtype and device, as the pipeline draws it).

    FluxPipeline passes its own sigmas (1 to 1/N, evenly) and the dynamic shift mu of the image's size; the SD and SD3
    pipelines let the scheduler space its steps. The flow kernels read the scheduler's sigmas, so the SDE steps
    between exactly the noise levels the stock pipeline's Euler steps use.
    """
    if latents is not None and latents.ndim != 4:
        raise UserError(f"latents of shape {tuple(latents.shape)}: msdda's latents are [B, C, H, W], as the VAE makes "
                        "them (FluxPipeline's packed [B, patches, 4C] unpack with FluxPipeline._unpack_latents)")
    shape = latent_shape(pipeline, batch, height, width) if latents is None else tuple(latents.shape)
    scheduler = pipeline.scheduler
    if isinstance(pipeline, FluxPipeline):
        steps = num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(scheduler, steps, like.device, sigmas=sigmas, mu=dynamic_shift_mu(pipeline, shape))
    else:
        scheduler.set_timesteps(num_inference_steps, device=like.device)
    return initial_latents(scheduler, shape, generator, like) if latents is None else latents


def pack_conditioning(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """SD3's two conditioning tensors as one: the joint sequence ``[B, L, D]`` followed by the pooled projection
    ``[B, P]`` zero-padded to ``ceil(P / D)`` rows of width D (see the module docstring)."""
    batch, _, width = sequence.shape
    rows = math.ceil(pooled.shape[1] / width)
    padded = torch.nn.functional.pad(pooled, (0, rows * width - pooled.shape[1]))
    return torch.cat([sequence, padded.reshape(batch, rows, width).to(sequence.dtype)], dim=1)


def unpack_conditioning(conditioning: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(joint sequence ``[B, L, D]``, pooled projection ``[B, pooled_dim]``) of a ``pack_conditioning`` tensor."""
    rows = math.ceil(pooled_dim / conditioning.shape[2])
    sequence, pooled = conditioning[:, :-rows], conditioning[:, -rows:]
    return sequence, pooled.reshape(len(conditioning), -1)[:, :pooled_dim]


def _check_scheduler_reads_the_variance(base: str, location: str, scheduler: str, local: bool) -> None:
    """Refuse DDIM on a base whose UNet predicts its variance, from the scheduler config alone (before the weights
    load): DDIM's step has no variance channels to read, and its kernels would be those of another model."""
    variance_type = DDPMScheduler.load_config(location, subfolder="scheduler", local_files_only=local).get(
        "variance_type")
    if scheduler == "ddim" and variance_type in ("learned", "learned_range"):
        raise UserError(f"base {base!r} predicts its step variance (variance_type {variance_type!r}), which DDIM "
                        "cannot use: set sampling.scheduler: ddpm")


@torch.no_grad()
def encode_prompts(pipeline, prompts: list[str], device: torch.device, negative_prompt: str | list[str] | None = None,
                   guidance_scale: float | None = None, max_sequence_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt conditioning, negative conditioning), each ``[B, L, D]``: the pipeline's own ``encode_prompt``, SD3's
    and FLUX's pooled outputs packed in (``pack_conditioning``).

    The negative conditioning is the empty prompt unless ``negative_prompt``; FLUX has none (None): FLUX.1-dev takes
    ``guidance_scale`` as an input of its transformer instead (packed after the pooled output, see the module
    docstring), and a transformer without guidance embeddings (FLUX.1-schnell) takes no guidance at all.
    ``max_sequence_length`` is T5's token count for SD3 and FLUX (None: the pipeline's default, 256 and 512; 0 for an
    SD3 pipeline without T5, as the embedded flow world, where diffusers' default would append 256 rows of zeros).
    """
    tokens = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    if isinstance(pipeline, FluxPipeline):
        return _encode_flux_prompts(pipeline, prompts, device, negative_prompt, guidance_scale, tokens), None
    if not is_flow_pipeline(pipeline):
        if tokens:
            raise UserError(f"max_sequence_length={max_sequence_length} sets the T5 token count of SD3 and FLUX; a "
                            f"{type(pipeline).__name__} encodes its CLIP tokenizer's 77 tokens: leave it unset")
        return pipeline.encode_prompt(prompts, device, 1, True, negative_prompt)
    if pipeline.text_encoder_3 is None and not tokens:
        tokens = {"max_sequence_length": 0}
    positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=True, negative_prompt=negative_prompt, **tokens)
    return pack_conditioning(positive, pooled), pack_conditioning(negative, negative_pooled)


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
def _encode_flux_prompts(pipeline, prompts: list[str], device: torch.device, negative_prompt,
                         guidance_scale: float | None, tokens: dict) -> torch.Tensor:
    """FLUX's T5 sequence with the pooled CLIP output and, for FLUX.1-dev, the guidance scale packed after it. The
    text position ids FluxPipeline also returns are zeros of the sequence's length, rebuilt where they are used."""
    if negative_prompt is not None:
        raise UserError(f"negative_prompt={negative_prompt!r}: FLUX.1 is sampled without a negative branch (its "
                        "guidance is distilled into the transformer), and msdda does not run FluxPipeline's optional "
                        "true CFG; leave negative_prompt unset")
    sequence, pooled, _ = pipeline.encode_prompt(prompts, None, device=device, **tokens)
    if pipeline.transformer.config.guidance_embeds:
        if guidance_scale is None:
            raise UserError("this FLUX transformer embeds its guidance scale (guidance_embeds, as FLUX.1-dev): pass "
                            "guidance_scale (FluxPipeline's default is 3.5)")
        pooled = torch.cat([pooled, pooled.new_full((len(pooled), 1), float(guidance_scale))], dim=1)
    return pack_conditioning(sequence, pooled)


def denoiser_forward(model, sample: torch.Tensor, timestep: torch.Tensor | float, conditioning: torch.Tensor
                     ) -> torch.Tensor:
    """The denoiser's prediction (epsilon, v or x0 for a UNet; the flow velocity for SD3's or FLUX's transformer) for
    ``sample`` (``[B, C, H, W]``).

    ``model`` may be wrapped (DDP, DeepSpeed, torch.compile). A UNet is called as diffusers' SD pipeline calls it;
    SD3's transformer as StableDiffusion3Pipeline calls it: keywords, the pooled projection split off the packed
    conditioning, and one timestep per row (its timestep embedding needs a ``[B]`` tensor); FLUX's as FluxPipeline
    does (``_flux_forward``).
    """
    inner = unwrapped(model)
    if not isinstance(inner, (SD3Transformer2DModel, FluxTransformer2DModel)):
        return model(sample, timestep, conditioning).sample
    timesteps = torch.as_tensor(timestep, device=sample.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(len(sample))
    if isinstance(inner, FluxTransformer2DModel):
        return _flux_forward(model, inner.config, sample, timesteps, conditioning)
    sequence, pooled = unpack_conditioning(conditioning, inner.config.pooled_projection_dim)
    return model(hidden_states=sample, timestep=timesteps, encoder_hidden_states=sequence,
                 pooled_projections=pooled).sample


def _flux_forward(model, config, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor
                  ) -> torch.Tensor:
    """FLUX's velocity for ``[B, C, H, W]`` latents, called as FluxPipeline.__call__ calls its transformer: the latents
    packed into 2x2 patches with their position ids, zero text ids, the timestep divided by 1000 in the latents'
    dtype, the guidance scale (FLUX.1-dev) from the packed conditioning; the output unpacked to ``[B, C, H, W]``."""
    guided = config.guidance_embeds
    sequence, pooled = unpack_conditioning(conditioning, config.pooled_projection_dim + guided)
    guidance = pooled[:, -1] if guided else None
    pooled = pooled[:, :config.pooled_projection_dim]
    batch, channels, height, width = sample.shape
    packed = FluxPipeline._pack_latents(sample, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, sample.device, sample.dtype)
    text_ids = torch.zeros(sequence.shape[1], 3, device=sample.device, dtype=sequence.dtype)
    output = model(hidden_states=packed, timestep=timesteps.to(sample.dtype) / 1000, guidance=guidance,
                   pooled_projections=pooled, encoder_hidden_states=sequence, txt_ids=text_ids,
                   img_ids=image_ids).sample
    return FluxPipeline._unpack_latents(output, height, width, 1)  # sizes in latent pixels: a scale factor of 1


def apply_guidance(unconditional: torch.Tensor, conditional: torch.Tensor, channels: int,
                   guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on the prediction channels; a learned variance (extra channels) is kept as the
    conditional model's, as diffusers' pipelines do."""
    guided = unconditional[:, :channels] + guidance_scale * (conditional[:, :channels] - unconditional[:, :channels])
    if conditional.shape[1] == channels:
        return guided
    return torch.cat([guided, conditional[:, channels:]], dim=1)


def guided_output(unet, latents: torch.Tensor, timestep: torch.Tensor | int, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The denoiser's output with classifier-free guidance (one batched forward of 2B rows when guidance > 1)."""
    latents = latents.to(prompt_embeds.dtype)  # the chain runs in float32, the denoiser in the pipeline's dtype
    if negative_embeds is None or guidance_scale <= 1.0:
        return denoiser_forward(unet, latents, timestep, prompt_embeds)
    doubled = torch.cat([latents, latents])
    timesteps = torch.cat([timestep, timestep]) if torch.is_tensor(timestep) and timestep.ndim else timestep
    unconditional, conditional = denoiser_forward(unet, doubled, timesteps,
                                                  torch.cat([negative_embeds, prompt_embeds])).chunk(2)
    return apply_guidance(unconditional, conditional, latents.shape[1], guidance_scale)


def sampler_kernel(scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
                   noise_scale: float | None) -> StepKernel:
    """``step_kernel`` with the sampler's one noise setting ``noise_scale``: DDIM's eta, or the flow SDE's noise level
    a for FlowMatchEulerDiscreteScheduler (for both, 0 is the deterministic ODE step); DDPM takes None or 1."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return step_kernel(scheduler, model_output, timestep, sample, flow_noise_level=noise_scale)
    return step_kernel(scheduler, model_output, timestep, sample, eta=noise_scale)


def decode_latents(pipeline, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1], float32; differentiable in the latents when ``grad`` is asked."""
    vae = pipeline.vae
    shift = vae.config.shift_factor or 0.0  # SD3's VAE latents are shifted as well as scaled
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def images_to_pil(pipeline, images: torch.Tensor) -> list:
    """PIL images from ``[B, 3, H, W]`` tensors in [0, 1], with the pipeline's own image processor."""
    processor = pipeline.image_processor
    return processor.numpy_to_pil(processor.pt_to_numpy(images.detach().cpu().float()))


_active_routings: list[list[str]] = []
"""The ``adapter_names`` of the mixed-adapter batches now running, innermost last."""


_lora_layer_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lora_layers(model: torch.nn.Module, layer_class: type) -> list[torch.nn.Module]:
    """``model``'s PEFT LoRA layers, found once per set of loaded adapters: walking the UNet's modules on every
    step of a studio render costs it about a twentieth of its time."""
    adapters = tuple(getattr(unwrapped(model), "peft_config", {}))
    if not adapters:  # a block of a model (gradient checkpointing): no adapter list to key on, and it is small
        return [module for module in model.modules() if isinstance(module, layer_class)]
    cached = _lora_layer_cache.get(model)
    if cached is None or cached[0] != adapters:
        cached = adapters, [module for module in model.modules() if isinstance(module, layer_class)]
        _lora_layer_cache[model] = cached
    return cached[1]


def _contiguous_runs(names: list[str]) -> list[tuple[str, int, int]]:
    """``names`` as runs of one name: (name, first row, row after the last)."""
    runs: list[tuple[str, int, int]] = []
    for row, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], row + 1)
        else:
            runs.append((name, row, row + 1))
    return runs


@contextmanager
def mixed_adapter_batch(unet, adapter_names: list[str]):
    """Route batch row i of every LoRA layer to adapter ``adapter_names[i]`` (PEFT mixed-adapter batches).

    diffusers' UNet and SD3 transformer forwards have no ``adapter_names`` argument, so we hand it to each PEFT LoRA
    layer with a forward pre-hook. Under gradient checkpointing, enable it with ``checkpoint_keeping_adapter_routing``
    so that backward recomputes each block with the same routing.

    Our batches hold each adapter's rows together, and PEFT's mixed batch gathers and scatters every adapter's rows
    by a list of indices (built in Python) in every layer at every step. So a vanilla LoRA linear or convolution
    layer runs its base layer alone (all rows routed to ``__base__``) and a forward hook adds each adapter's
    ``lora_B(lora_A(dropout(x))) * scaling`` to its rows' slice, PEFT's arithmetic on views; layers of other kinds
    or with LoRA variants (DoRA) keep PEFT's own routing.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear, _ConvNd

    runs = _contiguous_runs(adapter_names)
    only_base = [BASE] * len(adapter_names)

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    def base_only(module, args, kwargs):
        kwargs["adapter_names"] = only_base
        return args, kwargs

    def add_adapters(module, args, kwargs, result):
        x = args[0]
        for name, first, after in runs:
            if name in module.lora_A:
                lora_a = module.lora_A[name]
                update = module.lora_B[name](lora_a(module.lora_dropout[name](x[first:after].to(lora_a.weight.dtype))))
                result[first:after] += (update * module.scaling[name]).to(result.dtype)
        return result

    handles = []
    for module in _lora_layers(unet, LoraLayer):
        if isinstance(module, (Linear, _ConvNd)) and not module.lora_variant:
            handles += [module.register_forward_pre_hook(base_only, with_kwargs=True),
                        module.register_forward_hook(add_adapters, with_kwargs=True)]
        else:
            handles.append(module.register_forward_pre_hook(inject, with_kwargs=True))
    _active_routings.append(adapter_names)
    try:
        yield
    finally:
        _active_routings.pop()
        for handle in handles:
            handle.remove()


def checkpoint_keeping_adapter_routing(block, *args):
    """diffusers' gradient checkpointing (non-reentrant), recomputing ``block`` with the mixed-adapter routing
    its forward ran with. diffusers' default recomputes in backward, after ``mixed_adapter_batch`` has ended, so
    the reference's rows (adapter off) would be recomputed with the adapter on."""
    names = _active_routings[-1] if _active_routings else None

    def contexts():
        return nullcontext(), mixed_adapter_batch(block, names) if names is not None else nullcontext()

    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)


def adapter_kernels(unet, scheduler, latents, timestep, positive, negative, names: list[str] | None,
                    guidance_scale: float, noise_scale: float | None) -> list[StepKernel]:
    """The step kernel of each named adapter ("__base__": the reference), from one batched forward of the denoiser
    (``unet``: a UNet or SD3's transformer). ``noise_scale`` is the sampler's (``sampler_kernel``).

    ``names=None`` runs the denoiser as it is configured (the soup: its weighted adapters all active). A learned
    variance that is not a positive finite number is refused, naming the adapter and the timestep.
    """
    batch, groups = len(latents), len(names or [None])
    guided = negative is not None and guidance_scale > 1.0
    halves = 2 if guided else 1
    rows = torch.cat([latents] * groups * halves).to(positive.dtype)  # the denoiser runs in the pipeline's dtype
    embeds = torch.cat(([negative, positive] if guided else [positive]) * groups)
    if names is None:
        output = denoiser_forward(unet, rows, timestep, embeds)
    else:
        with mixed_adapter_batch(unet, [name for name in names for _ in range(batch * halves)]):
            output = denoiser_forward(unet, rows, timestep, embeds)
    kernels = []
    for chunk in output.chunk(groups):
        if guided:
            unconditional, conditional = chunk.chunk(2)
            chunk = apply_guidance(unconditional, conditional, latents.shape[1], guidance_scale)
        kernels.append(sampler_kernel(scheduler, chunk, timestep, latents, noise_scale))
    described = ["the denoiser with its active adapters"] if names is None else [
        "the base model" if name == BASE else f"adapter {name!r}" for name in names]
    check_learned_variances(scheduler, kernels, described, timestep)
    return kernels
