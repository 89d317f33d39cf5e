"""Sample grids from the embedded worlds (or any pipeline folder of a family msdda supports)."""

from __future__ import annotations

from pathlib import Path

import torch

from msdda.diffusion import absent_components, pipeline_class_name, resolve_base
from msdda.errors import InputNotFound, UserError
from msdda.models import family_named, family_of
from msdda.utils import image_grid
from msdda.world import WORLD, WORLD_FLOW, WORLD_LEARNED_VARIANCE
from msdda.world.data import parse_prompt

SHIPPED_WORLDS = (WORLD, WORLD_LEARNED_VARIANCE, WORLD_FLOW)
"""The base names of the worlds msdda ships, which all know only the world's grammar."""


def load_pipeline(base: str | Path | None = None):
    """The stock pipeline of a local folder or a shipped world's name ("world", "world-lv", "world-flow"; default:
    the shipped world), offline and on CPU: a StableDiffusionPipeline, or a StableDiffusion3Pipeline for a flow
    world."""
    name = str(base) if base is not None else WORLD
    folder = Path(resolve_base(name))
    if not (folder / "model_index.json").is_file():
        raise InputNotFound(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipeline = family_named(pipeline_class_name(name)).pipeline_class.from_pretrained(
        folder, local_files_only=True, **absent_components(str(folder)))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampler_arguments(pipeline, eta: float) -> dict:
    """The stock ``__call__``'s sampler keywords for ``pipeline``: DDIM's ``eta`` for a UNet world; for a flow world
    (which samples with its Euler ODE step) none, but ``max_sequence_length=0`` where it has no T5, as msdda encodes
    its prompts (``msdda.diffusion.encode_prompts``)."""
    return family_of(pipeline).stock_sampler_arguments(pipeline, eta)


def sample_grid(prompt: str, num_images: int, seed: int, out: str | Path, base: str | Path | None = None,
                num_inference_steps: int = 20, guidance_scale: float = 3.0, eta: float = 1.0) -> Path:
    """Sample ``num_images`` for ``prompt`` and write them as one grid PNG; returns its path."""
    if base is None or base in SHIPPED_WORLDS:
        parse_prompt(prompt)  # the shipped worlds only know their grammar: say so before any work
    if num_images < 1:
        raise UserError(f"--n must be at least 1, got {num_images}")
    pipeline = load_pipeline(base)
    images = pipeline([prompt] * num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed), **sampler_arguments(pipeline, eta)).images
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    return out
