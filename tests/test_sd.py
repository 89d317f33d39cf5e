"""Stable Diffusion code paths on tiny randomly initialised SD 1.5-shaped pipelines built offline: one epoch
with each reward, the export, v-prediction (SD 2.x), and a two-adapter MSDDA fusion, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from msdda.adapters import load_adapter_metadata
from msdda.config import load_config
from msdda.fuse import MSDDAPipeline
from msdda.rewards.clip import AestheticHead
from msdda.testing import tiny_blip, tiny_clip, tiny_stable_diffusion
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red car", "a blue bird on a tree"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    aesthetic_head, imagereward_head = AestheticHead(dim=16), AestheticHead(dim=32)
    save_file(aesthetic_head.state_dict(), root / "aesthetic_head.safetensors")
    save_file(imagereward_head.state_dict(), root / "imagereward_head.safetensors")
    return {"sd": str(tiny_stable_diffusion(root / "sd")), "sd_v": str(tiny_stable_diffusion(root / "sd_v", "v_prediction")),
            "clip": str(tiny_clip(root / "clip")), "blip": str(tiny_blip(root / "blip")),
            "aesthetic_head": str(root / "aesthetic_head.safetensors"),
            "imagereward_head": str(root / "imagereward_head.safetensors")}


def _reward_settings(name: str, models: dict[str, str]) -> dict:
    kwargs = {"clip-score": {"model": models["clip"]}, "pickscore": {"model": models["clip"], "processor": models["clip"]},
              "hpsv2": {"model": models["clip"], "processor": models["clip"]},
              "laion-aesthetic": {"model": models["clip"], "head": models["aesthetic_head"]},
              "imagereward": {"model": models["blip"], "head": models["imagereward_head"]},
              "jpeg-compressibility": {}}[name]
    return {"name": name, "kwargs": kwargs}


def _train(models, tmp_path: Path, reward: str, *overrides: str, base: str = "sd") -> Path:
    config = load_config(TrainConfig, ROOT / "configs/train/sd15_pickscore.yaml", [
        f"base={models[base]}", f"prompts={PROMPTS}", f"output_dir={tmp_path / reward}", "epochs=1",
        "mixed_precision=no", "sampling.num_inference_steps=2", "sampling.batch_size=2",
        "sampling.batches_per_epoch=1", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "sample_every=0", "log_with=null", "checkpoint.every=1", "lora.rank=2", "lora.alpha=2", *overrides])
    settings = _reward_settings(reward, models)
    config.reward.name, config.reward.kwargs = settings["name"], settings["kwargs"]
    return Trainer(config).run()


@pytest.mark.parametrize("reward", ["clip-score", "pickscore", "hpsv2", "laion-aesthetic", "imagereward",
                                    "jpeg-compressibility"])
def test_one_epoch_with_each_reward_exports_an_adapter(models, tmp_path, reward: str) -> None:
    # differentiable rewards train with the recipes' pathwise estimator; JPEG size is not differentiable
    estimator = ["train.estimator=policy-gradient", "reward.step_reward=terminal"] \
        if reward == "jpeg-compressibility" else []
    final = _train(models, tmp_path, reward, *estimator)
    metadata = load_adapter_metadata(final)
    assert metadata.reward_name == reward and metadata.reward_version
    assert metadata.scheduler_class == "DDIMScheduler" and metadata.num_inference_steps == 2


def test_the_recipes_own_precision_bf16_with_checkpointing_trains(models, tmp_path, fresh_accelerator_state) -> None:
    """The SD recipes run in bf16 with gradient checkpointing (UNet and, for pathwise, the VAE decoder), on every
    step, so also through the reference forward that the tweedie reward takes at x_{t-1}."""
    final = _train(models, tmp_path, "clip-score", "mixed_precision=bf16", "train.gradient_checkpointing=true",
                   "train.timestep_fraction=1.0")
    assert load_adapter_metadata(final).training["last_reward_mean"] is not None


def test_v_prediction_base_trains_and_fuses(models, tmp_path) -> None:
    final = _train(models, tmp_path, "clip-score", "train.gradient_checkpointing=true", base="sd_v")
    pipe = MSDDAPipeline.from_pretrained(models["sd_v"], adapters=[str(final)])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe(PROMPTS[0], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_two_adapter_msdda_fusion_on_stable_diffusion(models, tmp_path) -> None:
    first = _train(models, tmp_path, "clip-score", "seed=1")
    second = _train(models, tmp_path, "laion-aesthetic", "seed=2")
    pipe = MSDDAPipeline.from_pretrained(models["sd"], adapters=[str(first), str(second)])
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs) -> torch.Tensor:
        return pipe(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images

    fused = sample(weights=[0.5, 0.5])
    assert fused.shape == (3, 3, 16, 16) and torch.isfinite(fused).all()
    torch.testing.assert_close(sample(weights=[1.0, 0.0]), sample(weights=[1.0, 0.0], method="single"))
    assert not torch.equal(fused, sample(weights=[1.0, 0.0]))
