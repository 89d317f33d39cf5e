"""The embedded flow world (base ``world-flow``): the shipped world's data, prompts and rewards, sampled by a tiny SD3
transformer trained with rectified flow, as a stock ``StableDiffusion3Pipeline``.

Everything but the transformer is the shipped world's, so that the two worlds differ only in the model that draws
the images and how it is trained:

- the VAE (32x32 RGB <-> 16x16x4 latents), with SD3's ``shift_factor`` set to 0 (the world's latents are scaled,
  not shifted);
- both CLIP text encoders are the world's ``CLIPTextModel`` as a ``CLIPTextModelWithProjection`` whose projection
  is the identity (SD3 reads the penultimate layer's sequence and the projected pooled token of each), frozen;
  both tokenizers are the world's;
- no T5: ``text_encoder_3`` and ``tokenizer_3`` are None, which diffusers allows. Without T5 the pipeline would
  append ``max_sequence_length`` (256 by default) rows of zeros to the joint text sequence, 20 times the CLIP
  sequence (12 tokens) and 4 times the image's 64 tokens; msdda encodes the flow world's prompts with
  ``max_sequence_length=0`` (``msdda.diffusion.encode_prompts``), so pass ``max_sequence_length=0`` to the stock
  pipeline too;
- the transformer: an ``SD3Transformer2DModel`` (patch 2, 4 joint blocks of width 128, 2.3 M parameters) trained
  on the rectified-flow velocity ``noise - x0`` at noise levels drawn from SD3's shifted schedule (shift 3), with
  10% of prompts dropped for classifier-free guidance and an EMA of the weights. The velocity error at high
  noise is the clean-image error, where a sample's layout is decided, so no layout phase is needed (the UNet
  world's epsilon loss needed one: docs/notes/2026-11-26-layout-phase.md).

msdda ships only the transformer and its scheduler config (``msdda/world/assets/flow``) and assembles the pipeline
from them and the shipped world on first use into ``msdda.world.cache_dir()`` (``assembled_flow_world``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msdda.world.cache import built_once
from msdda.world.data import prompt_for, sample_attributes
from msdda.world.models import TEXT_DIM
from msdda.world.pretrain import (
    PretrainConfig,
    continued_record,
    continued_settings,
    cosine_lr,
    descend,
    layout_data,
    load_world_pipeline,
    repeated_measurements,
    reproducible,
    write_record,
)

__all__ = ["FlowWorldConfig", "build_transformer", "build_flow_scheduler", "flow_pipeline", "assembled_flow_world",
           "rectified_flow_loss", "shifted_sigmas", "pretrain_flow_world", "FLOW_SHIFT"]

FLOW_SHIFT = 3.0
"""The flow world's schedule shift (SD3's): noise levels sigma = shift u / (1 + (shift - 1) u) for uniform u."""


@dataclass
class FlowWorldConfig:
    """Rectified-flow pretraining of the flow world's transformer; seed, data and threads are the continued world's."""

    seed: int = 0
    num_images: int = 24_000
    steps: int = 3_000
    batch: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    shift: float = FLOW_SHIFT
    threads: int = 2


def build_transformer():
    """The flow world's ``SD3Transformer2DModel``: 16x16x4 latents in 2x2 patches (64 image tokens), 4 joint blocks
    of width 128, reading the two CLIP sequences side by side (2 x 64 wide) and their two pooled projections."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_DIM,
                                 caption_projection_dim=128, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=8,
                                 qk_norm="rms_norm")


