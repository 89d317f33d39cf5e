"""FLUX.1 code paths on tiny randomly initialised FluxPipelines built offline (FLUX.1-dev's layout with its guidance
embedding, and schnell's without): msdda's one denoising loop against the stock FluxPipeline (packed latents, the
dynamic shift, the distilled guidance), the two recipes trained end to end with both estimators and every step
reward, resume, the export that stock ``load_lora_weights`` loads, and fusion and evaluation of FLUX adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata
from msdda.config import load_config
from msdda.diffusion import (
    decode_latents,
    denoiser_forward,
    dynamic_shift_mu,
    encode_prompts,
    guided_output,
    latent_shape,
    load_base_pipeline,
    prepare_sampling,
    sampler_kernel,
)
from msdda.errors import UserError
from msdda.fuse.methods import method_names
from msdda.fuse.pipeline import MSDDAFluxPipeline
from msdda.rewards.clip import AestheticHead
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_flux
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer
from tests import flow_checks
from tests.flow_checks import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
"""Pixels: 8x8 latents, 16 packed patches."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_flux")
    torch.manual_seed(0)
    save_file(AestheticHead(dim=16).state_dict(), root / "aesthetic_head.safetensors")
    return {"dev": str(tiny_flux(root / "dev")), "schnell": str(tiny_flux(root / "schnell", guidance_embeds=False)),
            "clip": str(tiny_clip(root / "clip")), "aesthetic_head": str(root / "aesthetic_head.safetensors")}


def _config(models, output_dir: Path, *overrides: str, recipe: str = "pickscore") -> TrainConfig:
    """A FLUX recipe at toy size, with its own reward on a tiny CLIP (and, for aesthetic, a random head)."""
    config = load_config(TrainConfig, ROOT / f"configs/train/flux_{recipe}.yaml", [
        f"base={models['dev']}", f"prompts={PROMPTS}", f"output_dir={output_dir}", "epochs=1", "mixed_precision=no",
        f"sampling.resolution={SIZE}", "sampling.num_inference_steps=3", "sampling.batch_size=2",
        "sampling.batches_per_epoch=1", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "train.learning_rate=0.01", "sample_every=0", "log_with=null", "checkpoint.every=1", "lora.rank=2",
        "lora.alpha=4", *overrides])
    config.reward.kwargs = ({"model": models["clip"], "processor": models["clip"]} if recipe == "pickscore" else
                            {"model": models["clip"], "head": models["aesthetic_head"]})
    return config


@pytest.mark.parametrize("variant,guidance", [("dev", 3.5), ("schnell", 0.0)])
def test_the_loop_at_noise_level_0_is_the_stock_flux_pipeline(models, variant: str, guidance: float) -> None:
    """With the flow SDE's noise at 0 its kernel is the Euler step: msdda's loop (CLIP and T5 prompt encoding, the
    guidance embedding or none, the transformer on packed latents, FluxPipeline's sigmas with the dynamic shift, x_1
    and the VAE's shift) must then give the stock pipeline's latents and images."""
    pipeline = load_base_pipeline(models[variant], "flow")
    call = dict(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=guidance, height=SIZE, width=SIZE)
    stock = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images
    stock_sigmas = pipeline.scheduler.sigmas.clone()

    positive, negative = encode_prompts(pipeline, PROMPTS[:2], torch.device("cpu"), guidance_scale=guidance)
    assert negative is None  # FLUX has no negative branch
    latents = prepare_sampling(pipeline, 4, 2, torch.Generator().manual_seed(3), positive, SIZE, SIZE)
    scheduler, transformer = pipeline.scheduler, pipeline.transformer
    assert torch.equal(scheduler.sigmas, stock_sigmas)

    def euler(_index, timestep, x_t):
        output = guided_output(transformer, x_t, timestep, positive, negative, guidance)
        return sampler_kernel(scheduler, output, timestep, x_t, 0.0)

    ours = denoise(scheduler.timesteps, latents, euler)
    batch, channels, height, width = ours.shape
    torch.testing.assert_close(FluxPipeline._pack_latents(ours, batch, channels, height, width), stock,
                               rtol=1e-5, atol=1e-5)
    images = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(decode_latents(pipeline, ours), images, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in transformer.parameters())


