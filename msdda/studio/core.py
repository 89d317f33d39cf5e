"""The studio's logic, apart from any UI: one loaded pipeline and its rewards, and a render per control change.

    studio = Studio.load("world", ["runs/world_aesthetic/final", "runs/world_thirds/final"])
    shown = studio.render([0.3, 0.7], method="msdda", prompt="a red circle on the left", seed=0)
    shown.samples[0].image, shown.samples[0].scores, shown.samples[0].kl_to_base
    quick = studio.render([0.3, 0.7], defer_kl=True)   # the images and scores first; KLs None
    measured = quick.with_kl()                          # then the path KLs along the same trajectories

The pipeline and the adapters load once; a render is one pipeline call for the whole grid, so moving a weight
costs one sampling of a few images and nothing else. Each grid is one batch drawn from one generator seeded with
``seed``: the same seed gives the same noise for every weight and method, so what changes between two renders is
the weights' (or the method's) doing alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from msdda.diffusion import BASE, images_to_pil, resolve_device
from msdda.errors import UserError
from msdda.fuse.methods import PathKL, get_method, method_names
from msdda.fuse.pipeline import MSDDAPipeline
from msdda.rewards import Reward, load_reward

__all__ = ["Studio", "Sample", "Render", "GRID_SIZE", "format_kl"]

GRID_SIZE = 4
"""Images per render: few enough that a weight change shows in well under a second on two CPU cores."""


def format_kl(value: float | None) -> str:
    """A path KL as the page shows it: ``n/a`` for a method without a Gaussian kernel (CoDe), whose KL is NaN, and
    ``…`` while it is being measured (None)."""
    if value is None:
        return "…"
    return "n/a" if math.isnan(value) else f"{value:.4g}"


@dataclass(frozen=True)
class Sample:
    """One image of a render with what the page writes under it."""

    image: object
    """A PIL image, the pipeline's own conversion of its [0, 1] output."""
    prompt: str
    scores: dict[str, float]
    """Reward name -> this image's score."""
    kl_to_base: float | None
    """Path KL to the base along the sample's own trajectory; NaN for a method without a Gaussian kernel; None
    until a deferred measurement is done (:meth:`Render.with_kl`)."""


@dataclass(frozen=True)
class Render:
    """The grid one setting of the controls gives."""

    method: str
    weights: tuple[float, ...]
    seed: int
    samples: list[Sample]
    seconds: float
    """Wall time of the sampling call, reward scoring and image conversion."""
    kl_seconds: float = 0.0
    """Wall time of the path-KL measurement that :meth:`with_kl` ran after the images (0: measured with them)."""
    _deferred_kl: PathKL | None = field(default=None, repr=False, compare=False)

    @property
    def kl_pending(self) -> bool:
        """The samples' path KLs wait for :meth:`with_kl` (``render(defer_kl=True)``)."""
        return self._deferred_kl is not None

    def with_kl(self) -> Render:
        """This render with its samples' path KLs, measured now along their trajectories if they were deferred."""
        if self._deferred_kl is None:
            return self
        started = time.perf_counter()
        kl = self._deferred_kl.complete().totals[BASE].tolist()
        return replace(self, samples=[replace(sample, kl_to_base=value) for sample, value in zip(self.samples, kl)],
                       kl_seconds=time.perf_counter() - started, _deferred_kl=None)

    def table(self) -> str:
        """Each image's reward scores and path KL to the base as a Markdown table, a column per image in the
        grid's order (#1, #2, ...): the page shows it under the grid, whose captions would cut long text."""
        columns = [f"#{i + 1}" for i in range(len(self.samples))]
        rows = [[name, *(f"{s.scores[name]:.3f}" for s in self.samples)] for name in self.samples[0].scores]
        rows.append(["path KL to base", *(format_kl(s.kl_to_base) for s in self.samples)])
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [["", *columns], ["---"] * (len(columns) + 1),
                                                                         *rows])


