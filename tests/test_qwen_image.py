"""Qwen-Image (msdda.models.qwen_image, one family file) on a tiny random QwenImagePipeline built offline: msdda's one
denoising loop against the stock pipeline (the Qwen2.5-VL prompt encoding padded to a fixed length, true CFG with its
norm rescaling, packed latents, the exponential dynamic shift, the 3-D VAE), the two recipes trained with both
estimators and every step reward, resume, the export that stock ``load_lora_weights`` loads at its alpha, and fusion
of two Qwen-Image adapters (every method; adapters of another family refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import save_file

from msdda.adapters import load_adapter_metadata
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
from msdda.rewards.clip import AestheticHead
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_qwen_image
from msdda.train import TrainConfig
from tests import flow_checks
from tests.flow_checks import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
"""Pixels: 8x8 latents (the tiny VAE downsamples 4x), 16 packed patches."""
TOKENS = 48
"""Text rows every prompt is padded to: the tiny tokenizer spends one token per byte of a prompt."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_qwen_image")
    torch.manual_seed(0)
    save_file(AestheticHead(dim=16).state_dict(), root / "aesthetic_head.safetensors")
    return {"qwen": str(tiny_qwen_image(root / "qwen")), "clip": str(tiny_clip(root / "clip")),
            "aesthetic_head": str(root / "aesthetic_head.safetensors")}


def _config(models, output_dir: Path, *overrides: str, recipe: str = "pickscore") -> TrainConfig:
    return flow_checks.toy_recipe_config(ROOT / f"configs/train/qwen_image_{recipe}.yaml", models["qwen"], models,
                                         output_dir, SIZE, TOKENS, *overrides)


def test_the_loop_at_noise_level_0_is_the_stock_qwen_image_pipeline(models) -> None:
    """With the flow SDE's noise at 0 its kernel is the Euler step: msdda's loop (the prompts and the negative " "
    encoded and padded, true CFG rescaled per patch, the transformer on packed latents, the pipeline's sigmas with the
    exponential dynamic shift, x_1 and the VAE's latent statistics) must then give the stock pipeline's latents and
    images."""
    pipeline = load_base_pipeline(models["qwen"], "flow")
    call = dict(prompt=PROMPTS[:2], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3, height=SIZE,
                width=SIZE, max_sequence_length=TOKENS)
    stock = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images
    stock_sigmas = pipeline.scheduler.sigmas.clone()

    positive, negative = encode_prompts(pipeline, PROMPTS[:2], torch.device("cpu"), max_sequence_length=TOKENS)
    assert positive.shape == negative.shape == (2, TOKENS, 32)
    latents = prepare_sampling(pipeline, 3, 2, torch.Generator().manual_seed(3), positive, SIZE, SIZE)
    scheduler, transformer = pipeline.scheduler, pipeline.transformer
    assert torch.equal(scheduler.sigmas, stock_sigmas) and scheduler.sigmas[-2] == pytest.approx(0.02)

    def euler(_index, timestep, x_t):
        output = guided_output(transformer, x_t, timestep, positive, negative, 4.0)
        return sampler_kernel(scheduler, output, timestep, x_t, 0.0)

    ours = denoise(scheduler.timesteps, latents, euler)
    batch, channels, height, width = ours.shape
    torch.testing.assert_close(QwenImagePipeline._pack_latents(ours, batch, channels, height, width), stock,
                               rtol=1e-5, atol=1e-5)
    images = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(decode_latents(pipeline, ours), images, rtol=1e-5, atol=1e-5)


