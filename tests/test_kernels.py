"""msdda.kernels against the diffusers schedulers themselves and against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from msdda.kernels import gaussian_kl, gaussian_log_prob, previous_timestep, step_kernel

SHAPE = (4, 3, 5, 5)
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def _model_output(channels_factor: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    output = torch.randn(SHAPE[0], SHAPE[1] * channels_factor, *SHAPE[2:], generator=generator)
    if channels_factor == 2:  # the variance channels: learned_range wants [-1, 1], learned wants > 0
        output[:, SHAPE[1]:] = torch.rand(SHAPE[0], SHAPE[1], *SHAPE[2:], generator=generator) * 1.8 - 0.9
    return output


def _sample(seed: int = 2) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range", "learned"])
def test_ddpm_kernel_reproduces_scheduler_step(prediction_type: str, variance_type: str) -> None:
    scheduler = DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type)
    scheduler.set_timesteps(25)
    learned = variance_type.startswith("learned")
    model_output = _model_output(2 if learned else 1)
    if variance_type == "learned":
        model_output[:, SHAPE[1]:] = model_output[:, SHAPE[1]:].abs() * 0.05 + 1e-3
    sample = _sample()
    for timestep in [int(scheduler.timesteps[i]) for i in (0, 5, 12, 23)]:
        expected = scheduler.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        kernel = step_kernel(scheduler, model_output, timestep, sample)
        torch.testing.assert_close(kernel.sample(noise=noise), expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel.pred_original_sample, expected.pred_original_sample)
        assert not kernel.is_deterministic
        if learned:
            assert kernel.variance.shape == SHAPE  # per-element variance
        else:
            assert kernel.variance.numel() == 1


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("sd_like", [False, True])
def test_ddim_kernel_reproduces_scheduler_step(prediction_type: str, eta: float, sd_like: bool) -> None:
    if sd_like:  # Stable Diffusion's scheduler config
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction_type)
    else:
        scheduler = DDIMScheduler(prediction_type=prediction_type)  # clips x0 to [-1, 1]
    scheduler.set_timesteps(20)
    model_output, sample = _model_output(), _sample()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for timestep in [int(t) for t in scheduler.timesteps[[0, 7, 13, 19]]]:
        expected = scheduler.step(model_output, timestep, sample, eta=eta, variance_noise=noise).prev_sample
        kernel = step_kernel(scheduler, model_output, timestep, sample, eta=eta)
        torch.testing.assert_close(kernel.mean + kernel.std * noise, expected, rtol=1e-5, atol=1e-5)


def test_deterministic_steps_report_zero_variance() -> None:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    model_output, sample = _model_output(), _sample()
    timestep = int(scheduler.timesteps[3])
    kernel = step_kernel(scheduler, model_output, timestep, sample, eta=0.0)
    assert kernel.is_deterministic and float(kernel.variance) == 0.0
    torch.testing.assert_close(kernel.sample(), scheduler.step(model_output, timestep, sample, eta=0.0).prev_sample)
    with pytest.raises(ValueError, match="deterministic"):
        kernel.log_prob(sample)

    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    last = step_kernel(ddpm, model_output, 0, sample)
    assert last.is_deterministic
    torch.testing.assert_close(last.sample(), ddpm.step(model_output, 0, sample).prev_sample)


def test_per_row_timesteps_match_one_call_per_row() -> None:
    for scheduler, eta in ((DDPMScheduler(), None), (DDIMScheduler(), 1.0)):
        scheduler.set_timesteps(10)
        model_output, sample = _model_output(), _sample()
        timesteps = scheduler.timesteps[[0, 3, 6, 9]]
        batched = step_kernel(scheduler, model_output, timesteps, sample, eta=eta)
        for row, timestep in enumerate(timesteps.tolist()):
            single = step_kernel(scheduler, model_output[row:row + 1], timestep, sample[row:row + 1], eta=eta)
            torch.testing.assert_close(batched.mean[row:row + 1], single.mean)
            torch.testing.assert_close(batched.variance[row].reshape(()), single.variance.reshape(()))


def test_previous_timestep_follows_the_schedule() -> None:
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(4)
    assert previous_timestep(ddpm, ddpm.timesteps).tolist() == ddpm.timesteps.tolist()[1:] + [-1]
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        previous_timestep(ddpm, 17)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        step_kernel(EulerDiscreteScheduler(), _model_output(), 10, _sample())
    with pytest.raises(ValueError, match="DDIM setting"):
        ddpm = DDPMScheduler()
        ddpm.set_timesteps(10)
        step_kernel(ddpm, _model_output(), 900, _sample(), eta=0.5)
    with pytest.raises(ValueError, match="channels"):
        learned = DDPMScheduler(variance_type="learned_range")
        learned.set_timesteps(10)
        step_kernel(learned, _model_output(), 900, _sample())
    with pytest.raises(ValueError, match="set_timesteps"):
        step_kernel(DDIMScheduler(), _model_output(), 900, _sample(), eta=1.0)


def test_log_prob_matches_torch_distributions() -> None:
    mean, x = _sample(1), _sample(2)
    variance = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) + 0.1
    expected = torch.distributions.Normal(mean, variance.sqrt()).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, variance, reduction="none"), expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, variance), expected.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(x, mean, variance, reduction="mean"), expected.mean(dim=(1, 2, 3)))
    scalar = torch.tensor(0.3)
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, scalar), torch.distributions.Normal(mean, scalar.sqrt()).log_prob(x).sum((1, 2, 3))
    )


@pytest.mark.parametrize("equal_variances", [True, False])
def test_kl_matches_torch_distributions(equal_variances: bool) -> None:
    mean_p, mean_q = _sample(1), _sample(2)
    variance_p = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) + 0.1
    variance_q = variance_p if equal_variances else torch.rand(SHAPE, generator=torch.Generator().manual_seed(4)) + 0.1
    p = torch.distributions.Normal(mean_p, variance_p.sqrt())
    q = torch.distributions.Normal(mean_q, variance_q.sqrt())
    expected = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(gaussian_kl(mean_p, variance_p, mean_q, variance_q, reduction="none"), expected)
    if equal_variances:  # the DPOK penalty
        torch.testing.assert_close(
            gaussian_kl(mean_p, variance_p, mean_q, variance_q),
            ((mean_p - mean_q) ** 2 / (2 * variance_p)).sum(dim=(1, 2, 3)),
        )
    with pytest.raises(ValueError, match="zero variance"):
        gaussian_kl(mean_p, 0.0, mean_q, variance_q)


def test_ddim_clipped_model_output_matches_scheduler() -> None:
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    model_output, sample = _model_output() * 3, _sample()  # large enough that x0 clips
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    timestep = int(scheduler.timesteps[4])
    expected = scheduler.step(model_output, timestep, sample, eta=1.0, use_clipped_model_output=True,
                              variance_noise=noise).prev_sample
    kernel = step_kernel(scheduler, model_output, timestep, sample, eta=1.0, use_clipped_model_output=True)
    torch.testing.assert_close(kernel.sample(noise=noise), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_model_outputs_give_float32_kernels(half: torch.dtype) -> None:
    """A bf16/fp16 pipeline's outputs: the kernel is still computed in float32 (in half precision
    1 - alpha_bar rounds to 0 near the data and the step would look deterministic)."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(2)
    timestep = int(scheduler.timesteps[0])
    model_output, sample = _model_output().to(half), _sample().to(half)
    kernel = step_kernel(scheduler, model_output, timestep, sample, eta=1.0)
    exact = step_kernel(scheduler, model_output.double(), timestep, sample.double(), eta=1.0)
    assert kernel.mean.dtype == torch.float32 and not kernel.is_deterministic
    torch.testing.assert_close(kernel.variance.double().expand_as(exact.mean),
                               torch.as_tensor(exact.variance).expand_as(exact.mean), rtol=1e-5, atol=0)
    torch.testing.assert_close(kernel.mean.double(), exact.mean, rtol=1e-5, atol=1e-5)
