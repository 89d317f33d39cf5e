"""Flow step kernels against Flow-GRPO's published step and diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from msdda.kernels import flow_sigmas, kernel_kl, previous_timestep, step_kernel

SHAPE = (4, 3, 5, 5)
STEPS = 12


def _scheduler(**config: object) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **config)  # SD3's shift
    scheduler.set_timesteps(STEPS)
    return scheduler


def _tensor(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _flow_grpo_sde_step(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's ``sde_step_with_logprob`` as published (yifan123/flow_grpo, commit ac4c86e,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), line by line: (mean, std, log-prob averaged over
    all but the batch dimension)."""
    model_output, sample, prev_sample = model_output.float(), sample.float(), prev_sample.float()
    step_index = [scheduler.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = scheduler.sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = scheduler.sigmas[prev_step_index].view(-1, 1, 1, 1)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample_mean, std_dev_t * torch.sqrt(-1 * dt), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("noise_level", [None, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sde_kernel_is_flow_grpos_step(noise_level: float | None, dtype: torch.dtype) -> None:
    """Per-row timesteps through the first step (sigma = 1, Flow-GRPO's sigmas[1] denominator), the middle
    and the last (to sigma = 0, still noisy); a bf16 model is upcast to float32 as Flow-GRPO does."""
    scheduler = _scheduler()
    timesteps = scheduler.timesteps[[0, 1, 6, STEPS - 1]]
    assert float(scheduler.sigmas[0]) == 1.0 and float(scheduler.sigmas[STEPS]) == 0.0
    model_output, sample, prev_sample = _tensor(1).to(dtype), _tensor(2).to(dtype), _tensor(3)
    kernel = step_kernel(scheduler, model_output, timesteps, sample, flow_noise_level=noise_level)
    mean, std, log_prob = _flow_grpo_sde_step(scheduler, model_output, timesteps, sample,
                                              0.7 if noise_level is None else noise_level, prev_sample)
    assert kernel.mean.dtype == torch.float32
    torch.testing.assert_close(kernel.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel.std, std, rtol=1e-5, atol=0)
    torch.testing.assert_close(kernel.log_prob(prev_sample, reduction="mean"), log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel.pred_original_sample,
                               sample.float() - scheduler.sigmas[[0, 1, 6, STEPS - 1]].view(-1, 1, 1, 1) * model_output.float())


def test_sde_kernel_kl_is_the_dpok_penalty_with_flow_grpos_std() -> None:
    """Two velocities at one x_t: the exact KL is ||mean difference||^2 / (2 std^2), std Flow-GRPO's."""
    scheduler = _scheduler()
    timestep = scheduler.timesteps[4]
    sample, policy, reference = _tensor(2), _tensor(1), _tensor(4)
    p, q = (step_kernel(scheduler, v, timestep, sample) for v in (policy, reference))
    p_mean, std, _ = _flow_grpo_sde_step(scheduler, policy, timestep.expand(SHAPE[0]), sample, 0.7, sample)
    q_mean, _, _ = _flow_grpo_sde_step(scheduler, reference, timestep.expand(SHAPE[0]), sample, 0.7, sample)
    expected = ((p_mean - q_mean) ** 2 / (2 * std**2)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kernel_kl(p, q), expected, rtol=1e-5, atol=0)
    assert bool((kernel_kl(p, q) > 1).all())


def test_noise_level_zero_is_the_schedulers_euler_step() -> None:
    for index in (0, 5, STEPS - 1):
        scheduler = _scheduler()  # a fresh step index: diffusers' step counts its own steps
        timestep = scheduler.timesteps[index]
        kernel = step_kernel(scheduler, _tensor(1), timestep, _tensor(2), flow_noise_level=0.0)
        assert kernel.is_deterministic
        torch.testing.assert_close(kernel.mean, scheduler.step(_tensor(1), timestep, _tensor(2)).prev_sample)


def test_stochastic_sampling_kernel_reproduces_the_schedulers_step() -> None:
    """diffusers' stochastic step re-noises the x0 estimate: N((1 - sigma_next) x0_hat, sigma_next^2)."""
    for index in (0, 5, STEPS - 2, STEPS - 1):
        scheduler = _scheduler(stochastic_sampling=True)
        timestep = scheduler.timesteps[index]
        expected = scheduler.step(_tensor(1), timestep, _tensor(2), generator=torch.Generator().manual_seed(7))
        kernel = step_kernel(scheduler, _tensor(1), timestep, _tensor(2))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(kernel.sample(noise=noise), expected.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kernel.variance, scheduler.sigmas[index + 1] ** 2)
        assert kernel.is_deterministic == (index == STEPS - 1)  # the step to sigma = 0 keeps x0_hat


def test_flow_sigmas_follow_the_schedule() -> None:
    scheduler = _scheduler()
    like = torch.zeros(STEPS, 2)
    sigma, sigma_next = flow_sigmas(scheduler, scheduler.timesteps, like)
    assert sigma.shape == (STEPS, 1)
    assert sigma.reshape(-1).tolist() == scheduler.sigmas[:-1].tolist()
    assert sigma_next.reshape(-1).tolist() == scheduler.sigmas[1:].tolist()
    sigma, _ = flow_sigmas(scheduler, float(scheduler.timesteps[3]), torch.zeros((), dtype=torch.float64))
    assert sigma.dtype == torch.float64 and float(sigma) == float(scheduler.sigmas[3])


def test_bad_flow_inputs_are_refused() -> None:
    scheduler, v, x = _scheduler(), _tensor(1), _tensor(2)
    timestep = scheduler.timesteps[2]
    with pytest.raises(ValueError, match="not a step index"):
        step_kernel(scheduler, v, 2, x)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        step_kernel(scheduler, v, timestep + 0.5, x)
    with pytest.raises(ValueError, match="flow_noise_level must be"):
        step_kernel(scheduler, v, timestep, x, flow_noise_level=-0.1)
    with pytest.raises(ValueError, match="DDIM settings"):
        step_kernel(scheduler, v, timestep, x, eta=1.0)
    with pytest.raises(ValueError, match="stochastic_sampling=True"):
        step_kernel(_scheduler(stochastic_sampling=True), v, timestep, x, flow_noise_level=0.7)
    with pytest.raises(ValueError, match="invert_sigmas"):
        step_kernel(_scheduler(invert_sigmas=True), v, timestep, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        step_kernel(FlowMatchEulerDiscreteScheduler(), v, timestep, x)
    with pytest.raises(ValueError, match="flow_sigmas"):
        previous_timestep(scheduler, timestep)
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="setting of flow schedulers"):
        step_kernel(ddim, v, int(ddim.timesteps[0]), x, eta=1.0, flow_noise_level=0.7)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        flow_sigmas(ddim, 1.0, x)
    last = step_kernel(_scheduler(stochastic_sampling=True), v, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="deterministic"):  # diffusers' step to sigma = 0 has no density
        last.log_prob(x)
