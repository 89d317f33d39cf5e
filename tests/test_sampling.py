"""The one denoising loop against diffusers' own scheduler loop, and its deterministic mode."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from msdda.kernels import initial_latents, step_kernel
from msdda.sampling import Step, denoise


def _scheduler() -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", set_alpha_to_one=False)
    scheduler.set_timesteps(6)
    return scheduler


def _model(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for a UNet's epsilon prediction."""
    return torch.tanh(0.7 * x_t + 1e-3 * float(timestep))


def test_the_loop_draws_and_steps_as_diffusers_scheduler_step_does() -> None:
    scheduler = _scheduler()
    like = torch.zeros(1)
    shape = (3, 4, 8, 8)
    ours_generator, theirs_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    start = initial_latents(scheduler, shape, ours_generator, like)
    recorded: list[Step] = []
    ours = denoise(scheduler.timesteps, start,
                   lambda _i, t, x: step_kernel(scheduler, _model(x, t), t, x, eta=1.0), ours_generator, like,
                   record=recorded.append)

    theirs = torch.randn(shape, generator=theirs_generator) * scheduler.init_noise_sigma
    torch.testing.assert_close(start, theirs, rtol=0, atol=0)
    for timestep in scheduler.timesteps:
        theirs = scheduler.step(_model(theirs, timestep), timestep, theirs, eta=1.0, generator=theirs_generator).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert [step.index for step in recorded] == list(range(6))
    assert all(torch.equal(a.next_latents, b.latents) for a, b in zip(recorded, recorded[1:]))
    assert torch.equal(recorded[-1].next_latents, ours)


def test_without_a_generator_the_loop_follows_the_kernel_means() -> None:
    scheduler = _scheduler()
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = denoise(scheduler.timesteps[2:], start,
                   lambda _i, t, x: step_kernel(scheduler, _model(x, t), t, x, eta=0.0), start_index=2,
                   record=lambda step: None)
    theirs = start
    for timestep in scheduler.timesteps[2:]:
        theirs = scheduler.step(_model(theirs, timestep), timestep, theirs, eta=0.0).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
