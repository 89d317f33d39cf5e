"""Continue the embedded world into one whose UNet predicts its step variance (``variance_type: learned_range``).

Improved DDPM (Nichol & Dhariwal 2021) trains the variance channels on the variational bound: the step term
L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the model's mean held fixed (stop-gradient), added to
the epsilon loss as lambda x L_vlb. Two choices here, both so that the learned-variance world differs from the
shipped one only where the variance is concerned:

- The epsilon path is frozen. The UNet's ``conv_out`` gains four variance channels (a 3x3 convolution of the
  same final features the epsilon channels read), and only those are trained; the epsilon channels are the
  shipped UNet's, copied. With the mean stop-gradient and the epsilon path frozen, the hybrid loss's gradient
  is that of its L_vlb term alone, so only that term is computed. Continuing the epsilon loss instead would
  also undo the shipped world's layout phase, which training on the epsilon error at uniform timesteps does not
  keep (docs/notes/2026-11-26-layout-phase.md).
- L_t is taken over the steps the world's samplers take, those of the ``sampler_steps``-step DDPM schedule (10
  steps: 901 -> 801 -> ... -> 101 -> 1), not over the 1000-step chain's t -> t - 1. ``learned_range``
  interpolates the log-variance between the step's posterior variance and its beta, both of which depend on the
  stride, and on a short schedule that range is narrow at high noise
  (docs/notes/2026-12-02-learned-variance-objective.md): the channel value that is right for a one-timestep step
  is not the one that is right for a 100-timestep step. The timestep is drawn uniformly from the schedule's
  stochastic steps (the last one, to t = 1 -> x_0, adds no noise and has no variance to learn); the record also
  gives the bound on the 20-step schedule, off the one trained for.

The variance channels start at v = -1, the posterior variance: at the start the world's DDPM kernel is the
shipped world's DDPM ``fixed_small`` kernel (which is DDIM's at eta = 1), so training moves it only where the
bound says so. ``pretraining.json`` records the bound per sampler step, learned against both fixed choices.

Since the head is all it adds, msdda ships the learned-variance world as that head (7 kB) and assembles the
pipeline folder from it and the shipped world on first use (``assembled_world``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msdda.errors import UserError
from msdda.kernels import kernel_kl, step_kernel
from msdda.world.cache import built_once
from msdda.world.models import build_scheduler, build_unet
from msdda.world.pretrain import (
    PretrainConfig,
    assemble_pipeline,
    continued_record,
    continued_settings,
    cosine_lr,
    layout_data,
    load_world_pipeline,
    noised_batch,
    repeated_measurements,
    reproducible,
    write_record,
)

__all__ = ["LearnedVarianceConfig", "learned_variance_scheduler", "step_vlb", "continue_learned_variance",
           "assembled_world", "HEAD_FILE"]

HEAD_FILE = "variance_head.safetensors"
"""The variance channels of ``conv_out`` (``weight``, ``bias``): all a learned-variance world adds to its world."""


@dataclass
class LearnedVarianceConfig:
    """The learned-variance continuation's settings; seed, data and threads are the continued world's."""

    seed: int = 0
    num_images: int = 24_000
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    sampler_steps: int = 10
    """The schedule length whose step the variance is trained for (the world recipes sample with 10 steps)."""
    bound_samples: int = 256
    """Training latents the recorded bound is measured on, per step."""
    prompt_dropout: float = 0.1
    threads: int = 2


def learned_variance_scheduler(num_inference_steps: int | None = None):
    """The world's schedule as a ``DDPMScheduler`` with ``variance_type="learned_range"``, its timesteps set
    to ``num_inference_steps`` when given."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(build_scheduler().config, variance_type="learned_range")
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def step_vlb(scheduler, epsilon: torch.Tensor, variance_channels: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """L_t per row, in bits per dimension: KL(q(x_prev | x_t, x_0) || p(x_prev | x_t)) for the step ``scheduler``
    takes from ``timesteps`` (a ``learned_range`` DDPM scheduler with its timesteps set; every t must be one
    whose step is stochastic, t > 0 and prev >= 0).

    q is the kernel the true noise implies with v = -1 (the true x_0 and the posterior variance), p the model's
    with its ``epsilon`` detached (improved DDPM's stop-gradient on the mean) and its ``variance_channels``.
    Both go through ``msdda.kernels.step_kernel``: the same arithmetic the samplers use.
    """
    posterior = step_kernel(scheduler, torch.cat([noise, -torch.ones_like(noise)], dim=1), timesteps, noisy)
    model = step_kernel(scheduler, torch.cat([epsilon.detach(), variance_channels], dim=1), timesteps, noisy)
    return kernel_kl(posterior, model, reduction="mean") / math.log(2)


class _VarianceHead(torch.nn.Module):
    """The variance channels of ``conv_out``: a convolution of the UNet's final features, starting at v = -1."""

    def __init__(self, conv_out: torch.nn.Conv2d) -> None:
        super().__init__()
        self.padding = conv_out.padding
        self.weight = torch.nn.Parameter(torch.zeros_like(conv_out.weight))
        self.bias = torch.nn.Parameter(-torch.ones_like(conv_out.bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.conv2d(features, self.weight, self.bias, padding=self.padding)


@torch.no_grad()
def _epsilon_and_features(unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                          embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen UNet's epsilon and the features its ``conv_out`` reads, from one forward."""
    captured: list[torch.Tensor] = []
    handle = unet.conv_out.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        epsilon = unet(noisy, timesteps, embeds).sample
    finally:
        handle.remove()
    return epsilon, captured[0]


def _widened_unet(unet, head: dict[str, torch.Tensor]):
    """A UNet with 2x the output channels: ``unet``'s weights, its ``conv_out`` followed by the head's."""
    wide = build_unet(out_channels=2 * unet.config.out_channels)
    state = dict(unet.state_dict())
    state["conv_out.weight"] = torch.cat([state["conv_out.weight"], head["weight"]])
    state["conv_out.bias"] = torch.cat([state["conv_out.bias"], head["bias"]])
    wide.load_state_dict(state)
    return wide.eval()


def _learned_variance_pipeline(pipeline, head: dict[str, torch.Tensor]):
    """``pipeline``'s parts around its UNet widened by ``head``, with the ``learned_range`` DDPM scheduler."""
    return assemble_pipeline(pipeline.vae, pipeline.text_encoder, pipeline.tokenizer,
                              _widened_unet(pipeline.unet, head), scheduler=learned_variance_scheduler())


def assembled_world(world_pipeline: Path, head_file: Path, cache: Path) -> Path:
    """The pipeline folder of ``world_pipeline`` widened by the head in ``head_file``, built once under ``cache``
    (named by the head's and the UNet's content, so a changed head or world builds anew) and reused after."""
    from safetensors.torch import load_file

    def build():
        return _learned_variance_pipeline(load_world_pipeline(world_pipeline), load_file(head_file))

    return built_once(cache, "world-lv", [head_file, world_pipeline / "unet/diffusion_pytorch_model.safetensors"],
                      build)


@torch.no_grad()
def _bound_by_step(unet, head: _VarianceHead, text_encoder, data: tuple, sampler_steps: int,
                   config: LearnedVarianceConfig) -> dict[str, dict[str, float]]:
    """The step bound (bits per dimension) of the learned variance and of both fixed ones (v = -1: the posterior
    variance; v = +1: beta) at each stochastic step of a ``sampler_steps`` schedule, on training latents."""
    latents, token_ids, _ = data
    scheduler = learned_variance_scheduler(sampler_steps)
    generator = torch.Generator().manual_seed(config.seed + 11)
    index = torch.randint(0, len(latents), (config.bound_samples,), generator=generator)
    clean, embeds = latents[index], text_encoder(token_ids[index])[0]
    noise = torch.randn(clean.shape, generator=generator)
    report: dict[str, dict[str, float]] = {}
    for timestep in scheduler.timesteps[:-1].tolist():  # the last step is deterministic: no variance to learn
        timesteps = torch.full((len(clean),), timestep)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        epsilon, features = _epsilon_and_features(unet, noisy, timesteps, embeds)
        learned = head(features)
        report[str(timestep)] = {
            name: round(float(step_vlb(scheduler, epsilon, channels, noise, timesteps, noisy).mean()), 5)
            for name, channels in (("learned", learned), ("fixed_small", -torch.ones_like(learned)),
                                   ("fixed_large", torch.ones_like(learned)))}
    return report


def _train_head(unet, text_encoder, data: tuple, config: LearnedVarianceConfig) -> _VarianceHead:
    """Adam on the variance head alone, the step bound at the schedule's stochastic steps, drawn uniformly."""
    latents, token_ids, empty_ids = data
    scheduler = learned_variance_scheduler(config.sampler_steps)
    stochastic = scheduler.timesteps[:-1]  # the last step adds no noise
    head = _VarianceHead(unet.conv_out)
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 9)
    batch_settings = PretrainConfig(unet_batch=config.batch, prompt_dropout=config.prompt_dropout)
    progress = tqdm(range(config.steps), desc="variance head", mininterval=2)
    for step in progress:
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.lr)
        _, ids, noise, timesteps, noisy = noised_batch(latents, token_ids, empty_ids, scheduler, generator,
                                                        batch_settings, timestep_choices=stochastic)
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
        epsilon, features = _epsilon_and_features(unet, noisy, timesteps, embeds)
        loss = step_vlb(scheduler, epsilon, head(features), noise, timesteps, noisy).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            progress.set_postfix(bound=f"{loss.item():.5f}")
    return head


def continue_learned_variance(world_dir: str | Path, output_dir: str | Path, steps: int,
                              sampler_steps: int = 10, bound_samples: int = 256) -> Path:
    """Write ``output_dir/{pipeline,variance_head.safetensors,pretraining.json}``: ``world_dir``'s pipeline with a ``learned_range`` UNet
    whose variance channels were trained for ``steps`` steps on the bound of a ``sampler_steps``-step schedule,
    and a ``DDPMScheduler`` that reads them. VAE, text encoder, tokenizer and epsilon are ``world_dir``'s; the
    record gives the bound on ``bound_samples`` latents per step."""
    from safetensors.torch import save_file

    world_dir, output_dir = Path(world_dir), Path(output_dir)
    earlier = continued_record(world_dir, "--learned-variance-steps", steps)
    if sampler_steps < 2:
        raise UserError(f"sampler_steps must be at least 2 (one stochastic step to learn), got {sampler_steps}")
    settings = continued_settings(earlier)
    config = LearnedVarianceConfig(**settings, steps=steps, sampler_steps=sampler_steps, bound_samples=bound_samples)
    started = time.time()
    pipeline = load_world_pipeline(world_dir / "pipeline")  # before seeding: building the parts draws random numbers
    with reproducible(config):
        data = layout_data(pipeline, PretrainConfig(seed=config.seed, num_images=config.num_images))
        head = _train_head(pipeline.unet, pipeline.text_encoder, data, config)
        bounds = {f"{count}_steps": _bound_by_step(pipeline.unet, head, pipeline.text_encoder, data, count, config)
                  for count in (sampler_steps, 2 * sampler_steps)}
    weights = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    _learned_variance_pipeline(pipeline, weights).save_pretrained(output_dir / "pipeline", safe_serialization=True)
    save_file(weights, output_dir / HEAD_FILE)
    unchanged = repeated_measurements(earlier)
    write_record(output_dir, "continue_learned_variance()", config, started, **unchanged,
                  learned_variance_bound_bits_per_dim=bounds, continued_from=earlier)
    return output_dir