def build_flow_scheduler(shift: float = FLOW_SHIFT):
    """SD3's ``FlowMatchEulerDiscreteScheduler`` at ``shift`` (no dynamic shifting, no stochastic sampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _projected(text_encoder):
    """``text_encoder`` (the world's ``CLIPTextModel``) as a ``CLIPTextModelWithProjection`` with the identity as its
    projection: SD3's pooled prompt embedding is then the world encoder's own pooled token."""
    from transformers import CLIPTextModelWithProjection

    projected = CLIPTextModelWithProjection(text_encoder.config)
    projected.text_model.load_state_dict(text_encoder.state_dict())  # a CLIPTextModel is the text model itself
    with torch.no_grad():
        projected.text_projection.weight.copy_(torch.eye(*projected.text_projection.weight.shape))
    return projected.eval()


def flow_pipeline(world, transformer, scheduler):
    """A stock ``StableDiffusion3Pipeline`` around ``transformer`` and ``scheduler`` with the parts of ``world`` (the
    world's ``StableDiffusionPipeline``): its VAE (shift factor 0), its text encoder twice, its tokenizer twice,
    no T5."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    vae = copy.deepcopy(world.vae)
    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=_projected(world.text_encoder), tokenizer=world.tokenizer,
                                    text_encoder_2=_projected(world.text_encoder), tokenizer_2=world.tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def _load_parts(parts: Path):
    """The transformer and scheduler saved under ``parts`` (a flow pipeline folder, or the shipped ``assets/flow``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(parts / "transformer", local_files_only=True)
    return transformer.eval(), FlowMatchEulerDiscreteScheduler.from_pretrained(parts / "scheduler",
                                                                               local_files_only=True)


def assembled_flow_world(world_pipeline: Path, parts: Path, cache: Path) -> Path:
    """The flow pipeline folder of ``parts``' transformer and scheduler around ``world_pipeline``'s VAE, text encoder
    and tokenizer, built once under ``cache`` (named by the content of every file it is built from) and reused
    after."""
    sources = [parts / "transformer/diffusion_pytorch_model.safetensors", parts / "transformer/config.json",
               parts / "scheduler/scheduler_config.json", world_pipeline / "vae/diffusion_pytorch_model.safetensors",
               world_pipeline / "text_encoder/model.safetensors"]
    return built_once(cache, "world-flow", sources, lambda: flow_pipeline(load_world_pipeline(world_pipeline),
                                                                          *_load_parts(parts)))


def rectified_flow_loss(transformer, clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                        conditioning: torch.Tensor) -> torch.Tensor:
    """The mean squared error of the predicted velocity against ``noise - clean`` at x = (1 - s) clean + s noise.

    ``sigmas`` ``[B]`` are the noise levels s in (0, 1]; the transformer sees timestep 1000 s, as SD3's scheduler
    gives it. ``conditioning`` is packed as ``msdda.diffusion.encode_prompts`` packs it."""
    from msdda.diffusion import denoiser_forward

    s = sigmas[:, None, None, None]
    velocity = denoiser_forward(transformer, (1 - s) * clean + s * noise, sigmas * 1000, conditioning)
    return F.mse_loss(velocity, noise - clean)


def shifted_sigmas(uniform: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shifted noise levels shift u / (1 + (shift - 1) u) of ``uniform`` u in [0, 1]: a uniform u is the
    schedule's own spacing, so training sees the noise levels sampling visits."""
    return shift * uniform / (1 + (shift - 1) * uniform)


@torch.no_grad()
def _prompt_conditioning(pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed conditioning of each distinct prompt ``[U, L, D]``, each prompt's row in it ``[N]``, the empty
    prompt's conditioning ``[1, L, D]``): the text encoders are frozen, so each distinct prompt is encoded once."""
    from msdda.diffusion import encode_prompts

    distinct = sorted(set(prompts))
    row = {prompt: index for index, prompt in enumerate(distinct)}
    positive, negative = encode_prompts(pipeline, distinct, torch.device("cpu"))
    return positive, torch.tensor([row[prompt] for prompt in prompts]), negative[:1]


def _train_transformer(pipeline, latents: torch.Tensor, prompts: list[str], config: FlowWorldConfig) -> None:
    """AdamW on the transformer alone (cosine schedule, clipped gradients, EMA copied in at the end)."""
    from diffusers.training_utils import EMAModel

    transformer = pipeline.transformer.train()
    conditioning, rows, empty = _prompt_conditioning(pipeline, prompts)
    generator = torch.Generator().manual_seed(config.seed + 13)
    parameters = list(transformer.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-4)
    ema = EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True)
    progress = tqdm(range(config.steps), desc="flow transformer", mininterval=2)
    for step in progress:
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.lr)
        index = torch.randint(0, len(latents), (config.batch,), generator=generator)
        batch_conditioning = conditioning[rows[index]].clone()
        batch_conditioning[torch.rand(config.batch, generator=generator) < config.prompt_dropout] = empty
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = shifted_sigmas(torch.rand(config.batch, generator=generator), config.shift)
        loss = rectified_flow_loss(transformer, clean, noise, sigmas, batch_conditioning)
        descend(loss, optimiser, parameters, [(ema, transformer)])
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(transformer.parameters())
    transformer.eval()


def pretrain_flow_world(world_dir: str | Path, output_dir: str | Path, steps: int, threads: int | None = None) -> Path:
    """Write ``output_dir/{pipeline,classifier,pretraining.json}``: a flow pipeline around ``world_dir``'s VAE, text
    encoder and tokenizer whose transformer was trained from scratch for ``steps`` rectified-flow steps on the
    world's procedural images (``world_dir``'s seed and data); the classifier is ``world_dir``'s, copied.

    ``threads``: torch's CPU threads (default: ``world_dir``'s). On cores shared with other jobs one thread can be
    several times faster than two, whose every operation waits for the slower thread."""
    world_dir, output_dir = Path(world_dir), Path(output_dir)
    earlier = continued_record(world_dir, "--flow-steps", steps)
    settings = continued_settings(earlier)
    config = FlowWorldConfig(**(settings | ({} if threads is None else {"threads": threads})), steps=steps)
    started = time.time()
    world = load_world_pipeline(world_dir / "pipeline")  # before seeding: building the parts draws random numbers
    with reproducible(config):
        pipeline = flow_pipeline(world, build_transformer(), build_flow_scheduler(config.shift))
        latents, _, _ = layout_data(world, PretrainConfig(seed=config.seed, num_images=config.num_images))
        prompts = [prompt_for(a) for a in sample_attributes(config.num_images, config.seed, "train")]
        _train_transformer(pipeline, latents, prompts, config)
    pipeline.save_pretrained(output_dir / "pipeline", safe_serialization=True)
    shutil.copytree(world_dir / "classifier", output_dir / "classifier", dirs_exist_ok=True)
    parameters = sum(p.numel() for p in pipeline.transformer.parameters())
    unchanged = repeated_measurements(earlier)
    write_record(output_dir, "pretrain_flow_world()", config, started, **unchanged, flow=True,
                  transformer_parameters=parameters, continued_from=earlier)
    return output_dir