class Studio:
    """One :class:`MSDDAPipeline` with K reward adapters and one reward per adapter, loaded once.

    ``rewards`` score the samples (one per adapter, in the adapters' order) and are what CoDe, which scores
    while it samples, is given.
    """

    def __init__(self, pipeline: MSDDAPipeline, rewards: Sequence[Reward]) -> None:
        if len(rewards) != len(pipeline.adapters):
            raise UserError(f"got {len(rewards)} rewards for {len(pipeline.adapters)} adapters; give one reward per "
                            "adapter (or none: each adapter's own, from its metadata)")
        self.pipeline = pipeline
        self.rewards = list(rewards)

    @classmethod
    def load(cls, base: str, adapters: Sequence[str], betas: list[float] | None = None,
             rewards: Sequence[str] | None = None, device: str = "auto") -> Studio:
        """Load the base with its adapters and the rewards (default: the reward each adapter was trained on)."""
        if rewards and len(rewards) != len(adapters):
            raise UserError(f"got {len(rewards)} rewards for {len(adapters)} adapters; give one reward per adapter")
        target = resolve_device(device)
        pipeline = MSDDAPipeline.from_pretrained(base, adapters=list(adapters), betas=betas).to(target)
        pipeline.set_progress_bar_config(disable=True)
        if rewards:
            loaded = [load_reward(name) for name in rewards]
        else:
            loaded = []
            for adapter in pipeline.adapters:
                if adapter.metadata is None:
                    raise UserError(f"adapter {adapter.source} has no msdda metadata naming its reward; give one "
                                    "reward per adapter (--reward)")
                loaded.append(adapter.metadata.trained_reward())
        return cls(pipeline, [reward.to(target) for reward in loaded])

    @property
    def adapter_labels(self) -> list[str]:
        """A short label per adapter for its weight slider: the reward it was trained on, else its source."""
        return [adapter.metadata.reward_name if adapter.metadata is not None else adapter.source
                for adapter in self.pipeline.adapters]

    @property
    def reward_names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    @property
    def is_world(self) -> bool:
        """The base is the embedded world, whose prompts follow a grammar the page offers as pickers."""
        return self.pipeline.base_model == "world"

    def default(self, field: str, fallback: float) -> float:
        """A sampling setting as the adapters' metadata records it (steps, guidance, eta), for the controls."""
        return self.pipeline.recorded(field, fallback)

    def check(self, weights: Sequence[float], method: str, beta: float | None, steps: int, guidance: float,
              prompts: Sequence[str]) -> None:
        """Refuse what the controls can get wrong with a message the page shows: the rest (weights off the
        method's domain, a precision that is not positive) the pipeline itself refuses with a UserError."""
        if method not in method_names():
            raise UserError(f"method {method!r} is not one of {method_names()}")
        if len(weights) != len(self.pipeline.adapters):
            raise UserError(f"got {len(weights)} weights for {len(self.pipeline.adapters)} adapters")
        if any(not math.isfinite(w) for w in weights):
            raise UserError(f"weights must be numbers, got {list(weights)}")
        if beta is not None and not beta > 0:
            raise UserError(f"beta must be > 0 (the fused objective's KL weight), got {beta}; the adapters' "
                            f"are {self.pipeline.betas}")
        if int(steps) != steps or steps < 1:
            raise UserError(f"steps must be a whole number >= 1, got {steps}")
        if not guidance >= 0:
            raise UserError(f"guidance must be >= 0, got {guidance}")
        if not prompts or any(not prompt.strip() for prompt in prompts):
            raise UserError("the prompt is empty; write one (e.g. 'a red circle on the left' on the world)")
        if self.is_world:
            from msdda.world.data import parse_prompt

            for prompt in prompts:
                parse_prompt(prompt)

    def render(self, weights: Sequence[float], method: str = "msdda", beta: float | None = None, steps: int = 10,
               guidance: float = 3.0, seed: int = 0, prompt: str | Sequence[str] = "a red circle on the left",
               size: int = GRID_SIZE, code_candidates: int = 20, code_block: int = 5,
               defer_kl: bool = False) -> Render:
        """Sample ``size`` images of ``prompt`` (or one per prompt of a list) fused by ``method`` at ``weights``,
        from one generator seeded with ``seed``; score each with every reward and measure its path KL to the base.
        With ``defer_kl`` the KL's forwards wait for the render's :meth:`Render.with_kl`, so the images and scores
        come about a quarter sooner with three adapters (the page shows them, then the KLs).

        Raises :class:`UserError` for bad input, from :meth:`check` or the pipeline; nothing else is caught.
        """
        prompts = [prompt] * size if isinstance(prompt, str) else list(prompt)
        self.check(weights, method, beta, steps, guidance, prompts)
        fusion = get_method(method)
        started = time.perf_counter()
        output = self.pipeline(prompts, weights=list(weights), method=method, beta=beta,
                               num_inference_steps=int(steps), guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(int(seed)), output_type="pt",
                               rewards=self.rewards if fusion.needs_rewards else None,
                               code_candidates=code_candidates, code_block=code_block, return_kl=True,
                               defer_kl=defer_kl)
        images = output.images
        scores = {reward.name: reward(images, prompts).tolist() for reward in self.rewards}
        deferred = output.path_kl if output.path_kl.waiting_steps else None
        kl = [None] * len(prompts) if deferred is not None else output.kl_to_base.tolist()
        pictures = images_to_pil(self.pipeline, images)
        samples = [Sample(picture, text, {name: values[i] for name, values in scores.items()}, kl[i])
                   for i, (picture, text) in enumerate(zip(pictures, prompts))]
        return Render(method, tuple(float(w) for w in weights), int(seed), samples, time.perf_counter() - started,
                      _deferred_kl=deferred)
