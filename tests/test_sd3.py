"""Stable Diffusion 3 code paths on a tiny randomly initialised SD 3.5-shaped pipeline built offline: msdda's one
denoising loop against the stock StableDiffusion3Pipeline, the recipes' training with every estimator and step
reward, resume, the export that stock ``load_lora_weights`` loads, and fusion and evaluation of flow adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata, weights_hash
from msdda.config import load_config
from msdda.diffusion import (
    decode_latents,
    denoiser_forward,
    encode_prompts,
    guided_output,
    load_base_pipeline,
    pack_conditioning,
    sampler_kernel,
    unpack_conditioning,
)
from msdda.errors import UserError
from msdda.fuse.methods import method_names
from msdda.fuse.pipeline import MSDDA3Pipeline, MSDDAPipeline, read_adapters
from msdda.kernels import initial_latents
from msdda.rewards import load_reward
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_stable_diffusion, tiny_stable_diffusion_3
from msdda.train import TrainConfig
from msdda.train.evaluate import evaluate_adapter
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red car", "a blue bird on a tree"]


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
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="is a FluxPipeline"):
        load_base_pipeline(str(flux), "flow")
    with pytest.raises(UserError, match="sampling.flow_noise_level=0.0"):
        _config(models, tmp_path / "run", "sampling.flow_noise_level=0").validate()


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
    assert metadata.eta is None and "StableDiffusion3Pipeline.from_pretrained" in (final / "README.md").read_text()

    pipeline = StableDiffusion3Pipeline.from_pretrained(models["sd3"], local_files_only=True)
    assert metadata.base_model_hash == weights_hash(pipeline.transformer)  # the base stayed bit-identical
    positive, _ = encode_prompts(pipeline, PROMPTS, torch.device("cpu"))
    sample = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(751.0)
    with torch.no_grad():
        base = denoiser_forward(pipeline.transformer, sample, timestep, positive)
        pipeline.load_lora_weights(final)
        loaded = denoiser_forward(pipeline.transformer, sample, timestep, positive)
        ours = denoiser_forward(transformer, sample, timestep, positive)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3


@pytest.mark.parametrize("estimator,step_reward", [("pathwise", "rollout"), ("policy-gradient", "tweedie"),
                                                   ("policy-gradient", "rollout")])
def test_the_other_step_rewards_train(models, tmp_path, estimator: str, step_reward: str) -> None:
    final = Trainer(_config(models, tmp_path / "run", f"train.estimator={estimator}",
                            f"reward.step_reward={step_reward}")).run()
    training = load_adapter_metadata(final).training
    assert training["epochs"] == 1 and training["last_kl"] is not None


def test_the_recipes_own_precision_bf16_trains(models, tmp_path, fresh_accelerator_state) -> None:
    final = Trainer(_config(models, tmp_path / "run", "mixed_precision=bf16")).run()
    assert load_adapter_metadata(final).training["last_reward_mean"] is not None
    assert all(value.dtype == torch.float32 for value in load_file(final / WEIGHTS_FILE).values())


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(models, tmp_path) -> None:
    uninterrupted = Trainer(_config(models, tmp_path / "a", "epochs=2")).run()
    Trainer(_config(models, tmp_path / "b", "epochs=1")).run()
    resumed = Trainer(_config(models, tmp_path / "b", "epochs=2", "resume=latest")).run()
    a, b = load_file(uninterrupted / WEIGHTS_FILE), load_file(resumed / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_adapter_metadata(resumed).training["epochs"] == 2


@pytest.mark.parametrize("field,value", [("flow_noise_level", 0.5), ("flow_shift", 1.0)])
def test_fusion_refuses_flow_adapters_whose_sampler_differs_naming_the_field(trained, tmp_path, field: str,
                                                                             value: float) -> None:
    first, _ = trained["pathwise"]
    other = Path(shutil.copytree(first, tmp_path / "other"))
    data = json.loads((other / "msdda_adapter.json").read_text())
    data[field] = value
    (other / "msdda_adapter.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"{field} is {value}"):
        read_adapters([str(first), str(other)])


def _fusing_pipeline(models, trained, *estimators: str):
    pipeline = MSDDAPipeline.from_pretrained(models["sd3"], adapters=[str(trained[e][0]) for e in estimators])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_single_at_noise_level_0_is_the_stock_sd3_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, MSDDA3Pipeline) and isinstance(pipeline, StableDiffusion3Pipeline)
    call = dict(num_inference_steps=3, guidance_scale=4.5, output_type="pt")
    with pytest.warns(UserWarning, match="flow_noise_level=0 makes every step deterministic"):
        ours = pipeline(PROMPTS[:2], method="single", flow_noise_level=0.0, **call,
                        generator=torch.Generator().manual_seed(5)).images
    stock = StableDiffusion3Pipeline.from_pretrained(models["sd3"], local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(trained["pathwise"][0])
    expected = stock(PROMPTS[:2], **call, generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="eta=1.0 is DDIM's setting"):
        pipeline(PROMPTS[0], eta=1.0)


def test_msdda_fuses_two_sd3_adapters_with_one_transformer_forward_per_step(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    forwards = []
    handle = pipeline.transformer.register_forward_hook(lambda module, args, output: forwards.append(1))

    def sample(**kwargs) -> torch.Tensor:
        return pipeline(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images

    fused = sample(weights=[0.5, 0.5])
    handle.remove()
    assert len(forwards) == 3  # the adapters' conditional and unconditional rows in one batch, for each of 3 steps
    assert fused.shape == (3, 3, 16, 16) and torch.isfinite(fused).all()
    torch.testing.assert_close(sample(weights=[1.0, 0.0]), sample(weights=[1.0, 0.0], method="single"))
    assert not torch.equal(fused, sample(weights=[1.0, 0.0]))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_sd3_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    rewards = [load_reward("clip-score", model=models["clip"])] * 2
    output = pipeline(PROMPTS[:2], weights=[0.3, 0.7], method=method, output_type="pt", rewards=rewards,
                      code_candidates=2, code_block=2, return_kl=True, generator=torch.Generator().manual_seed(1))
    assert output.images.shape == (2, 3, 16, 16) and torch.isfinite(output.images).all()
    kl = output.kl_to_base
    if method == "code":  # a selection among samples, not one Gaussian kernel
        assert torch.isnan(kl).all()
    elif method == "base":
        assert torch.equal(kl, torch.zeros_like(kl))
    else:
        assert (kl > 0).all()


def test_evaluate_compares_an_sd3_adapter_with_its_base(trained) -> None:
    report = evaluate_adapter(str(trained["pathwise"][0]), prompts=PROMPTS, num_prompts=None, seeds=[0],
                              batch_size=3, device="cpu")
    assert report["samples"] == 3 and report["kl_to_base"]["mean"] > 0
    assert "clip-score" in report["rewards"]