def test_the_dynamic_shift_follows_the_image_size(models) -> None:
    """mu is FluxPipeline's, from the number of 2x2 patches, and it moves the sigmas the SDE steps between."""
    pipeline = load_base_pipeline(models["dev"], "flow")
    like = torch.zeros(1)
    small, large = latent_shape(pipeline, 1, SIZE, SIZE), latent_shape(pipeline, 1, 64, 64)
    assert small == (1, 4, 8, 8) and large == (1, 4, 32, 32)
    assert dynamic_shift_mu(pipeline, small, 4) == pytest.approx(0.5 + (16 - 256) * 0.65 / 3840)
    assert dynamic_shift_mu(pipeline, large, 4) == pytest.approx(0.5 + (256 - 256) * 0.65 / 3840)
    prepare_sampling(pipeline, 4, 1, torch.Generator(), like, SIZE, SIZE)
    sigmas_small = pipeline.scheduler.sigmas.clone()
    prepare_sampling(pipeline, 4, 1, torch.Generator(), like, 64, 64)
    assert (pipeline.scheduler.sigmas[1:-1] > sigmas_small[1:-1]).all()  # a larger mu shifts toward noise
    with pytest.raises(UserError, match="height 18 px does not fit a FluxPipeline.*multiples of 4 px"):
        latent_shape(pipeline, 1, 18, 16)


