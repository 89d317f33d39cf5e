"""FLUX.2 (msdda.models.flux2, one family file) on a tiny random Flux2Pipeline built offline: msdda's one denoising
loop against the stock pipeline (the Mistral prompt encoding, the distilled guidance, patchified latents with the VAE's
batch-norm statistics, the empirical shift of the size and steps), the two recipes trained with both estimators and
every step reward, resume, the export that stock ``load_lora_weights`` loads at its alpha, and fusion of two FLUX.2
adapters (every method; adapters of another family refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from safetensors.torch import save_file

from msdda.adapters import load_adapter_metadata
from msdda.diffusion import (
    decode_latents,
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
from msdda.rewards.clip import AestheticHead
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_flux2
from msdda.train import TrainConfig
from tests import flow_checks
from tests.flow_checks import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
"""Pixels: 8x8 VAE latents, 4x4 patchified ones (16 tokens)."""
TOKENS = 48
"""Mistral tokens every prompt is padded to (the system message is 30 of them)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_flux2")
    torch.manual_seed(0)
    save_file(AestheticHead(dim=16).state_dict(), root / "aesthetic_head.safetensors")
    return {"flux2": str(tiny_flux2(root / "flux2")), "clip": str(tiny_clip(root / "clip")),
            "aesthetic_head": str(root / "aesthetic_head.safetensors")}


def _config(models, output_dir: Path, *overrides: str, recipe: str = "pickscore") -> TrainConfig:
    return flow_checks.toy_recipe_config(ROOT / f"configs/train/flux2_{recipe}.yaml", models["flux2"], models,
                                         output_dir, SIZE, TOKENS, *overrides)


def test_the_loop_at_noise_level_0_is_the_stock_flux2_pipeline(models) -> None:
    """With the flow SDE's noise at 0 its kernel is the Euler step: msdda's loop (the Mistral hidden layers, the
    guidance in the conditioning, the transformer on patchified latents and their ids, the empirical shift, x_1 drawn
    in the patchified space, the VAE's batch-norm statistics) must then give the stock pipeline's latents and
    images."""
    pipeline = load_base_pipeline(models["flux2"], "flow")
    call = dict(prompt=PROMPTS[:2], guidance_scale=4.0, num_inference_steps=3, height=SIZE, width=SIZE,
                max_sequence_length=TOKENS)
    stock = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images
    stock_sigmas = pipeline.scheduler.sigmas.clone()

    positive, negative = encode_prompts(pipeline, PROMPTS[:2], torch.device("cpu"), guidance_scale=4.0,
                                        max_sequence_length=TOKENS)
    assert negative is None and positive.shape == (2, TOKENS + 1, 48)  # the sequence, then a row holding guidance
    latents = prepare_sampling(pipeline, 3, 2, torch.Generator().manual_seed(3), positive, SIZE, SIZE)
    scheduler, transformer = pipeline.scheduler, pipeline.transformer
    assert torch.equal(scheduler.sigmas, stock_sigmas)

    def euler(_index, timestep, x_t):
        output = guided_output(transformer, x_t, timestep, positive, negative, 4.0)
        return sampler_kernel(scheduler, output, timestep, x_t, 0.0)

    ours = denoise(scheduler.timesteps, latents, euler)
    torch.testing.assert_close(Flux2Pipeline._pack_latents(ours), stock, rtol=1e-5, atol=1e-5)
    images = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(decode_latents(pipeline, ours), images, rtol=1e-5, atol=1e-5)


