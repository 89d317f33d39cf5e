"""Stable Diffusion XL (msdda.models.sdxl, one family file) on a tiny random StableDiffusionXLPipeline built offline:
msdda's loop against the stock pipeline, one epoch of the recipe with each estimator, the export loading with the
stock ``load_lora_weights``, and fusion of two adapters, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from msdda.adapters import load_adapter_metadata
from msdda.config import load_config
from msdda.diffusion import (
    decode_latents,
    encode_prompts,
    guided_output,
    load_base_pipeline,
    prepare_sampling,
    sampler_kernel,
)
from msdda.fuse.methods import method_names
from msdda.fuse.pipeline import MSDDAPipeline
from msdda.sampling import denoise
from msdda.testing import tiny_clip, tiny_stable_diffusion_xl
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer
from tests import flow_checks
from tests.flow_checks import PROMPTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_sdxl")
    return {"sdxl": str(tiny_stable_diffusion_xl(root / "sdxl")), "clip": str(tiny_clip(root / "clip"))}


def _config(models, output_dir: Path, *overrides: str) -> TrainConfig:
    """The SDXL PickScore recipe at toy size, scored by CLIP score under a tiny CLIP (differentiable, offline)."""
    config = load_config(TrainConfig, ROOT / "configs/train/sdxl_pickscore.yaml", [
        f"base={models['sdxl']}", f"prompts={PROMPTS}", f"output_dir={output_dir}", "epochs=1", "mixed_precision=no",
        "sampling.num_inference_steps=3", "sampling.batch_size=2", "sampling.batches_per_epoch=1",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.learning_rate=0.01", "sample_every=0",
        "log_with=null", "checkpoint.every=1", "lora.rank=2", "lora.alpha=4", *overrides])
    config.reward.name, config.reward.kwargs = "clip-score", {"model": models["clip"]}
    return config


@pytest.mark.parametrize("size", [None, (16, 32)])
def test_the_loop_at_eta_0_is_the_stock_sdxl_pipeline(models, size) -> None:
    """With DDIM's eta at 0 msdda's loop (both text encoders, the pooled projection and time ids packed into the
    conditioning and handed to the UNet as added_cond_kwargs, CFG with the zeroed negative) must give the stock
    pipeline's latents and images, at the default size and at another one (whose time ids differ)."""
    pipeline = load_base_pipeline(models["sdxl"], "ddim")
    sides = {} if size is None else {"height": size[0], "width": size[1]}
    stock = pipeline(PROMPTS[:2], num_inference_steps=4, guidance_scale=4.5, eta=0.0, output_type="latent",
                     generator=torch.Generator().manual_seed(3), **sides).images

    positive, negative = encode_prompts(pipeline, PROMPTS[:2], torch.device("cpu"), size=size)
    latents = prepare_sampling(pipeline, 4, 2, torch.Generator().manual_seed(3), positive, *(size or (None, None)))
    scheduler, unet = pipeline.scheduler, pipeline.unet

    def ddim(_index, timestep, x_t):
        return sampler_kernel(scheduler, guided_output(unet, x_t, timestep, positive, negative, 4.5), timestep, x_t,
                              0.0)

    ours = denoise(scheduler.timesteps, latents, ddim)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    stock_images = pipeline.image_processor.postprocess(
        pipeline.vae.decode(stock / pipeline.vae.config.scaling_factor).sample, output_type="pt")
    torch.testing.assert_close(decode_latents(pipeline, ours), stock_images, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One epoch of the recipe with each estimator: (the exported adapter, the trained UNet)."""
    root, runs = tmp_path_factory.mktemp("sdxl_runs"), {}
    for estimator, step_reward in (("pathwise", "tweedie"), ("policy-gradient", "terminal")):
        trainer = Trainer(_config(models, root / estimator, f"train.estimator={estimator}",
                                  f"reward.step_reward={step_reward}"))
        runs[estimator] = (trainer.run(), trainer.unwrapped)
    return runs


@pytest.mark.parametrize("estimator", ["pathwise", "policy-gradient"])
def test_the_exported_adapter_loads_with_stock_load_lora_weights(models, trained, estimator: str) -> None:
    """The stock pipeline with the adapter loaded by its own ``load_lora_weights`` predicts the trained UNet's noise,
    which differs from the base's; the metadata names SDXL's pipeline and DDIM's eta."""
    final, unet = trained[estimator]
    metadata = load_adapter_metadata(final)
    assert (metadata.pipeline_class, metadata.scheduler_class, metadata.eta) == ("StableDiffusionXLPipeline",
                                                                                "DDIMScheduler", 1.0)
    assert metadata.flow_noise_level is None and metadata.training["last_kl"] is not None
    stock = StableDiffusionXLPipeline.from_pretrained(models["sdxl"], local_files_only=True)
    # the UNet's outputs are of order 1; its convolutions sum the LoRA in another order than PEFT's training layers
    flow_checks.assert_stock_loader_reproduces_the_trained_transformer(stock, final, unet, (4, 8, 8), timestep=751,
                                                                       atol=1e-5)


def _fusing_pipeline(models, trained, *estimators: str):
    return flow_checks.fusing_pipeline(models["sdxl"], [trained[estimator][0] for estimator in estimators])


def test_single_at_eta_0_is_the_stock_sdxl_pipeline_with_the_lora_loaded(models, trained) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise")
    assert isinstance(pipeline, StableDiffusionXLPipeline) and type(pipeline).__name__ == "MSDDAXLPipeline"
    with pytest.warns(UserWarning, match="eta=0 makes every step deterministic"):
        ours = pipeline(PROMPTS[:2], method="single", eta=0.0, num_inference_steps=3, guidance_scale=4.5,
                        output_type="pt", generator=torch.Generator().manual_seed(5)).images
    stock = StableDiffusionXLPipeline.from_pretrained(models["sdxl"], local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(trained["pathwise"][0])
    expected = stock(PROMPTS[:2], eta=0.0, num_inference_steps=3, guidance_scale=4.5, output_type="pt",
                     generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_msdda_fuses_two_sdxl_adapters_with_one_unet_forward_per_step(models, trained) -> None:
    """Both adapters' conditional and unconditional rows in one UNet batch per step; (1, 0) is ``single``."""
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    forwards = []
    handle = pipeline.unet.register_forward_hook(lambda module, args, output: forwards.append(len(args[0])))

    def sample(**kwargs) -> torch.Tensor:
        return pipeline(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images

    fused = sample(weights=[0.5, 0.5])
    handle.remove()
    assert forwards == [2 * 2 * len(PROMPTS)] * 3  # adapters x (negative, positive) x prompts, for each of 3 steps
    assert fused.shape == (len(PROMPTS), 3, 16, 16) and torch.isfinite(fused).all()
    torch.testing.assert_close(sample(weights=[1.0, 0.0]), sample(weights=[1.0, 0.0], method="single"))
    assert not torch.equal(fused, sample(weights=[1.0, 0.0]))


@pytest.mark.parametrize("method", method_names())
def test_every_fusion_method_samples_sdxl_with_its_path_kl(models, trained, method: str) -> None:
    pipeline = _fusing_pipeline(models, trained, "pathwise", "policy-gradient")
    flow_checks.assert_method_samples_with_its_path_kl(pipeline, method, models["clip"], (3, 16, 16))


def test_an_sdxl_base_loads_as_its_own_fusing_pipeline(models) -> None:
    pipeline = MSDDAPipeline.from_pretrained(models["sdxl"])
    assert type(pipeline).__name__ == "MSDDAXLPipeline" and pipeline.family.name == "StableDiffusionXLPipeline"