def test_padding_the_text_does_not_change_the_velocity_and_sizes_are_checked(models) -> None:
    """The padded rows are masked out: the velocity is the one of the unpadded sequence; the shift follows the image
    size as QwenImagePipeline computes it; sizes that do not split into patches and over-long texts are refused."""
    pipeline = load_base_pipeline(models["qwen"], "flow")
    cpu = torch.device("cpu")
    padded, _ = encode_prompts(pipeline, PROMPTS[:1], cpu, max_sequence_length=TOKENS)
    unpadded, _ = pipeline.encode_prompt(PROMPTS[:1], device=cpu, max_sequence_length=TOKENS)
    assert unpadded.shape[1] < TOKENS and torch.equal(padded[:, :unpadded.shape[1]], unpadded)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(denoiser_forward(pipeline.transformer, sample, torch.tensor(700.0), padded),
                                   denoiser_forward(pipeline.transformer, sample, torch.tensor(700.0), unpadded),
                                   rtol=1e-5, atol=1e-6)
    small, large = latent_shape(pipeline, 1, SIZE, SIZE), latent_shape(pipeline, 1, 256, 256)
    assert small == (1, 4, 8, 8) and large == (1, 4, 64, 64)
    assert dynamic_shift_mu(pipeline, large, 10) == pytest.approx(0.5 + (1024 - 256) * 0.4 / (8192 - 256))
    with pytest.raises(UserError, match="height 36 px does not fit a QwenImagePipeline.*multiples of 8 px"):
        latent_shape(pipeline, 1, 36, SIZE)
    with pytest.raises(UserError, match="max_sequence_length=2000"):
        encode_prompts(pipeline, PROMPTS[:1], cpu, max_sequence_length=2000)


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    return flow_checks.train_each_estimator(lambda *args, **kwargs: _config(models, *args, **kwargs),
                                            tmp_path_factory.mktemp("qwen_image_runs"))


@pytest.mark.parametrize("estimator", ["pathwise", "policy-gradient"])
def test_the_exported_adapter_loads_with_stock_load_lora_weights(models, trained, estimator: str) -> None:
    """The file holds the LoRA at its trained alpha (2x the rank here) on attention and feed-forward layers: the
    stock QwenImagePipeline with it loaded predicts the trained transformer's velocity, which differs from the
    base's."""
    final, transformer = trained[estimator]
    metadata = load_adapter_metadata(final)
    assert (metadata.pipeline_class, metadata.scheduler_class) == ("QwenImagePipeline",
                                                                   "FlowMatchEulerDiscreteScheduler")
    assert (metadata.flow_noise_level, metadata.num_inference_steps, metadata.resolution) == (1.2, 3, SIZE)
    assert metadata.flow_shift is None and metadata.flow_mu == pytest.approx(0.5 + (16 - 256) * 0.4 / (8192 - 256))
    assert metadata.eta is None and metadata.guidance_scale == 4.0 and metadata.max_sequence_length == TOKENS
    assert "img_mlp.net.2" in metadata.lora_target_modules
    stock = QwenImagePipeline.from_pretrained(models["qwen"], local_files_only=True)
    flow_checks.assert_stock_loader_reproduces_the_trained_transformer(stock, final, transformer, (4, 8, 8),
                                                                       max_sequence_length=TOKENS)


@pytest.mark.parametrize("estimator,step_reward", [("pathwise", "rollout"), ("policy-gradient", "tweedie"),
                                                   ("policy-gradient", "rollout")])
def test_the_other_step_rewards_train(models, tmp_path, estimator: str, step_reward: str) -> None:
    flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", f"train.estimator={estimator}",
                                                f"reward.step_reward={step_reward}"))


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, tmp_path) -> None:
    flow_checks.assert_resume_on_the_cheapest_estimator_is_bit_equal(
        lambda output_dir, *overrides: _config(models, output_dir, *overrides), tmp_path)


def test_fusion_refuses_an_adapter_of_another_family(trained, tmp_path) -> None:
    flow_checks.assert_fusion_refuses_an_adapter_of_another_family(trained["pathwise"][0], tmp_path,
                                                                   "QwenImagePipeline")


def _fusing_pipeline(models, trained, *estimators: str):
    return flow_checks.fusing_pipeline(models["qwen"], [trained[estimator][0] for estimator in estimators])


def test_single_at_noise_level_0_is_the_stock_qwen_image_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, QwenImagePipeline) and type(pipeline).__name__ == "MSDDAQwenImagePipeline"
    stock = QwenImagePipeline.from_pretrained(models["qwen"], local_files_only=True)
    # the fusing pipeline samples at the adapter's resolution, text length and guidance; the stock one is told them
    flow_checks.assert_single_at_noise_level_0_is_the_stock_pipeline(
        pipeline, stock, trained["pathwise"][0],
        dict(height=SIZE, width=SIZE, max_sequence_length=TOKENS, negative_prompt=" ", true_cfg_scale=4.0),
        num_inference_steps=3)


def test_msdda_fuses_two_qwen_image_adapters_with_one_transformer_forward_per_step(models, trained) -> None:
    # both adapters' rows and their negative rows in one batch, for each of 3 steps
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_one_transformer_forward_per_step(pipeline, 3, (3, SIZE, SIZE))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_qwen_image_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_method_samples_with_its_path_kl(pipeline, method, models["clip"], (3, SIZE, SIZE))
