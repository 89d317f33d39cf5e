"""Worlds msdda ships so that everything runs and is checked without a model hub.

- ``msdda.world.analytic``: Gaussian data with exact denoiser and exact step optima, for proofs.
- the embedded default: a tiny text-to-image StableDiffusionPipeline of coloured shapes, pretrained by us and
  shipped inside the package, with an attribute classifier for its consistency reward;
- its learned-variance twin (base ``world-lv``): the same pipeline whose UNet also predicts its step variance
  (``variance_type: learned_range``, sampled with DDPM), made by ``msdda.world.learned_variance``.
"""

from __future__ import annotations

import os
from pathlib import Path

from msdda.errors import InputNotFound

ASSETS = Path(__file__).parent / "assets"


LEARNED_VARIANCE = ASSETS / "learned_variance"
"""The shipped learned-variance world: its variance head (``variance_head.safetensors``, the only weights it does
not share with the shipped world) and its ``pretraining.json``."""


def world_path() -> Path:
    """The folder of the shipped pipeline; pass it wherever a base model id or path goes."""
    path = ASSETS / "pipeline"
    if not (path / "model_index.json").is_file():
        raise InputNotFound(f"the shipped world is missing from {path}; reinstall msdda or run "
                                "`msdda world pretrain --out DIR` and pass DIR/pipeline as the base")
    return path


def cache_dir() -> Path:
    """Where msdda writes what it builds from its shipped files: ``$MSDDA_CACHE``, else ``~/.cache/msdda``."""
    return Path(os.environ.get("MSDDA_CACHE") or Path.home() / ".cache" / "msdda")


def learned_variance_world_path() -> Path:
    """The folder of the learned-variance pipeline (base ``world-lv``; sample it with a DDPM scheduler).

    It ships as the shipped world plus a variance head of 7 kB, and is assembled from the two into
    ``cache_dir()`` on first use (a stock pipeline folder, so everything that takes a base folder takes it)."""
    head = LEARNED_VARIANCE / "variance_head.safetensors"
    if not head.is_file():
        raise InputNotFound(f"the shipped learned-variance world is missing from {LEARNED_VARIANCE}; reinstall msdda "
                            "or run `msdda world pretrain --from msdda/world/assets --learned-variance-steps 600 "
                            "--out DIR` and pass DIR/pipeline as the base")
    from msdda.world.learned_variance import assembled_world

    return assembled_world(world_path(), head, cache_dir())


def classifier_path() -> Path:
    """The folder of the shipped attribute classifier."""
    return ASSETS / "classifier"
