"""Checks that every flow-matching pipeline class (SD3, FLUX, Qwen-Image, FLUX.2) must pass, shared by
tests/test_sd3.py, tests/test_flux.py, tests/test_qwen_image.py and tests/test_flux2.py (and, where they hold of any
family, tests/test_sdxl.py): each test module builds its tiny pipeline and trained adapters, these say what must hold
of them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata, weights_hash
from msdda.config import load_config
from msdda.diffusion import denoiser_forward, denoiser_of, encode_prompts
from msdda.errors import UserError
from msdda.fuse.pipeline import MSDDAPipeline, read_adapters
from msdda.rewards import load_reward
from msdda.testing import random_world_adapter
from msdda.train import TrainConfig
from msdda.train.evaluate import evaluate_adapter
from msdda.train.trainer import Trainer

PROMPTS = ["a photo of a cat", "a red car", "a blue bird on a tree"]


def toy_recipe_config(recipe: Path, base: str, models: dict[str, str], output_dir: Path, size: int, tokens: int,
                      *overrides: str) -> TrainConfig:
    """A pickscore or aesthetic flow ``recipe`` at toy size (``size`` px, ``tokens`` text tokens, 3 steps, rank 2 at
    alpha 4, no final gauge) on ``base``, its reward on the tiny CLIP of ``models`` (and, for aesthetic, the random
    head ``models["aesthetic_head"]``)."""
    config = load_config(TrainConfig, recipe, [
        f"base={base}", f"prompts={PROMPTS}", f"output_dir={output_dir}", "epochs=1", "mixed_precision=no",
        f"sampling.resolution={size}", "sampling.num_inference_steps=3", "sampling.batch_size=2",
        f"sampling.max_sequence_length={tokens}", "sampling.batches_per_epoch=1", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.timestep_fraction=1.0", "train.learning_rate=0.01",
        "sample_every=0", "log_with=null", "checkpoint.every=1", "train.gauge_prompts=0", "lora.rank=2", "lora.alpha=4",
        *overrides])
    config.reward.kwargs = ({"model": models["clip"], "processor": models["clip"]} if "pickscore" in recipe.name else
                            {"model": models["clip"], "head": models["aesthetic_head"]})
    return config


def train_each_estimator(config: Callable[..., TrainConfig], root: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One epoch of the pickscore recipe pathwise through ``tweedie`` and of the aesthetic one by policy gradient on
    the ``terminal`` reward (``config(output_dir, *overrides, recipe=...)``): estimator -> (the exported adapter, the
    trained transformer)."""
    runs = {}
    for estimator, step_reward, recipe in (("pathwise", "tweedie", "pickscore"),
                                           ("policy-gradient", "terminal", "aesthetic")):
        trainer = Trainer(config(root / estimator, f"train.estimator={estimator}", f"reward.step_reward={step_reward}",
                                 recipe=recipe))
        runs[estimator] = (trainer.run(), trainer.unwrapped)
    return runs


def assert_resume_on_the_cheapest_estimator_is_bit_equal(config: Callable[..., TrainConfig], root: Path) -> None:
    """:func:`assert_resume_is_bit_equal` by policy gradient on the ``terminal`` reward: resuming is the subject,
    not the gradient."""
    assert_resume_is_bit_equal(lambda output_dir, *overrides: config(output_dir, "train.estimator=policy-gradient",
                                                                     "reward.step_reward=terminal", *overrides), root)


def assert_fusion_refuses_an_adapter_of_another_family(adapter: Path, root: Path, pipeline_class: str) -> None:
    """A Stable Diffusion adapter beside ``adapter`` (of ``pipeline_class``) is refused before any base loads, naming
    both classes."""
    other = random_world_adapter(root / "world", seed=0)
    with pytest.raises(UserError, match=f"{pipeline_class}.*StableDiffusionPipeline|StableDiffusionPipeline.*"
                                        f"{pipeline_class}"):
        read_adapters([str(adapter), str(other)])


def assert_stock_loader_reproduces_the_trained_transformer(stock, final: Path, transformer: torch.nn.Module,
                                                           sample_shape: tuple[int, ...], timestep=751.0,
                                                           atol: float = 1e-6, **encoding) -> None:
    """The ``stock`` pipeline (base only) with ``final`` loaded by its own ``load_lora_weights`` predicts as the trained
    ``transformer`` (the denoiser: a flow transformer, or SDXL's UNet), which differs from the base's: the file holds
    the LoRA at its trained alpha; the base's hash is the one the adapter records."""
    denoiser = denoiser_of(stock)
    assert load_adapter_metadata(final).base_model_hash == weights_hash(denoiser)  # the base stayed frozen
    positive, _ = encode_prompts(stock, PROMPTS, torch.device("cpu"), **encoding)
    sample = torch.randn(len(PROMPTS), *sample_shape, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(timestep)
    with torch.no_grad():
        base = denoiser_forward(denoiser, sample, timestep, positive)
        stock.load_lora_weights(final)
        loaded = denoiser_forward(denoiser, sample, timestep, positive)
        ours = denoiser_forward(transformer, sample, timestep, positive)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=atol)
    assert (ours - base).abs().max() > 1e-3
    assert f"{type(stock).__name__}.from_pretrained" in (final / "README.md").read_text()


