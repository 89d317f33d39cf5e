"""Worlds msdda ships so that everything runs and is checked without a model hub.

- ``msdda.world.analytic``: Gaussian data with exact denoiser and exact step optima, for proofs.
- the embedded default: a tiny text-to-image StableDiffusionPipeline of coloured shapes, pretrained by us and
  shipped inside the package, with an attribute classifier for its consistency reward;
- its learned-variance twin (base ``world-lv``): the same pipeline whose UNet also predicts its step variance
  (``variance_type: learned_range``, sampled with DDPM), made by ``msdda.world.learned_variance``;
- its flow-matching twin (base ``world-flow``): a StableDiffusion3Pipeline of the same VAE, text encoder and
  tokenizer around a tiny SD3 transformer trained with rectified flow, made by ``msdda.world.flow``.
"""

from __future__ import annotations

from pathlib import Path

from msdda.bases import register_local_base
from msdda.errors import InputNotFound
from msdda.world.cache import cache_dir

ASSETS = Path(__file__).parent / "assets"

WORLD = "world"
"""The base name of the embedded default world."""
WORLD_LEARNED_VARIANCE = "world-lv"
"""The base name of the embedded world whose UNet predicts its step variance (sample it with ``ddpm``)."""
WORLD_FLOW = "world-flow"
"""The base name of the embedded flow world: a tiny SD3 transformer on the world's data (sample it with ``flow``)."""


LEARNED_VARIANCE = ASSETS / "learned_variance"
"""The shipped learned-variance world: its variance head (``variance_head.safetensors``, the only weights it does
not share with the shipped world) and its ``pretraining.json``."""


FLOW = ASSETS / "flow"
"""The shipped flow world: its transformer and scheduler (the only parts it does not share with the shipped world)
and its ``pretraining.json``."""


def world_path() -> Path:
    """The folder of the shipped pipeline; pass it wherever a base model id or path goes."""
    path = ASSETS / "pipeline"
    if not (path / "model_index.json").is_file():
        raise InputNotFound(f"the shipped world is missing from {path}; reinstall msdda or run "
                                "`msdda world pretrain --out DIR` and pass DIR/pipeline as the base")
    return path


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


def flow_world_path() -> Path:
    """The folder of the flow pipeline (base ``world-flow``, a ``StableDiffusion3Pipeline``; sample it with ``flow``).

    It ships as the shipped world plus a transformer of 9 MB, and is assembled from the two into ``cache_dir()`` on
    first use (a stock pipeline folder, so everything that takes a base folder takes it)."""
    if not (FLOW / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        raise InputNotFound(f"the shipped flow world is missing from {FLOW}; reinstall msdda or run "
                            "`msdda world pretrain --from msdda/world/assets --flow-steps 6000 --out DIR` and pass "
                            "DIR/pipeline as the base")
    from msdda.world.flow import assembled_flow_world

    return assembled_flow_world(world_path(), FLOW, cache_dir())


def classifier_path() -> Path:
    """The folder of the shipped attribute classifier."""
    return ASSETS / "classifier"


register_local_base(WORLD, world_path)
register_local_base(WORLD_LEARNED_VARIANCE, learned_variance_world_path)
register_local_base(WORLD_FLOW, flow_world_path)
