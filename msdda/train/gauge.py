"""The optimality gauge: how near an adapter is to its step optimum, step by step, on held-out states.

States x_t are sampled from the reference and from the adapter (the two distributions an adapter is used on: fusion
starts from both), and at each state the pathwise first-order condition (msdda.train.stationarity) compares the
adapter's mean shift d with the optimum's d* = s_t^2 / beta E[grad R_t], the expectation over draws of x_{t-1} from
the adapter's kernel, R_t the adapter's step reward differentiated through the frozen reference (as the pathwise
update differentiates it). The report gives, per source and step, the ratio |d| / |d*| and the cosine with their
standard errors, the KL the adapter spends and the KL its optimum would spend, and over everything the implied beta.

"Steps that carry KL" are those where the optimum spends at least ``CARRYING_SHARE`` of its path KL: at the others
a ratio far from 1 costs next to nothing. An adapter is *near its optimum* within a tolerance when the ratio of every
such step, from either source, is within it of 1.

A LoRA is a restricted family: where it cannot hold d* (cos(d, d*) < 1) no member reaches ratio 1 with cosine 1, and
its best member is the one whose shift is optimal in its own direction, where the *scale beta* (the step-reward gain
over twice the KL, msdda.train.stationarity.scale_beta) equals the trained beta. The report gives both, and the worst
step of each: ``max_ratio_deviation`` (|ratio - 1|) and ``max_scale_deviation`` (|scale beta / beta - 1|, 0 where
each step is optimal in its own direction: what per-step scales, msdda.step_scales, can reach; read at the steps where
that multiple is measured to within ``RESOLVED``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msdda.adapters import AdapterMetadata
from msdda.diffusion import BASE, adapter_kernels, encode_prompts, prepare_sampling, uses_guidance
from msdda.kernels import StepKernel, standard_normal
from msdda.models import family_of
from msdda.sampling import denoise
from msdda.step_scales import resolved
from msdda.train.pathwise import reference_step_reward
from msdda.train.rollout import Sampler
from msdda.train.stationarity import Stationarity, implied_beta, ratio_and_cosine, scale_beta, stationarity
from msdda.train.updates import Transitions

__all__ = ["GaugeSettings", "KernelPair", "StepReward", "check_states", "summarise", "gauge_adapter",
           "near_optimum", "gauge_lines", "SOURCES", "CARRYING_SHARE"]

SOURCES = ("reference", "adapter")
"""Where the gauge's states come from: the reference's own samples, and the adapter's."""
CARRYING_SHARE = 0.02
"""A step carries KL when its optimum spends at least this share of the optimum's path KL."""

KernelPair = Callable[[int, torch.Tensor], tuple[StepKernel, StepKernel]]
"""(step index, x_t) -> (the adapter's kernel, the reference's kernel) at x_t."""
StepReward = Callable[[int, torch.Tensor], torch.Tensor]
"""(step index, x_{t-1}) -> ``[N]`` R_t(x_{t-1}), differentiable in x_{t-1}."""


@dataclass(frozen=True)
class GaugeSettings:
    """Which held-out states the gauge reads and how many draws estimate E[grad R_t] at each."""

    prompts: Sequence[str]
    seeds: Sequence[int] = (1_000_003,)
    """Seeds of the states' trajectories (held out: training seeds its draws from (seed, epoch, ...) hashes)."""
    draws: int = 4
    batch_size: int = 16
    sources: Sequence[str] = SOURCES


def check_states(kernels: KernelPair, step_reward: StepReward, states: dict[int, torch.Tensor], beta: float,
                 draws: int, generator: torch.Generator) -> dict[int, Stationarity]:
    """The first-order condition at each step's states (``states``: step index -> ``[N, ...]`` x_t); deterministic
    steps (variance 0, no density) are left out."""
    checks = {}
    for step, x_t in states.items():
        with torch.no_grad():
            policy, reference = kernels(step, x_t)
        if reference.is_deterministic:
            continue
        gradients = []
        for _ in range(draws):
            noise = standard_normal(policy.mean.shape, generator, policy.mean)
            action = policy.sample(noise=noise).detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(step_reward(step, action).sum(), action)
            gradients.append(gradient)
        checks[step] = stationarity(policy.mean - reference.mean, reference.variance, torch.stack(gradients), beta)
    return checks


