"""Stable Diffusion 3 code paths on a tiny randomly initialised SD 3.5-shaped pipeline built offline: msdda's one
denoising loop against the stock StableDiffusion3Pipeline, the recipes' training with every estimator and step
reward, resume, the export that stock ``load_lora_weights`` loads, and fusion and evaluation of flow adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata
from msdda.config import load_config
from msdda.diffusion import (
    decode_latents,
    encode_prompts,
    guided_output,
    load_base_pipeline,
    pack_conditioning,
    sampler_kernel,
    unpack_conditioning,
)
from msdda.errors import UserError
from msdda.fuse.methods import method_names
from msdda.fuse.pipeline import MSDDA3Pipeline
from msdda.kernels import initial_latents
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_stable_diffusion, tiny_stable_diffusion_3
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer
from tests import flow_checks
from tests.flow_checks import PROMPTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_sd3")
    return {"sd3": str(tiny_stable_diffusion_3(root / "sd3")), "clip": str(tiny_clip(root / "clip"))}


def _config(models, output_dir: Path, *overrides: str) -> TrainConfig:
    """The SD 3.5 PickScore recipe at toy size, scored by CLIP score under a tiny CLIP (differentiable, offline)."""
    config = load_config(TrainConfig, ROOT / "configs/train/sd35_pickscore.yaml", [
        f"base={models['sd3']}", f"prompts={PROMPTS}", f"output_dir={output_dir}", "epochs=1", "mixed_precision=no",
        "sampling.num_inference_steps=3", "sampling.batch_size=2", "sampling.batches_per_epoch=1",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.learning_rate=0.01", "sample_every=0",
        "log_with=null", "checkpoint.every=1", "lora.rank=2", "lora.alpha=4", *overrides])
    config.reward.name, config.reward.kwargs = "clip-score", {"model": models["clip"]}
    return config


def test_the_loop_at_noise_level_0_is_the_stock_sd3_pipeline(models) -> None:
    """With the flow SDE's noise at 0 its kernel is the Euler step: msdda's loop (prompt encoding with pooled
    projections packed in, CFG with the negative branch, the transformer's forward, the shifted schedule, x_1 and
    the VAE's shift) must then give the stock pipeline's latents and images."""
    pipeline = load_base_pipeline(models["sd3"], "flow")
    call = dict(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=4.5)
    stock = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images

    positive, negative = encode_prompts(pipeline, PROMPTS[:2], torch.device("cpu"))
    scheduler, transformer = pipeline.scheduler, pipeline.transformer
    scheduler.set_timesteps(4)
    shape = (2, transformer.config.in_channels, transformer.config.sample_size, transformer.config.sample_size)
    latents = initial_latents(scheduler, shape, torch.Generator().manual_seed(3), positive)

    def euler(_index, timestep, x_t):
        output = guided_output(transformer, x_t, timestep, positive, negative, 4.5)
        return sampler_kernel(scheduler, output, timestep, x_t, 0.0)

    ours = denoise(scheduler.timesteps, latents, euler)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    images = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(decode_latents(pipeline, ours), images, rtol=1e-5, atol=1e-5)
    assert scheduler.config.shift == 3.0 and not any(p.requires_grad for p in transformer.parameters())


@pytest.mark.parametrize("pooled_width", [24, 64, 100])
def test_pooled_projections_travel_packed_in_the_conditioning(pooled_width: int) -> None:
    sequence, pooled = torch.randn(3, 5, 32), torch.randn(3, pooled_width)
    packed = pack_conditioning(sequence, pooled)
    assert packed.shape == (3, 5 + -(-pooled_width // 32), 32)
    rows = torch.tensor([2, 0])  # what the update pass does with the trajectories' conditioning
    unpacked_sequence, unpacked_pooled = unpack_conditioning(packed[rows], pooled_width)
    assert torch.equal(unpacked_sequence, sequence[rows]) and torch.equal(unpacked_pooled, pooled[rows])


def test_a_sampler_that_does_not_fit_the_base_is_refused_before_loading(models, tmp_path) -> None:
    with pytest.raises(UserError, match=r"StableDiffusion3Pipeline.*sampling.scheduler in \['flow'\]"):
        load_base_pipeline(models["sd3"], "ddim")
    sd = tiny_stable_diffusion(tmp_path / "sd")
    with pytest.raises(UserError, match=r"StableDiffusionPipeline.*\['ddim', 'ddpm'\]"):
        load_base_pipeline(str(sd), "flow")
    video = tmp_path / "wan"
    video.mkdir()
    (video / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(UserError, match="is a WanPipeline"):
        load_base_pipeline(str(video), "flow")
    with pytest.raises(UserError, match="sampling.flow_noise_level=0.0"):
        _config(models, tmp_path / "run", "sampling.flow_noise_level=0").validate()


def test_a_t5_length_is_a_setting_of_t5_pipelines_only(models, tmp_path) -> None:
    sd3 = load_base_pipeline(models["sd3"], "flow")
    short, _ = encode_prompts(sd3, PROMPTS[:1], torch.device("cpu"), max_sequence_length=16)
    default, _ = encode_prompts(sd3, PROMPTS[:1], torch.device("cpu"))
    assert default.shape[1] - short.shape[1] == 256 - 16  # SD3's default T5 length is 256
    sd = load_base_pipeline(str(tiny_stable_diffusion(tmp_path / "sd")), "ddim")
    with pytest.raises(UserError, match="max_sequence_length=64 sets the T5 token count of SD3 and FLUX"):
        encode_prompts(sd, PROMPTS[:1], torch.device("cpu"), max_sequence_length=64)


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One epoch of the recipe with each estimator: (the exported adapter, the trained transformer)."""
    root, runs = tmp_path_factory.mktemp("sd3_runs"), {}
    for estimator, step_reward in (("pathwise", "tweedie"), ("policy-gradient", "terminal")):
        trainer = Trainer(_config(models, root / estimator, f"train.estimator={estimator}",
                                  f"reward.step_reward={step_reward}"))
        runs[estimator] = (trainer.run(), trainer.unwrapped)
    return runs


@pytest.mark.parametrize("estimator", ["pathwise", "policy-gradient"])
def test_the_exported_adapter_loads_with_stock_load_lora_weights(models, trained, estimator: str) -> None:
    """The file holds the LoRA at its trained alpha (2x the rank here): the stock pipeline with it loaded predicts
    the trained transformer's velocity, which differs from the base's."""
    final, transformer = trained[estimator]
    metadata = load_adapter_metadata(final)
    assert (metadata.pipeline_class, metadata.scheduler_class) == ("StableDiffusion3Pipeline",
                                                                  "FlowMatchEulerDiscreteScheduler")
    assert (metadata.flow_noise_level, metadata.flow_shift, metadata.num_inference_steps) == (0.7, 3.0, 3)
    assert metadata.eta is None

    stock = StableDiffusion3Pipeline.from_pretrained(models["sd3"], local_files_only=True)
    flow_checks.assert_stock_loader_reproduces_the_trained_transformer(stock, final, transformer, (4, 8, 8))


@pytest.mark.parametrize("estimator,step_reward", [("pathwise", "rollout"), ("policy-gradient", "tweedie"),
                                                   ("policy-gradient", "rollout")])
def test_the_other_step_rewards_train(models, tmp_path, estimator: str, step_reward: str) -> None:
    flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", f"train.estimator={estimator}",
                                                f"reward.step_reward={step_reward}"))