def test_the_guidance_scale_reaches_the_transformer(models) -> None:
    """FLUX.1-dev's guidance travels in the conditioning and changes the velocity; schnell's conditioning has no slot
    for it; FLUX refuses a negative prompt and a missing guidance scale."""
    dev, schnell = load_base_pipeline(models["dev"], "flow"), load_base_pipeline(models["schnell"], "flow")
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(750.0)
    cpu = torch.device("cpu")
    low, _ = encode_prompts(dev, PROMPTS[:2], cpu, guidance_scale=1.0)
    high, _ = encode_prompts(dev, PROMPTS[:2], cpu, guidance_scale=3.5)
    with torch.no_grad():
        assert not torch.allclose(denoiser_forward(dev.transformer, sample, timestep, low),
                                  denoiser_forward(dev.transformer, sample, timestep, high))
    plain, _ = encode_prompts(schnell, PROMPTS[:2], cpu, guidance_scale=3.5)
    assert plain.shape[1] == low.shape[1] == 512 + 1  # T5's 512 tokens, then one row holding pooled (+ guidance)
    assert torch.equal(low[:, -1, 32], torch.full((2,), 1.0)) and torch.equal(plain[:, -1, 32:], torch.zeros(2, 32))
    with pytest.raises(UserError, match="without a negative branch"):
        encode_prompts(dev, PROMPTS[:1], cpu, negative_prompt="blurry", guidance_scale=3.5)
    with pytest.raises(UserError, match="pass guidance_scale"):
        encode_prompts(dev, PROMPTS[:1], cpu)
    short, _ = encode_prompts(dev, PROMPTS[:1], cpu, guidance_scale=3.5, max_sequence_length=128)
    assert short.shape[1] == 128 + 1


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One epoch of each recipe with one of the estimators: (the exported adapter, the trained transformer)."""
    root, runs = tmp_path_factory.mktemp("flux_runs"), {}
    for estimator, step_reward, recipe in (("pathwise", "tweedie", "pickscore"),
                                           ("policy-gradient", "terminal", "aesthetic")):
        trainer = Trainer(_config(models, root / estimator, f"train.estimator={estimator}",
                                  f"reward.step_reward={step_reward}", recipe=recipe))
        runs[estimator] = (trainer.run(), trainer.unwrapped)
    return runs


@pytest.mark.parametrize("estimator", ["pathwise", "policy-gradient"])
def test_the_exported_adapter_loads_with_stock_load_lora_weights(models, trained, estimator: str) -> None:
    """The file holds the LoRA at its trained alpha (2x the rank here): the stock FluxPipeline with it loaded predicts
    the trained transformer's velocity, which differs from the base's."""
    final, transformer = trained[estimator]
    metadata = load_adapter_metadata(final)
    assert (metadata.pipeline_class, metadata.scheduler_class) == ("FluxPipeline", "FlowMatchEulerDiscreteScheduler")
    assert (metadata.flow_noise_level, metadata.num_inference_steps, metadata.resolution) == (0.9, 3, SIZE)
    assert metadata.flow_shift is None and metadata.flow_mu == pytest.approx(0.5 + (16 - 256) * 0.65 / 3840)
    assert metadata.eta is None and metadata.guidance_scale == 3.5 and metadata.max_sequence_length == 128
    stock = FluxPipeline.from_pretrained(models["dev"], local_files_only=True)
    flow_checks.assert_stock_loader_reproduces_the_trained_transformer(stock, final, transformer, (4, 8, 8),
                                                                       guidance_scale=3.5, max_sequence_length=128)


@pytest.mark.parametrize("estimator,step_reward", [("pathwise", "rollout"), ("policy-gradient", "tweedie"),
                                                   ("policy-gradient", "rollout")])
def test_the_other_step_rewards_train(models, tmp_path, estimator: str, step_reward: str) -> None:
    flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", f"train.estimator={estimator}",
                                                f"reward.step_reward={step_reward}"))


def test_the_recipes_own_precision_bf16_trains(models, tmp_path, fresh_accelerator_state) -> None:
    final = flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", "mixed_precision=bf16"))
    assert all(value.dtype == torch.float32 for value in load_file(final / WEIGHTS_FILE).values())


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, tmp_path) -> None:
    flow_checks.assert_resume_is_bit_equal(lambda output_dir, *overrides: _config(models, output_dir, *overrides),
                                           tmp_path)


@pytest.mark.parametrize("field,value", [("flow_noise_level", 0.5), ("flow_mu", 1.15), ("resolution", 32),
                                         ("max_sequence_length", 512)])
def test_fusion_refuses_flux_adapters_whose_sampler_differs_naming_the_field(trained, tmp_path, field: str,
                                                                             value: float) -> None:
    flow_checks.assert_fusion_refuses_a_changed_field(trained["pathwise"][0], tmp_path, field, value)


def _fusing_pipeline(models, trained, *estimators: str):
    return flow_checks.fusing_pipeline(models["dev"], [trained[estimator][0] for estimator in estimators])


def test_single_at_noise_level_0_is_the_stock_flux_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, MSDDAFluxPipeline) and isinstance(pipeline, FluxPipeline)
    stock = FluxPipeline.from_pretrained(models["dev"], local_files_only=True)
    # the fusing pipeline samples at the adapter's resolution and T5 length; the stock one is told them
    flow_checks.assert_single_at_noise_level_0_is_the_stock_pipeline(
        pipeline, stock, trained["pathwise"][0], dict(height=SIZE, width=SIZE, max_sequence_length=128),
        num_inference_steps=3, guidance_scale=3.5)


def test_sampling_at_another_size_than_the_adapters_warns_that_the_shift_moves(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    with pytest.warns(UserWarning, match=r"mu = .* but the adapters were trained at mu = .*resolution 16"):
        pipeline(PROMPTS[0], height=32, width=32, num_inference_steps=1, output_type="pt")


def test_msdda_fuses_two_flux_adapters_with_one_transformer_forward_per_step(models, trained) -> None:
    # both adapters' rows in one batch (no negative rows: FLUX's guidance is an input), for each of 3 steps
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_one_transformer_forward_per_step(pipeline, 3, (3, SIZE, SIZE))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_flux_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_method_samples_with_its_path_kl(pipeline, method, models["clip"], (3, SIZE, SIZE))


def test_evaluate_compares_a_flux_adapter_with_its_base(trained) -> None:
    flow_checks.assert_evaluate_reports_a_kl(trained["pathwise"][0], "pickscore")