def assert_resume_is_bit_equal(config: Callable[..., TrainConfig], root: Path) -> None:
    """A run stopped after epoch 1 and resumed ends with the weights of an uninterrupted 2-epoch run, bit for bit.
    ``config(output_dir, *overrides)`` is the module's training config."""
    uninterrupted = Trainer(config(root / "a", "epochs=2")).run()
    Trainer(config(root / "b", "epochs=1")).run()
    resumed = Trainer(config(root / "b", "epochs=2", "resume=latest")).run()
    a, b = load_file(uninterrupted / WEIGHTS_FILE), load_file(resumed / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_adapter_metadata(resumed).training["epochs"] == 2


def assert_trains_one_epoch(config: TrainConfig) -> Path:
    """One epoch runs to an adapter recording its epoch, reward and KL; returns the adapter."""
    final = Trainer(config).run()
    training = load_adapter_metadata(final).training
    assert training["epochs"] == 1 and training["last_kl"] is not None and training["last_reward_mean"] is not None
    return final


def assert_fusion_refuses_a_changed_field(first: Path, root: Path, field: str, value) -> None:
    """A copy of adapter ``first`` whose metadata ``field`` says ``value`` cannot be fused with it; the error names
    the field and the value."""
    other = Path(shutil.copytree(first, root / "other"))
    data = json.loads((other / "msdda_adapter.json").read_text())
    data[field] = value
    (other / "msdda_adapter.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"{field} is {value}"):
        read_adapters([str(first), str(other)])


def fusing_pipeline(base: str, adapters: list[Path]):
    """``MSDDAPipeline.from_pretrained`` of ``base`` with ``adapters``, its progress bars off."""
    pipeline = MSDDAPipeline.from_pretrained(base, adapters=[str(adapter) for adapter in adapters])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def assert_single_at_noise_level_0_is_the_stock_pipeline(pipeline, stock, adapter: Path, stock_kwargs: dict,
                                                         **call) -> None:
    """``single`` on the fusing ``pipeline``'s one adapter at noise level 0 (the Euler steps) gives the ``stock``
    pipeline's images with ``adapter`` loaded by its own ``load_lora_weights`` (``stock_kwargs``: what the stock
    pipeline is told and the fusing one reads from the adapter, e.g. the size); ``eta`` is refused."""
    with pytest.warns(UserWarning, match="flow_noise_level=0 makes every step deterministic"):
        ours = pipeline(PROMPTS[:2], method="single", flow_noise_level=0.0, output_type="pt", **call,
                        generator=torch.Generator().manual_seed(5)).images
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(adapter)
    expected = stock(prompt=PROMPTS[:2], output_type="pt", **call, **stock_kwargs,
                     generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="eta=1.0 is DDIM's setting"):
        pipeline(PROMPTS[0], eta=1.0)


def assert_one_transformer_forward_per_step(pipeline, steps: int, image_shape: tuple[int, ...]) -> None:
    """MSDDA of the pipeline's two adapters batches all their rows into one transformer forward per step; weights
    (1, 0) is ``single`` on the first adapter, and the fused images differ from it."""
    forwards = []
    handle = pipeline.transformer.register_forward_hook(lambda module, args, output: forwards.append(1))

    def sample(**kwargs) -> torch.Tensor:
        return pipeline(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images

    fused = sample(weights=[0.5, 0.5])
    handle.remove()
    assert len(forwards) == steps
    assert fused.shape == (len(PROMPTS), *image_shape) and torch.isfinite(fused).all()
    torch.testing.assert_close(sample(weights=[1.0, 0.0]), sample(weights=[1.0, 0.0], method="single"))
    assert not torch.equal(fused, sample(weights=[1.0, 0.0]))


def assert_method_samples_with_its_path_kl(pipeline, method: str, clip: str, image_shape: tuple[int, ...]) -> None:
    """``method`` samples finite images with a path KL to the base: 0 for ``base``, NaN for ``code`` (a selection
    among samples, not one Gaussian kernel), positive otherwise."""
    rewards = [load_reward("clip-score", model=clip)] * 2
    output = pipeline(PROMPTS[:2], weights=[0.3, 0.7], method=method, output_type="pt", rewards=rewards,
                      code_candidates=2, code_block=2, return_kl=True, generator=torch.Generator().manual_seed(1))
    assert output.images.shape == (2, *image_shape) and torch.isfinite(output.images).all()
    kl = output.kl_to_base
    if method == "code":
        assert torch.isnan(kl).all()
    elif method == "base":
        assert torch.equal(kl, torch.zeros_like(kl))
    else:
        assert (kl > 0).all()


def assert_evaluate_reports_a_kl(adapter: Path, reward: str) -> None:
    """``msdda evaluate``'s report: one sample per prompt, a positive KL to the base, the trained reward."""
    report = evaluate_adapter(str(adapter), prompts=PROMPTS, num_prompts=None, seeds=[0], batch_size=3, device="cpu")
    assert report["samples"] == 3 and report["kl_to_base"]["mean"] > 0
    assert reward in report["rewards"]
