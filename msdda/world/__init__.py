"""Worlds msdda ships so that everything runs and is checked without a model hub.

- ``msdda.world.analytic``: Gaussian data with exact denoiser and exact step optima, for proofs.
- the embedded default: a tiny text-to-image StableDiffusionPipeline of coloured shapes, pretrained by us and
  shipped inside the package, with an attribute classifier for its consistency reward.
"""

from __future__ import annotations

from pathlib import Path

from msdda.errors import InputNotFound

ASSETS = Path(__file__).parent / "assets"


def world_path() -> Path:
    """The folder of the shipped pipeline; pass it wherever a base model id or path goes."""
    path = ASSETS / "pipeline"
    if not (path / "model_index.json").is_file():
        raise InputNotFound(f"the shipped world is missing from {path}; reinstall msdda or run "
                                "`msdda world pretrain --out DIR` and pass DIR/pipeline as the base")
    return path


def classifier_path() -> Path:
    """The folder of the shipped attribute classifier."""
    return ASSETS / "classifier"
