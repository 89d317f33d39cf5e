"""Before and after: an adapter against its base on the same prompts and seeds, with its KL to the base.

For each (prompt, seed) the base and the adapter start from the same noise and draw the same per-step noise,
so the reward differences are paired. The KL is the trajectory's sum over steps of KL(pi_theta(.|x_t) ||
p_ref(.|x_t)) along the adapter's own samples: the quantity the step-level objective charges beta for. On a
base whose UNet predicts its variance (``learned_range``), the report adds how far the adapter moved it: per
timestep, the ratio of the adapter's step variance to the base's at the same x_t, along the adapter's samples.
"""

from __future__ import annotations

import json
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
    resolve_device,
    uses_guidance,
)
from msdda.kernels import StepKernel, kernel_kl, learns_variance
from msdda.models import family_of
from msdda.prompts import load_prompts
from msdda.sampling import denoise

__all__ = ["evaluate_adapter"]


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


def evaluate_adapter(adapter: str, rewards: list[str] | None = None, prompts: list[str] | str = "world",
                     num_prompts: int | None = 32, seeds: list[int] = (0, 1, 2, 3), batch_size: int = 16,
                     out: str | Path | None = None, grid_prompts: int = 8, device: str = "auto") -> dict:
    """Rewards (mean, std, paired difference with its standard error) of base and adapter, and the KL.

    ``rewards`` default to the one the adapter was trained on. With ``out``, writes ``evaluation.json`` and
    ``before_after.png`` (rows: prompts; each row the base's samples, then the adapter's) there. ``device``:
    auto (the GPU when there is one), cpu, cuda or cuda:N.
    """
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward

    where = resolve_device(device)
    pipeline = MSDDAPipeline.from_pretrained(_base_of(adapter), adapters=[adapter]).to(where)
    metadata = pipeline.adapters[0].metadata
    names = list(rewards) if rewards else [metadata.reward_name]
    scorers = [load_reward(name) for name in rewards] if rewards else [metadata.trained_reward()]
    scorers = [scorer.to(where) for scorer in scorers]
    prompt_list = load_prompts(prompts, num_prompts)
    scores = {side: {n: [] for n in names} for side in ("base", "adapter")}
    kls, pictures, variance_ratios = [], {"base": [], "adapter": []}, {}
    chunks = [(seed, start) for seed in seeds for start in range(0, len(prompt_list), batch_size)]
    for seed, start in tqdm(chunks, desc="evaluate", mininterval=2):
        batch = prompt_list[start:start + batch_size]
        for side, name in (("base", BASE), ("adapter", pipeline.adapters[0].name)):
            images, kl, ratios = _sample(pipeline, batch, seed * 10_000 + start, name, metadata)
            for timestep, values in ratios.items():
                variance_ratios.setdefault(timestep, []).extend(values)
            for reward_name, scorer in zip(names, scorers):
                scores[side][reward_name].extend(scorer(images, batch).tolist())
            if side == "adapter":
                kls.extend(kl.tolist())
            if start == 0 and seed in seeds[:2]:
                pictures[side].append(images[:grid_prompts].cpu())
    report = {"adapter": str(adapter), "reward_trained": metadata.reward_name, "beta": metadata.beta,
              "samples": len(kls), "prompts": len(prompt_list), "seeds": list(seeds), "rewards": {},
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
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=2))
        _before_after_grid(pipeline, pictures, out / "before_after.png")
    return report


def _base_of(adapter: str) -> str:
    from msdda.adapters import load_adapter_metadata, resolve_adapter

    return load_adapter_metadata(resolve_adapter(adapter)).base_model


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