def _with_jackknife(check: Stationarity) -> tuple[float, float, float, float]:
    """(ratio, its standard error, cosine, its standard error) over the states of ``check``; the errors by the
    jackknife over states (leave one out), as the ratios are of sums."""
    ratio, cosine = ratio_and_cosine(check)
    count = len(check.shift_energy)
    if count < 2:
        return ratio, 0.0, cosine, 0.0
    shift, target = check.shift_energy, check.target_energy
    alignment = check.alignment
    shift_out, target_out = shift.sum() - shift, target.sum() - target
    with torch.no_grad():
        ratios = (shift_out / target_out).sqrt()
        cosines = (alignment.sum() - alignment) / (shift_out * target_out).sqrt()

    def error(values: torch.Tensor) -> float:
        values = values[torch.isfinite(values)]
        if len(values) < 2:
            return float("nan")
        return float(((count - 1) / count * ((values - values.mean()) ** 2).sum()).sqrt())

    return ratio, error(ratios), cosine, error(cosines)


def summarise(checks: dict[str, dict[int, Stationarity]], timesteps: Sequence, beta: float, draws: int) -> dict:
    """The JSON report of ``checks`` (source -> step index -> Stationarity) for an adapter trained at ``beta``."""
    report: dict = {"beta": beta, "draws": draws, "carrying_share": CARRYING_SHARE,
                    "implied_beta": _finite(implied_beta([c for steps in checks.values() for c in steps.values()])),
                    "scale_beta": _finite(scale_beta([c for steps in checks.values() for c in steps.values()])),
                    "sources": {}}
    deviations, scale_deviations = [], []
    for source, steps in checks.items():
        optimum_kl = {step: float(check.optimum_kl.mean()) for step, check in steps.items()}
        total = sum(max(value, 0.0) for value in optimum_kl.values()) or 1.0
        rows = []
        for step, check in steps.items():
            ratio, ratio_sem, cosine, cosine_sem = _with_jackknife(check)
            carries = optimum_kl[step] >= CARRYING_SHARE * total
            if carries:
                deviations.append(abs(ratio - 1) if np.isfinite(ratio) else float("inf"))
                if resolved(_sem(check.shift_dot_gradient), float(check.kl.mean()), beta):  # the best multiple measured
                    scale_deviations.append(abs(scale_beta([check]) / beta - 1))
            rows.append({"step": step, "timestep": float(timesteps[step]), "states": len(check.kl),
                         "ratio": _finite(ratio), "ratio_sem": _finite(ratio_sem), "cosine": _finite(cosine),
                         "cosine_sem": _finite(cosine_sem), "kl": float(check.kl.mean()),
                         "optimum_kl": optimum_kl[step], "carries_kl": carries,
                         "gain": float(check.shift_dot_gradient.mean()), "gain_sem": _sem(check.shift_dot_gradient),
                         "implied_beta": _finite(implied_beta([check])), "scale_beta": _finite(scale_beta([check]))})
        report["sources"][source] = rows
    report["max_ratio_deviation"] = _finite(max(deviations)) if deviations else None
    report["max_scale_deviation"] = _finite(max(scale_deviations)) if scale_deviations else None
    return report


def near_optimum(report: dict, tolerance: float) -> bool:
    """Whether every step that carries KL, from every source, has its ratio |d| / |d*| within ``tolerance`` of 1."""
    worst = report["max_ratio_deviation"]
    return worst is not None and worst <= tolerance


def gauge_lines(report: dict) -> str:
    """The gauge as text: the verdict, then one line per step with each source's ratio and cosine."""
    worst, implied = report["max_ratio_deviation"], report["implied_beta"]
    lines = [f"distance from the step optimum at beta {report['beta']:g} ({report['step_reward']} step reward, "
             f"{report['prompts']} prompts x {len(report['seeds'])} seed, {report['draws']} draws): |d| / |d*| is off 1 "
             f"by at most {_amount(worst)} at the steps that carry KL "
             f"(each step's shift off its best multiple by at most {_amount(report.get('max_scale_deviation'))}); "
             f"implied beta {'none' if implied is None else f'{implied:.3g}'}, scale beta "
             f"{'none' if report['scale_beta'] is None else format(report['scale_beta'], '.3g')}"]
    sources = list(report["sources"])
    for position, row in enumerate(report["sources"][sources[0]]):
        parts = []
        for source in sources:
            other = report["sources"][source][position]
            parts.append(f"{source} states: ratio {_text(other['ratio'], other['ratio_sem'])}, cosine "
                         f"{_text(other['cosine'], other['cosine_sem'])}")
        carries = "" if row["carries_kl"] else " (carries little KL)"
        lines.append(f"  step {row['step']} (t={row['timestep']:g}){carries}: " + "; ".join(parts))
    return "\n".join(lines)


