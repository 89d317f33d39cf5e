"""Sample grids from the embedded world (or any StableDiffusionPipeline folder)."""

from __future__ import annotations

from pathlib import Path

import torch

from msdda.diffusion import WORLD, WORLD_LEARNED_VARIANCE, resolve_base
from msdda.errors import InputNotFound, UserError
from msdda.utils import image_grid
from msdda.world.data import parse_prompt


def load_pipeline(base: str | Path | None = None):
    """A StableDiffusionPipeline from a local folder or a shipped world's name ("world", "world-lv"; default: the
    shipped world), offline and on CPU."""
    from diffusers import StableDiffusionPipeline

    folder = Path(resolve_base(str(base) if base is not None else WORLD))
    if not (folder / "model_index.json").is_file():
        raise InputNotFound(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_grid(prompt: str, num_images: int, seed: int, out: str | Path, base: str | Path | None = None,
                num_inference_steps: int = 20, guidance_scale: float = 3.0, eta: float = 1.0) -> Path:
    """Sample ``num_images`` for ``prompt`` and write them as one grid PNG; returns its path."""
    if base in (None, WORLD, WORLD_LEARNED_VARIANCE):
        parse_prompt(prompt)  # the shipped worlds only know their grammar: say so before any work
    if num_images < 1:
        raise UserError(f"--n must be at least 1, got {num_images}")
    pipeline = load_pipeline(base)
    images = pipeline([prompt] * num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      eta=eta, generator=torch.Generator().manual_seed(seed)).images
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    return out