def test_the_recipes_own_precision_bf16_trains(models, tmp_path, fresh_accelerator_state) -> None:
    final = flow_checks.assert_trains_one_epoch(_config(models, tmp_path / "run", "mixed_precision=bf16"))
    assert all(value.dtype == torch.float32 for value in load_file(final / WEIGHTS_FILE).values())


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, tmp_path) -> None:
    flow_checks.assert_resume_is_bit_equal(lambda output_dir, *overrides: _config(models, output_dir, *overrides),
                                           tmp_path)


@pytest.mark.parametrize("field,value", [("flow_noise_level", 0.5), ("flow_shift", 1.0)])
def test_fusion_refuses_flow_adapters_whose_sampler_differs_naming_the_field(trained, tmp_path, field: str,
                                                                             value: float) -> None:
    flow_checks.assert_fusion_refuses_a_changed_field(trained["pathwise"][0], tmp_path, field, value)


def _fusing_pipeline(models, trained, *estimators: str):
    return flow_checks.fusing_pipeline(models["sd3"], [trained[estimator][0] for estimator in estimators])


def test_single_at_noise_level_0_is_the_stock_sd3_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, MSDDA3Pipeline) and isinstance(pipeline, StableDiffusion3Pipeline)
    stock = StableDiffusion3Pipeline.from_pretrained(models["sd3"], local_files_only=True)
    flow_checks.assert_single_at_noise_level_0_is_the_stock_pipeline(
        pipeline, stock, trained["pathwise"][0], {}, num_inference_steps=3, guidance_scale=4.5)


def test_msdda_fuses_two_sd3_adapters_with_one_transformer_forward_per_step(models, trained) -> None:
    # the adapters' conditional and unconditional rows in one batch, for each of 3 steps
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_one_transformer_forward_per_step(pipeline, 3, (3, 16, 16))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_sd3_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_method_samples_with_its_path_kl(pipeline, method, models["clip"], (3, 16, 16))


def test_evaluate_compares_an_sd3_adapter_with_its_base(trained) -> None:
    flow_checks.assert_evaluate_reports_a_kl(trained["pathwise"][0], "clip-score")
