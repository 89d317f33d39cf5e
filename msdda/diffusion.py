"""Diffusers glue shared by the trainer and the sampler: load a base pipeline, encode prompts, guided model
outputs, decode latents.

We wrap rather than call ``StableDiffusionPipeline.__call__`` because RL and fusion need each step's Gaussian
kernel (msdda.kernels), which the stock loop does not expose; everything else is the stock components.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from msdda.errors import InputNotFound, UserError
from msdda.kernels import SUPPORTED_SCHEDULERS, StepKernel, check_learned_variances, standard_normal, step_kernel

__all__ = ["WORLD", "WORLD_LEARNED_VARIANCE", "resolve_base", "resolve_device", "load_base_pipeline", "encode_prompts", "guided_output",
           "apply_guidance", "decode_latents", "images_to_pil", "standard_normal", "mixed_adapter_batch",
           "checkpoint_keeping_adapter_routing", "adapter_kernels", "BASE"]

WORLD = "world"
"""The base name of the embedded default world."""
WORLD_LEARNED_VARIANCE = "world-lv"
"""The base name of the embedded world whose UNet predicts its step variance (sample it with ``ddpm``)."""
BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch: the reference model's rows."""


def resolve_base(base: str) -> str:
    """A local folder or Hub id for ``base``; ``"world"`` is the shipped embedded world, ``"world-lv"`` its
    learned-variance twin."""
    if base == WORLD:
        from msdda.world import world_path

        return str(world_path())
    if base == WORLD_LEARNED_VARIANCE:
        from msdda.world import learned_variance_world_path

        return str(learned_variance_world_path())
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


def load_base_pipeline(base: str, scheduler: str = "ddim", dtype: torch.dtype = torch.float32,
                       channels_last: bool = True):
    """The base StableDiffusionPipeline with a stochastic-capable scheduler, weights frozen, progress bars off.

    ``scheduler`` is ``"ddim"`` (use eta > 0 for Gaussian kernels) or ``"ddpm"``; both are built from the
    pipeline's own scheduler config so the noise schedule is unchanged. ``channels_last`` puts the UNet in the
    NHWC memory layout, where convolutions run faster.
    """
    choices = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if scheduler not in choices:
        raise UserError(f"scheduler must be one of {list(choices)} (stochastic Gaussian steps), got {scheduler!r}")
    location = resolve_base(base)
    local = Path(location).is_dir()
    try:
        _check_scheduler_reads_the_variance(base, location, scheduler, local)
        pipeline = StableDiffusionPipeline.from_pretrained(location, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=local)
    except OSError as error:
        raise InputNotFound(
            f"cannot load base model {base!r}: {error}. Give a local diffusers folder, a Hub id that is in your "
            f"cache (or reachable), or '{WORLD}' ('{WORLD_LEARNED_VARIANCE}') for the embedded world (with learned "
            "variances)"
        ) from error
    if dtype != torch.float32:  # diffusers warns on every dtype cast, even a no-op one
        pipeline.to(dtype=dtype)
    pipeline.scheduler = choices[scheduler].from_config(pipeline.scheduler.config)
    assert isinstance(pipeline.scheduler, SUPPORTED_SCHEDULERS)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
    if channels_last:  # NHWC convolutions (benchmarks/ measures the gain; the VAE's convolutions do not gain)
        pipeline.unet.to(memory_format=torch.channels_last)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _check_scheduler_reads_the_variance(base: str, location: str, scheduler: str, local: bool) -> None:
    """Refuse DDIM on a base whose UNet predicts its variance, from the scheduler config alone (before the weights
    load): DDIM's step has no variance channels to read, and its kernels would be those of another model."""
    variance_type = DDPMScheduler.load_config(location, subfolder="scheduler", local_files_only=local).get(
        "variance_type")
    if scheduler == "ddim" and variance_type in ("learned", "learned_range"):
        raise UserError(f"base {base!r} predicts its step variance (variance_type {variance_type!r}), which DDIM "
                        "cannot use: set sampling.scheduler: ddpm")


@torch.no_grad()
def encode_prompts(pipeline, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, negative (empty-prompt) embeddings), each ``[B, L, D]``."""
    positive, negative = pipeline.encode_prompt(prompts, device, 1, True)
    return positive, negative


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
    """The UNet output with classifier-free guidance (one batched forward of 2B rows when guidance > 1)."""
    latents = latents.to(prompt_embeds.dtype)  # the chain runs in float32, the UNet in the pipeline's dtype
    if negative_embeds is None or guidance_scale <= 1.0:
        return unet(latents, timestep, prompt_embeds).sample
    doubled = torch.cat([latents, latents])
    timesteps = torch.cat([timestep, timestep]) if torch.is_tensor(timestep) and timestep.ndim else timestep
    unconditional, conditional = unet(doubled, timesteps, torch.cat([negative_embeds, prompt_embeds])).sample.chunk(2)
    return apply_guidance(unconditional, conditional, latents.shape[1], guidance_scale)


def decode_latents(pipeline, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1], float32; differentiable in the latents when ``grad`` is asked."""
    vae = pipeline.vae
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def images_to_pil(pipeline, images: torch.Tensor) -> list:
    """PIL images from ``[B, 3, H, W]`` tensors in [0, 1], with the pipeline's own image processor."""
    processor = pipeline.image_processor
    return processor.numpy_to_pil(processor.pt_to_numpy(images.detach().cpu().float()))


_active_routings: list[list[str]] = []
"""The ``adapter_names`` of the mixed-adapter batches now running, innermost last."""


@contextmanager
def mixed_adapter_batch(unet, adapter_names: list[str]):
    """Route batch row i of every LoRA layer to adapter ``adapter_names[i]`` (PEFT mixed-adapter batches).

    diffusers' UNet forward has no ``adapter_names`` argument, so we hand it to each PEFT LoRA layer with a
    forward pre-hook. Under gradient checkpointing, enable it with ``checkpoint_keeping_adapter_routing`` so that
    backward recomputes each block with the same routing.
    """
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [module.register_forward_pre_hook(inject, with_kwargs=True)
               for module in unet.modules() if isinstance(module, LoraLayer)]
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
                    guidance_scale: float, eta: float | None) -> list[StepKernel]:
    """The step kernel of each named adapter ("__base__": the reference), from one batched forward.

    ``names=None`` runs the UNet as it is configured (the soup: its weighted adapters all active). A learned
    variance that is not a positive finite number is refused, naming the adapter and the timestep.
    """
    batch, groups = len(latents), len(names or [None])
    guided = negative is not None and guidance_scale > 1.0
    halves = 2 if guided else 1
    rows = torch.cat([latents] * groups * halves).to(positive.dtype)  # the UNet runs in the pipeline's dtype
    embeds = torch.cat(([negative, positive] if guided else [positive]) * groups)
    if names is None:
        output = unet(rows, timestep, embeds).sample
    else:
        with mixed_adapter_batch(unet, [name for name in names for _ in range(batch * halves)]):
            output = unet(rows, timestep, embeds).sample
    kernels = []
    for chunk in output.chunk(groups):
        if guided:
            unconditional, conditional = chunk.chunk(2)
            chunk = apply_guidance(unconditional, conditional, latents.shape[1], guidance_scale)
        kernels.append(step_kernel(scheduler, chunk, timestep, latents, eta=eta))
    described = ["the UNet with its active adapters"] if names is None else [
        "the base model" if name == BASE else f"adapter {name!r}" for name in names]
    check_learned_variances(scheduler, kernels, described, timestep)
    return kernels
