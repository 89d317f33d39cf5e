"""What ``msdda fuse`` samples: a dataclass loaded from YAML (``--config``), with command-line flags over it."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FuseConfig"]


@dataclass
class FuseConfig:
    """What ``msdda fuse`` samples; a YAML file (``--config``) holds these keys, and flags override them."""

    base: str = "world"
    adapters: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    betas: list[float] | None = None
    beta: float | None = None
    method: str = "msdda"
    rewards: list[str] = field(default_factory=list)
    """Rewards for method 'code' (one per adapter)."""
    prompts: list[str] | str = field(default_factory=list)
    """A list, a text/table file, or 'hub:<dataset>' (see msdda.prompts)."""
    num_prompts: int | None = None
    seeds: str = "0-7"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    out: str = "runs/fuse"
    device: str = "auto"
    """Where to sample: auto (the GPU when there is one), cpu, cuda or cuda:N."""
