"""Worlds msdda ships so that everything runs and is checked without a model hub.

- ``msdda.world.analytic``: Gaussian data with exact denoiser and exact step optima, for proofs.
- the embedded default: a tiny text-to-image StableDiffusionPipeline of coloured shapes, pretrained by us and
  shipped inside the package, with an attribute classifier for its consistency reward;
- its learned-variance twin (base ``world-lv``): the same pipeline whose UNet also predicts its step variance
  (``variance_type: learned_range``, sampled with DDPM), made by ``msdda.world.learned_variance``.
"""

from __future__ import annotations

from pathlib import Path

from msdda.errors import InputNotFound

ASSETS = Path(__file__).parent / "assets"


LEARNED_VARIANCE = ASSETS / "learned_variance"
"""The shipped learned-variance world: ``pipeline/`` and its ``pretraining.json``."""


def world_path() -> Path:
    """The folder of the shipped pipeline; pass it wherever a base model id or path goes."""
    path = ASSETS / "pipeline"
    if not (path / "model_index.json").is_file():
        raise InputNotFound(f"the shipped world is missing from {path}; reinstall msdda or run "
                                "`msdda world pretrain --out DIR` and pass DIR/pipeline as the base")
    return path


def learned_variance_world_path() -> Path:
    """The folder of the shipped learned-variance pipeline (base ``world-lv``; sample it with a DDPM scheduler)."""
    path = LEARNED_VARIANCE / "pipeline"
    if not (path / "model_index.json").is_file():
        raise InputNotFound(f"the shipped learned-variance world is missing from {path}; reinstall msdda or run "
                            "`msdda world pretrain --from msdda/world/assets --learned-variance-steps 2000 --out DIR` "
                            "and pass DIR/pipeline as the base")
    return path


def classifier_path() -> Path:
    """The folder of the shipped attribute classifier."""
    return ASSETS / "classifier"
