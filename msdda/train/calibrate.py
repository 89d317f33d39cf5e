"""Calibrate an adapter's per-step scales (msdda.step_scales) to its restricted step optimum, by the gauge.

Each round gauges the adapter at its current factors (msdda.train.gauge, on held-out states from the reference and
from the adapter) and multiplies each step's factor by the best multiple of that step's shift (0 where the shift goes
against the reward's gradient), where the gauge measures that multiple well enough. The map from factor to mean shift
is linear to first order only, so a few rounds settle it; the last gauge is of the factors returned.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

from msdda.adapters import AdapterMetadata
from msdda.errors import UserError
from msdda.fuse.optimality import FAR_FROM_OPTIMUM_WARNING
from msdda.step_scales import StepScale, register_step_scales, rescaled_factors
from msdda.train.gauge import GaugeSettings, gauge_adapter

__all__ = ["calibrate_step_scales", "calibrate_adapter", "pooled_steps"]


def pooled_steps(report: dict) -> tuple[list[int], list[float], list[float], list[float], list[float]]:
    """Per step of a gauge report, over both sources' states: (step indices, timesteps, summed gain <d, g>, its
    standard error, summed KL)."""
    steps: dict[int, list] = {}
    for rows in report["sources"].values():
        for row in rows:
            pooled = steps.setdefault(row["step"], [row["timestep"], 0.0, 0.0, 0.0])
            pooled[1] += row["gain"] * row["states"]
            pooled[2] += (row["gain_sem"] * row["states"]) ** 2
            pooled[3] += row["kl"] * row["states"]
    order = sorted(steps)
    return (order, [steps[s][0] for s in order], [steps[s][1] for s in order], [steps[s][2] ** 0.5 for s in order],
            [steps[s][3] for s in order])


def calibrate_step_scales(pipeline, denoiser, adapter: str, reward, metadata: AdapterMetadata,
                          settings: GaugeSettings, beta: float, rounds: int = 3, largest: float = 4.0,
                          progress=None, gauge: dict | None = None) -> tuple[list[StepScale], dict]:
    """Fit ``denoiser``'s adapter ``adapter`` (PEFT's name) per step to its step optimum for ``reward`` at ``beta``:
    the factors (left registered on ``denoiser``) and the gauge at them. Factors start from the adapter's recorded
    ones (else 1) and stay within [0, ``largest``]. ``gauge`` is the adapter's gauge at those factors with
    ``settings`` and ``beta``, where the caller has it (the trainer's last); else the first round measures it.
    ``progress(round, report)`` is called after every gauge."""
    recorded = {entry["step"]: float(entry["scale"]) for entry in metadata.step_scales or []}
    report = gauge if gauge is not None else gauge_adapter(pipeline, denoiser, adapter, reward, metadata, settings,
                                                           beta=beta)
    for round_index in range(rounds):
        if progress is not None:
            progress(round_index, report)
        steps, _, gains, errors, kls = pooled_steps(report)
        current = [recorded.get(step, 1.0) for step in steps]
        factors = rescaled_factors(current, gains, errors, kls, beta, largest)
        recorded.update(zip(steps, factors))
        # every step of the schedule gets a factor: one the gauge leaves out (deterministic) keeps its own
        scales = [{"step": step, "timestep": float(timestep), "scale": recorded.get(step, 1.0)}
                  for step, timestep in enumerate(pipeline.scheduler.timesteps)]
        register_step_scales(denoiser, adapter, scales)
        report = gauge_adapter(pipeline, denoiser, adapter, reward, metadata, settings, beta=beta)
    if progress is not None:
        progress(rounds, report)
    return scales, report


def calibrate_adapter(adapter: str, out: str | Path, beta: float | None = None, reward_kwargs: dict | None = None,
                      prompts: list[str] | str = "world", num_prompts: int = 16, draws: int = 4, rounds: int = 3,
                      largest: float = 4.0, device: str = "auto", progress=None) -> dict:
    """Fit an msdda adapter's per-step scales to its restricted step optimum for the reward it was trained on at
    ``beta`` (default its own) and write it to ``out``: the same LoRA weights, the metadata with the factors, that beta
    and the gauge at them (``optimality``), and the model card saying how to sample it with stock diffusers. A beta
    other than the trained one re-declares the adapter's KL weight (e.g. its implied beta, for an adapter trained
    elsewhere or far from its optimum), and fusion weights it by that beta. Inputs are checked before the base loads.
    Returns the final gauge."""
    from msdda.adapters import copy_adapter, load_adapter_metadata, resolve_adapter
    from msdda.diffusion import denoiser_of, resolve_device
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.prompts import load_prompts
    from msdda.rewards import load_reward
    from msdda.train.evaluate import reward_arguments

    folder = resolve_adapter(adapter)
    for name, value, least in (("rounds", rounds, 1), ("draws", draws, 2), ("num_prompts", num_prompts, 1)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise UserError(f"beta must be a number > 0, got {beta}")
    if not (math.isfinite(largest) and largest > 0):
        raise UserError(f"the largest factor must be a number > 0, got {largest}")
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise UserError(f"the calibrated adapter would overwrite {folder}: give another --out folder")
    metadata = load_adapter_metadata(folder)
    spec = metadata.reward_spec or metadata.reward_name
    reward = load_reward(spec, **reward_arguments(metadata, spec, reward_kwargs)[0])
    if not reward.differentiable:
        raise UserError(f"reward {spec!r} has no gradients: the per-step scales are fitted by the optimality gauge, "
                        "which differentiates the reward")
    shown = load_prompts(prompts, num_prompts)
    where = resolve_device(device)
    beta = metadata.beta if beta is None else beta
    with warnings.catch_warnings():  # fusion's advice to calibrate the adapter, which this is doing
        warnings.filterwarnings("ignore", message=FAR_FROM_OPTIMUM_WARNING)
        pipeline = MSDDAPipeline.from_pretrained(metadata.base_model, adapters=[adapter]).to(where)
    reward = reward.to(where)
    scales, report = calibrate_step_scales(pipeline, denoiser_of(pipeline), pipeline.adapters[0].name, reward,
                                           metadata, GaugeSettings(prompts=shown, draws=draws), beta, rounds,
                                           largest, progress)
    training = dict(metadata.training) | {"calibrated": {"trained_beta": metadata.beta, "rounds": rounds,
                                                         "prompts": len(shown), "draws": draws}}
    copy_adapter(folder, out, replace(metadata, beta=beta, step_scales=scales, optimality=report, training=training))
    return report
