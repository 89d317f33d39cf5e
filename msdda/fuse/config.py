"""What ``msdda fuse`` samples: a dataclass loaded from YAML (``--config``), with command-line flags over it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from msdda.errors import UserError
from msdda.prompts import check_prompts_spec
from msdda.utils import parse_seeds

__all__ = ["SamplingConfig", "FuseConfig", "BUILTIN_METHODS"]

BUILTIN_METHODS = ("msdda", "soup", "output-average", "diffusion-blend", "code", "rgg", "single", "base")
"""The built-in fusion methods, in the order msdda.fuse.methods registers them: what ``msdda fuse --help`` lists
without importing the registry (which imports torch); tests/test_fuse_methods.py checks that the two agree."""


@dataclass
class SamplingConfig:
    """What every command that samples K adapters shares (``msdda fuse`` and ``msdda sweep``)."""

    base: str = "world"
    """The base pipeline the adapters were trained on: a folder, a Hub id, or 'world' (the embedded one)."""
    adapters: list[str] = field(default_factory=list)
    """The K reward adapters (folders written by ``msdda train``, or Hub ids), in the order of the weights."""
    betas: list[float] | None = None
    """The adapters' KL weights, when their metadata lacks them."""
    beta: float | None = None
    """The fused objective's KL weight: MSDDA's exponents l_i = w_i beta_i / beta and the beta of the regularised
    objective sum_i w_i r_i - beta KL (default: sum_i w_i beta_i / sum_i w_i, the adapters' common beta when they
    share one; with it, weights on the simplex need no reference kernel)."""
    prompts: list[str] | str = "world"
    """A list, a text/table file, 'hub:<dataset>' (see msdda.prompts), or 'world' (the embedded world's
    training prompts)."""
    num_prompts: int | None = None
    """Use this many prompts, evenly spaced through the list (None: all)."""
    seeds: str = "0-7"
    """One image per prompt and seed: '0-15' or '1,4,9'."""
    num_inference_steps: int | None = None
    """Default: the adapters' own (from their metadata); likewise guidance_scale and eta."""
    guidance_scale: float | None = None
    eta: float | None = None
    rgg_scale: float | Literal["optimal"] = "optimal"
    """Method rgg's step scale: 'optimal' (s_t^2 / beta, the first-order optimum of each step's objective for the
    weighted reward; the variance-proportional scale of Diffusion Blend's RGG baseline) or a number > 0 (the same
    scale at every stochastic step, in latent units per unit of reward gradient)."""
    device: str = "auto"
    """Where to sample: auto (the GPU when there is one), cpu, cuda or cuda:N."""


@dataclass
class FuseConfig(SamplingConfig):
    """What ``msdda fuse`` samples; a YAML file (``--config``) holds these keys, and flags override them."""

    prompts: list[str] | str = field(default_factory=list)
    """The prompts to sample (required): a list, a text/table file, 'hub:<dataset>', or 'world'."""
    weights: list[float] | None = None
    """One weight per adapter (default: equal weights summing to 1)."""
    method: str = "msdda"
    """The fusion method: msdda or a baseline (see ``msdda fuse --help``)."""
    rewards: list[str] = field(default_factory=list)
    """Rewards for methods that call them while sampling ('code'; 'rgg', differentiable ones), one per adapter."""
    out: str = "runs/fuse"
    """Folder for the PNGs, grid.png and settings.json."""

    def validate(self) -> None:
        """Refuse bad settings before any model loads; each message names the key and the fix."""
        from msdda.fuse.closed_form import exponents
        from msdda.fuse.methods import get_method
        from msdda.fuse.methods.rgg import check_rgg_scale

        method = get_method(self.method)
        if not self.prompts:
            raise UserError("give at least one --prompt (or --prompts-file, or prompts: in --config)")
        check_prompts_spec(self.prompts)
        if method.needs_adapters and not self.adapters:
            raise UserError("give the adapters to fuse: --adapter A --adapter B (or adapters: in --config)")
        if self.weights is not None:
            if len(self.weights) != len(self.adapters):
                raise UserError(f"weights {self.weights} has {len(self.weights)} values for {len(self.adapters)} "
                                "adapters; give one weight per adapter")
            exponents(self.weights)  # non-negative, finite, not all zero
        if self.betas is not None and len(self.betas) != len(self.adapters):
            raise UserError(f"betas {self.betas} has {len(self.betas)} values for {len(self.adapters)} adapters; "
                            "give one beta per adapter")
        if method.needs_rewards and len(self.rewards) != len(self.adapters):
            raise UserError(f"method {self.method!r} scores samples while sampling: give one --reward per adapter "
                            f"(got {len(self.rewards)} for {len(self.adapters)})")
        check_rgg_scale(self.rgg_scale)
        parse_seeds(self.seeds)