def test_the_shift_follows_size_and_steps_and_inputs_are_checked(models) -> None:
    pipeline = load_base_pipeline(models["flux2"], "flow")
    small, large = latent_shape(pipeline, 1, SIZE, SIZE), latent_shape(pipeline, 1, 64, 64)
    assert small == (1, 16, 4, 4) and large == (1, 16, 16, 16)
    assert dynamic_shift_mu(pipeline, large, 8) == pytest.approx(compute_empirical_mu(256, 8))
    assert dynamic_shift_mu(pipeline, large, 8) != pytest.approx(dynamic_shift_mu(pipeline, large, 28))
    with pytest.raises(UserError, match="height 18 px does not fit a Flux2Pipeline.*multiples of 4 px"):
        latent_shape(pipeline, 1, 18, SIZE)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="without a negative branch"):
        encode_prompts(pipeline, PROMPTS[:1], cpu, negative_prompt="blurry", guidance_scale=4.0)
    with pytest.raises(UserError, match="pass guidance_scale"):
        encode_prompts(pipeline, PROMPTS[:1], cpu)


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    return flow_checks.train_each_estimator(lambda *args, **kwargs: _config(models, *args, **kwargs),
                                            tmp_path_factory.mktemp("flux2_runs"))


@pytest.mark.parametrize("estimator", ["pathwise", "policy-gradient"])
def test_the_exported_adapter_loads_with_stock_load_lora_weights(models, trained, estimator: str) -> None:
    """The file holds the LoRA at its trained alpha (2x the rank here) on both kinds of block: the stock Flux2Pipeline
    with it loaded predicts the trained transformer's velocity, which differs from the base's."""
    final, transformer = trained[estimator]
    metadata = load_adapter_metadata(final)
    assert (metadata.pipeline_class, metadata.scheduler_class) == ("Flux2Pipeline", "FlowMatchEulerDiscreteScheduler")
    assert (metadata.flow_noise_level, metadata.num_inference_steps, metadata.resolution) == (1.0, 3, SIZE)
    assert metadata.flow_shift is None and metadata.flow_mu == pytest.approx(compute_empirical_mu(16, 3))
    assert metadata.eta is None and metadata.guidance_scale == 4.0 and metadata.max_sequence_length == TOKENS
    stock = Flux2Pipeline.from_pretrained(models["flux2"], local_files_only=True)
    flow_checks.assert_stock_loader_reproduces_the_trained_transformer(stock, final, transformer, (16, 4, 4),
                                                                       guidance_scale=4.0, max_sequence_length=TOKENS)


@pytest.mark.parametrize("estimator,step_reward", [("pathwise", "rollout"), ("policy-gradient", "tweedie"),
                                                   ("policy-gradient", "rollout")])
def test_the_other_step_rewards_train(models, tmp_path, estimator: str, step_reward: str) -> None:
    flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", f"train.estimator={estimator}",
                                                f"reward.step_reward={step_reward}"))


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, tmp_path) -> None:
    flow_checks.assert_resume_on_the_cheapest_estimator_is_bit_equal(
        lambda output_dir, *overrides: _config(models, output_dir, *overrides), tmp_path)


def test_fusion_refuses_an_adapter_of_another_family(trained, tmp_path) -> None:
    flow_checks.assert_fusion_refuses_an_adapter_of_another_family(trained["pathwise"][0], tmp_path, "Flux2Pipeline")


def _fusing_pipeline(models, trained, *estimators: str):
    return flow_checks.fusing_pipeline(models["flux2"], [trained[estimator][0] for estimator in estimators])


def test_single_at_noise_level_0_is_the_stock_flux2_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, Flux2Pipeline) and type(pipeline).__name__ == "MSDDAFlux2Pipeline"
    stock = Flux2Pipeline.from_pretrained(models["flux2"], local_files_only=True)
    # the fusing pipeline samples at the adapter's resolution, text length and guidance; the stock one is told them
    flow_checks.assert_single_at_noise_level_0_is_the_stock_pipeline(
        pipeline, stock, trained["pathwise"][0],
        dict(height=SIZE, width=SIZE, max_sequence_length=TOKENS, guidance_scale=4.0), num_inference_steps=3)


def test_msdda_fuses_two_flux2_adapters_with_one_transformer_forward_per_step(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_one_transformer_forward_per_step(pipeline, 3, (3, SIZE, SIZE))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_flux2_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_method_samples_with_its_path_kl(pipeline, method, models["clip"], (3, SIZE, SIZE))
