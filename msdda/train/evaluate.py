"""Before and after: an adapter against its base on the same prompts and seeds, with its KL to the base.

For each (prompt, seed) the base and the adapter start from the same noise and draw the same per-step noise,
so the reward differences are paired. The KL is the trajectory's sum over steps of KL(pi_theta(.|x_t) ||
p_ref(.|x_t)) along the adapter's own samples: the quantity the step-level objective charges beta for. On a
base whose UNet predicts its variance (``learned_range``), the report adds how far the adapter moved it: per
timestep, the ratio of the adapter's step variance to the base's at the same x_t, along the adapter's samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from msdda.adapters import AdapterMetadata
from msdda.diffusion import (
    BASE,
    adapter_kernels,
    decode_latents,
    denoiser_of,
    encode_prompts,
    images_to_pil,
    prepare_sampling,
    uses_guidance,
)
from msdda.kernels import StepKernel, kernel_kl, learns_variance
from msdda.models import family_of
from msdda.prompts import load_prompts
from msdda.sampling import denoise
from msdda.shards import launch_device, launch_state, own_share
from msdda.train.gauge import GaugeSettings, gauge_adapter

__all__ = ["evaluate_adapter", "reward_arguments"]


@torch.no_grad()
def _sample(pipeline, prompts: list[str], seed: int, name: str, metadata: AdapterMetadata):
    """Images of ``name`` ("__base__": the reference) and, for an adapter, each trajectory's summed KL and, per
    stochastic timestep, each sample's mean over elements of (adapter's variance / base's variance), sampled as the
    adapter was trained (``metadata``: steps, guidance, the sampler's noise setting (DDIM's eta, or a flow noise
    level), resolution and T5 length)."""
    guidance = metadata.guidance_scale
    noise_scale = getattr(metadata, family_of(pipeline).noise_setting)  # eta, or a flow noise level
    positive, negative = encode_prompts(pipeline, prompts, pipeline._execution_device, guidance_scale=guidance,
                                        max_sequence_length=metadata.max_sequence_length,
                                        size=(metadata.resolution, metadata.resolution))
    negative = negative if uses_guidance(negative, guidance) else None
    scheduler, unet = pipeline.scheduler, denoiser_of(pipeline)
    generator = torch.Generator().manual_seed(seed)
    latents = prepare_sampling(pipeline, metadata.num_inference_steps, len(prompts), generator, positive,
                               metadata.resolution, metadata.resolution)
    kl = torch.zeros(len(prompts), dtype=torch.float64)
    variance_ratios: dict[int, list[float]] = {}
    names = [name] if name == BASE else [name, BASE]

    def kernel_at(_index: int, timestep: torch.Tensor, x_t: torch.Tensor) -> StepKernel:
        nonlocal kl
        kernels = adapter_kernels(unet, scheduler, x_t, timestep, positive, negative, names, guidance, noise_scale)
        if name != BASE and not kernels[0].is_deterministic:
            kl += kernel_kl(kernels[0], kernels[1]).double().cpu()
            if learns_variance(scheduler):
                ratio = (kernels[0].variance / kernels[1].variance).flatten(1).mean(1)
                variance_ratios[int(timestep)] = ratio.double().cpu().tolist()
        return kernels[0]

    latents = denoise(scheduler.timesteps, latents, kernel_at, generator, positive)
    return decode_latents(pipeline, latents), kl, variance_ratios


@dataclass
class _Chunk:
    """One batch of prompts at one seed, sampled by the base and by the adapter: each side's scores per reward, the
    adapter's KLs and variance ratios per timestep, and each side's first images for the grid (None: not kept)."""

    scores: dict[str, dict[str, list[float]]]
    kls: list[float]
    variance_ratios: dict[int, list[float]]
    pictures: dict[str, torch.Tensor | None]


def _evaluate_chunk(pipeline, prompts: list[str], seed: int, scorers: dict, metadata: AdapterMetadata,
                    pictured: int) -> _Chunk:
    """The base and the adapter on ``prompts`` from the noise of ``seed``, scored by every reward, keeping the first
    ``pictured`` images of each side."""
    chunk = _Chunk({}, [], {}, {})
    for side, name in (("base", BASE), ("adapter", pipeline.adapters[0].name)):
        images, kl, ratios = _sample(pipeline, prompts, seed, name, metadata)
        chunk.scores[side] = {reward_name: scorer(images, prompts).tolist() for reward_name, scorer in scorers.items()}
        chunk.pictures[side] = images[:pictured].cpu() if pictured else None
        if side == "adapter":
            chunk.kls, chunk.variance_ratios = kl.tolist(), ratios
    return chunk


def _variance_report(ratios: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    """Per timestep (highest noise first): the mean over samples of the adapter-to-base variance ratio, its
    standard error, and its smallest and largest sample."""
    report = {}
    for timestep in sorted(ratios, reverse=True):
        values = np.asarray(ratios[timestep])
        report[str(timestep)] = {"mean": float(values.mean()),
                                 "sem": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0,
                                 "min": float(values.min()), "max": float(values.max())}
    return report


def reward_arguments(metadata: AdapterMetadata, spec: str, given: dict | None = None) -> tuple[dict, str]:
    """The constructor arguments to score reward ``spec`` with, and where they came from in words.

    For the reward the adapter was trained on (named by its import path ``reward_spec`` or its name), the ones
    training recorded (``reward_kwargs``) with ``given`` over them: scoring a user reward at its defaults when it
    was trained with other arguments measures another reward. Another reward gets ``given`` (or its defaults)."""
    given = dict(given or {})
    if spec not in {metadata.reward_spec, metadata.reward_name} - {""}:
        return given, "given" if given else "the reward's defaults"
    recorded = dict(metadata.reward_kwargs)
    if not given:
        return recorded, "recorded in the adapter" if recorded else "the reward's defaults (the adapter records none)"
    return recorded | given, "recorded in the adapter, with the given ones over them" if recorded else "given"


def evaluate_adapter(adapter: str, rewards: list[str] | None = None, prompts: list[str] | str = "world",
                     num_prompts: int | None = 32, seeds: list[int] = (0, 1, 2, 3), batch_size: int = 16,
                     out: str | Path | None = None, grid_prompts: int = 8, device: str = "auto",
                     reward_kwargs: dict | None = None, gauge_prompts: int = 16, gauge_draws: int = 2,
                     gauge_beta: float | None = None) -> dict:
    """Rewards (mean, std, paired difference with its standard error) of base and adapter, the KL, and the
    optimality gauge (msdda.train.gauge) for the reward it was trained on.

    ``rewards`` default to the one the adapter was trained on, which is scored with the constructor arguments
    training recorded, ``reward_kwargs`` over them (:func:`reward_arguments`; the report's ``reward_kwargs`` says
    which were used). With ``out``, writes ``evaluation.json`` and ``before_after.png`` (rows: prompts; each row the
    base's samples, then the adapter's) there. ``device``: auto (the GPU when there is one), cpu, cuda or cuda:N.
    The adapter, the rewards and the prompts are checked before the base loads. Under ``accelerate launch`` the
    processes share the (seed, prompt batch) chunks (msdda.shards) and every process gets the same rewards and KLs as
    one process would; the main process alone runs the gauge and writes files (the others' reports lack the gauge).

    The gauge reads held-out states of ``gauge_prompts`` of the prompts (0: no gauge; it is skipped where the trained
    reward is not among those scored, or has no gradients) at ``gauge_beta`` (default the adapter's), with
    ``gauge_draws`` draws per state; its implied beta is the beta at which the adapter is step-optimal, which
    calibrates an adapter trained at another or unknown beta for fusion (``--betas``).
    """
    from msdda.adapters import load_adapter_metadata, resolve_adapter
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward

    state = launch_state()
    where = launch_device(device, state)
    metadata = load_adapter_metadata(resolve_adapter(adapter))
    specs = list(rewards) if rewards else [metadata.reward_spec or metadata.reward_name]
    names = list(rewards) if rewards else [metadata.reward_name]  # the report's labels
    arguments = {name: reward_arguments(metadata, spec, reward_kwargs) for name, spec in zip(names, specs)}
    scorers = [load_reward(spec, **arguments[name][0]).to(where) for name, spec in zip(names, specs)]
    prompt_list = load_prompts(prompts, num_prompts)
    pipeline = MSDDAPipeline.from_pretrained(metadata.base_model, adapters=[adapter]).to(where)
    chunks = [(seed, start) for seed in seeds for start in range(0, len(prompt_list), batch_size)]
    pictured = {(seed, 0) for seed in seeds[:2]}
    shared = own_share(list(enumerate(chunks)), state)
    results = [(index, _evaluate_chunk(pipeline, prompt_list[start:start + batch_size], seed * 10_000 + start,
                                       dict(zip(names, scorers)), metadata,
                                       grid_prompts if (seed, start) in pictured else 0))
               for index, (seed, start) in tqdm(shared, desc="evaluate", mininterval=2, disable=not state.is_main_process)]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    scores = {side: {n: [] for n in names} for side in ("base", "adapter")}
    kls, pictures, variance_ratios = [], {"base": [], "adapter": []}, {}
    for _, chunk in sorted(results, key=lambda item: item[0]):  # in chunk order, however the processes shared them
        for side in ("base", "adapter"):
            for name in names:
                scores[side][name].extend(chunk.scores[side][name])
            if chunk.pictures[side] is not None:
                pictures[side].append(chunk.pictures[side])
        kls.extend(chunk.kls)
        for timestep, values in chunk.variance_ratios.items():
            variance_ratios.setdefault(timestep, []).extend(values)
    report = {"adapter": str(adapter), "weights": metadata.weights, "reward_trained": metadata.reward_name,
              "beta": metadata.beta,
              "samples": len(kls), "prompts": len(prompt_list), "seeds": list(seeds), "rewards": {},
              "reward_kwargs": {name: {"kwargs": kwargs, "from": source} for name, (kwargs, source) in arguments.items()},
              "kl_to_base": {"mean": float(np.mean(kls)), "std": float(np.std(kls))}}
    for name in names:
        before, after = np.asarray(scores["base"][name]), np.asarray(scores["adapter"][name])
        difference = after - before
        report["rewards"][name] = {
            "base_mean": float(before.mean()), "base_std": float(before.std()),
            "adapter_mean": float(after.mean()), "adapter_std": float(after.std()),
            "paired_difference": float(difference.mean()),
            "paired_difference_sem": float(difference.std(ddof=1) / np.sqrt(len(difference))),
        }
    if variance_ratios:
        report["variance_ratio_to_base"] = _variance_report(variance_ratios)
    own = {metadata.reward_spec, metadata.reward_name} - {""}
    trained = next((scorer for spec, scorer in zip(specs, scorers) if spec in own), None)
    if gauge_prompts and trained is not None and trained.differentiable and state.is_main_process:
        shown = load_prompts(prompt_list, gauge_prompts)  # evenly spaced through the evaluation's
        report["optimality"] = gauge_adapter(pipeline, denoiser_of(pipeline), pipeline.adapters[0].name, trained,
                                             metadata, GaugeSettings(prompts=shown, draws=gauge_draws,
                                                                     batch_size=batch_size), beta=gauge_beta)
    if out is not None and state.is_main_process:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=2))
        _before_after_grid(pipeline, pictures, out / "before_after.png")
    return report


def _before_after_grid(pipeline, pictures: dict, path: Path) -> None:
    from msdda.utils import image_grid

    before, after = torch.cat(pictures["base"], dim=0), torch.cat(pictures["adapter"], dim=0)
    per_seed = len(pictures["base"])
    rows = len(before) // per_seed
    ordered = []
    for row in range(rows):  # a row per prompt: base at each seed, then the adapter at each seed
        ordered += [before[seed * rows + row] for seed in range(per_seed)]
        ordered += [after[seed * rows + row] for seed in range(per_seed)]
    pil = images_to_pil(pipeline, torch.stack(ordered))
    image_grid(pil, columns=2 * per_seed).save(path)