def _sem(values: torch.Tensor) -> float:
    """The standard error of the mean of ``values`` (0 for a single state)."""
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


def _amount(value: float | None) -> str:
    return "an unmeasured amount" if value is None else f"{value:.2f}"


def _text(value: float | None, error: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ± {error if error is not None else float('nan'):.2f}"


def gauge_adapter(pipeline, unet, adapter: str, reward, metadata: AdapterMetadata, settings: GaugeSettings,
                  beta: float | None = None, step_reward: str | None = None) -> dict:
    """The gauge of ``unet``'s adapter ``adapter`` (PEFT's name) for ``reward`` at ``beta`` (default the adapter's),
    sampled as ``metadata`` says (steps, guidance, noise, resolution, T5 length) and scored with the step reward
    ``step_reward`` (default the adapter's; ``terminal`` adapters are gauged with ``tweedie``, the dense rule whose
    gradient exists at every step)."""
    beta = metadata.beta if beta is None else beta
    rule = step_reward or metadata.step_reward
    rule = "tweedie" if rule == "terminal" else rule
    sampler = Sampler(pipeline, unet, metadata.num_inference_steps,
                      getattr(metadata, family_of(pipeline).noise_setting), metadata.guidance_scale,
                      metadata.resolution)
    rewarded = reference_step_reward(sampler, reward, rule)
    device, prompts = next(unet.parameters()).device, list(settings.prompts)
    checks: dict[str, dict[int, list[Stationarity]]] = {source: {} for source in settings.sources}
    timesteps = None
    for seed in settings.seeds:
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            positive, negative = encode_prompts(pipeline, batch, device, guidance_scale=sampler.guidance_scale,
                                                max_sequence_length=metadata.max_sequence_length,
                                                size=(metadata.resolution, metadata.resolution))
            negative = negative if uses_guidance(negative, sampler.guidance_scale) else None
            for source in settings.sources:
                generator = torch.Generator().manual_seed(seed * 100_003 + start)
                states = _states(sampler, adapter if source == "adapter" else BASE, positive, negative, generator)
                timesteps = pipeline.scheduler.timesteps

                def kernels(step: int, x_t: torch.Tensor, timesteps=timesteps, positive=positive, negative=negative):
                    return tuple(adapter_kernels(unet, pipeline.scheduler, x_t, timesteps[step], positive, negative,
                                                 [adapter, BASE], sampler.guidance_scale, sampler.noise_scale))

                def scored(step: int, action: torch.Tensor, timesteps=timesteps, batch=batch, positive=positive,
                           negative=negative) -> torch.Tensor:
                    states_batch = Transitions(step=step, timesteps=timesteps, latents=action, next_latents=None,
                                               log_probs=None, advantages=None, reference=None, noises=None,
                                               prompts=batch, prompt_embeds=positive, negative_embeds=negative)
                    return rewarded(action, states_batch)

                for step, check in check_states(kernels, scored, states, beta, settings.draws, generator).items():
                    checks[source].setdefault(step, []).append(check)
    joined = {source: {step: Stationarity.concatenate(parts) for step, parts in steps.items()}
              for source, steps in checks.items()}
    report = summarise(joined, timesteps, beta, settings.draws)
    report.update(step_reward=rule, reward=getattr(reward, "name", str(reward)), seeds=list(settings.seeds),
                  prompts=len(prompts))
    return report


@torch.no_grad()
def _states(sampler: Sampler, name: str, positive: torch.Tensor, negative: torch.Tensor | None,
            generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Step index -> x_t along trajectories of ``name`` (an adapter, or ``BASE``: the reference)."""
    pipeline = sampler.pipeline
    latents = prepare_sampling(pipeline, sampler.num_inference_steps, len(positive), generator, positive,
                               sampler.resolution, sampler.resolution)
    states = {}

    def kernel_at(index: int, timestep: torch.Tensor, x_t: torch.Tensor) -> StepKernel:
        states[index] = x_t
        return adapter_kernels(sampler.unet, pipeline.scheduler, x_t, timestep, positive, negative, [name],
                               sampler.guidance_scale, sampler.noise_scale)[0]

    denoise(pipeline.scheduler.timesteps, latents, kernel_at, generator, positive)
    return states


def _finite(value: float) -> float | None:
    """``value``, or None (JSON's null) where it is not finite: an implied beta where the shift does not follow the
    reward's gradient at all, a ratio where the states show no reward gradient above its noise."""
    return value if np.isfinite(value) else None
