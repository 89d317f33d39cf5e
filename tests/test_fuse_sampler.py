"""The multi-adapter sampler and MSDDAPipeline on the embedded world, with real LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from msdda.adapters import METADATA_FILE
from msdda.diffusion import mixed_adapter_batch
from msdda.fuse import MSDDAPipeline
from msdda.testing import random_world_adapter
from msdda.world import world_path

STEPS = 4
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [random_world_adapter(root / "a", 1, num_inference_steps=STEPS),
            random_world_adapter(root / "b", 2, num_inference_steps=STEPS),
            random_world_adapter(root / "c", 3, beta=0.04, num_inference_steps=STEPS)]


@pytest.fixture(scope="module")
def pipeline(adapters) -> MSDDAPipeline:
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(a) for a in adapters[:2]])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def test_mixed_adapter_batch_equals_separate_forwards(pipeline) -> None:
    unet = pipeline.unet
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = pipeline.encode_prompt([PROMPT] * 2, "cpu", 1, False)[0]
    with torch.no_grad():
        with mixed_adapter_batch(unet, ["adapter_0", "__base__"]):
            mixed = unet(latents, 500, embeds).sample
        pipeline.set_adapters(["adapter_0"])
        first = unet(latents[:1], 500, embeds[:1]).sample
        pipeline.disable_lora()
        base = unet(latents[1:], 500, embeds[1:]).sample
        pipeline.enable_lora()
        pipeline.set_adapters(["adapter_0", "adapter_1"], [1.0, 1.0])
    torch.testing.assert_close(mixed, torch.cat([first, base]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, base, atol=1e-3)  # the adapter really changes the output


def test_a_batch_of_several_adapters_equals_each_adapter_on_its_own(pipeline) -> None:
    """Two adapters' rows side by side and the base's after them (the fused sampler's batch), against diffusers'
    forwards with one adapter active at a time and with the LoRAs off."""
    unet = pipeline.unet
    latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = pipeline.encode_prompt([PROMPT] * 6, "cpu", 1, False)[0]
    with torch.no_grad():
        with mixed_adapter_batch(unet, ["adapter_0"] * 2 + ["adapter_1"] * 2 + ["__base__"] * 2):
            mixed = unet(latents, 500, embeds).sample
        separate = []
        for name, rows in (("adapter_0", slice(0, 2)), ("adapter_1", slice(2, 4))):
            pipeline.set_adapters([name])
            separate.append(unet(latents[rows], 500, embeds[rows]).sample)
        pipeline.disable_lora()
        separate.append(unet(latents[4:], 500, embeds[4:]).sample)
        pipeline.enable_lora()
        pipeline.set_adapters(["adapter_0", "adapter_1"], [1.0, 1.0])
    torch.testing.assert_close(mixed, torch.cat(separate), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(separate[0], separate[1], atol=1e-3)  # the two adapters really differ


def test_weights_one_zero_reproduce_the_first_adapter_exactly(pipeline) -> None:
    fused = _images(pipeline, weights=[1.0, 0.0])
    single = _images(pipeline, weights=[1.0, 0.0], method="single")
    assert torch.equal(fused, single)
    assert not torch.equal(fused, _images(pipeline, weights=[0.0, 1.0]))


def test_one_adapter_reproduces_stock_diffusers_with_that_lora(adapters) -> None:
    ours = MSDDAPipeline.from_pretrained("world", adapters=[str(adapters[0])])
    ours.set_progress_bar_config(disable=True)
    stock = StableDiffusionPipeline.from_pretrained(world_path(), local_files_only=True)
    from diffusers import DDIMScheduler

    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.load_lora_weights(adapters[0])
    stock.set_progress_bar_config(disable=True)
    expected = stock(PROMPT, num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(_images(ours, weights=[1.0]), expected, rtol=0, atol=1e-5)


def test_a_bf16_pipeline_fuses_in_float32_close_to_the_float32_pipeline(adapters, pipeline) -> None:
    """Half-precision UNets, float32 chain: at the last steps 1 - alpha_bar is below bf16's resolution, so
    kernels in bf16 would have no variance left to fuse."""
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if not torch.equal(torch.randn(64, generator=generator(), dtype=torch.bfloat16),
                       torch.randn(64, generator=generator()).bfloat16()):
        pytest.skip(f"torch {torch.__version__} draws other bf16 noise than float32 noise (2.13 draws the same), so "
                    "the two pipelines' samples are not comparable")
    half = MSDDAPipeline.from_pretrained("world", adapters=[str(a) for a in adapters[:2]], torch_dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.unet.dtype == torch.bfloat16
    for method in ("msdda", "soup", "diffusion-blend"):
        images = _images(half, weights=[0.5, 0.5], method=method)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
    difference = (_images(half, weights=[0.5, 0.5]) - _images(pipeline, weights=[0.5, 0.5])).abs().mean()
    assert difference < 0.01


def test_equal_variances_and_betas_make_msdda_output_averaging(pipeline) -> None:
    fused = _images(pipeline, weights=[0.3, 0.7])
    averaged = _images(pipeline, weights=[0.3, 0.7], method="output-average")
    torch.testing.assert_close(fused, averaged, rtol=0, atol=1e-5)


def test_unequal_betas_bring_in_the_reference_and_differ_from_averaging(adapters) -> None:
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(adapters[0]), str(adapters[2])])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.betas == [0.01, 0.04]
    fused = _images(pipe, weights=[0.5, 0.5], beta=0.02)  # exponents 0.25 and 1.0: reference exponent -0.25
    averaged = _images(pipe, weights=[0.5, 0.5], method="output-average")
    assert (fused - averaged).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["base", "soup", "diffusion-blend"])
def test_baselines_run_through_the_same_loop(pipeline, method: str) -> None:
    images = _images(pipeline, weights=[0.5, 0.5], method=method)
    assert images.shape == (1, 3, 32, 32) and bool(images.isfinite().all())
    if method == "soup":  # the soup leaves the adapters' own scales as they were
        torch.testing.assert_close(_images(pipeline, weights=[1.0, 0.0]),
                                   _images(pipeline, weights=[1.0, 0.0], method="single"))


def test_code_needs_rewards_and_picks_by_them(pipeline) -> None:
    from msdda.rewards import load_reward

    with pytest.raises(ValueError, match="rewards"):
        _images(pipeline, weights=[0.5, 0.5], method="code")
    rewards = [load_reward("world-aesthetic"), load_reward("world-aesthetic")]
    images = _images(pipeline, weights=[0.5, 0.5], method="code", rewards=rewards, code_candidates=3, code_block=2)
    assert images.shape == (1, 3, 32, 32)


def test_refusals(pipeline, adapters, tmp_path) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        _images(pipeline, weights=[1.2, -0.2])
    with pytest.raises(ValueError, match="one weight per adapter"):
        _images(pipeline, weights=[1.0])
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for file in adapters[1].iterdir():
        (mismatched / file.name).write_bytes(file.read_bytes())
    metadata = json.loads((mismatched / METADATA_FILE).read_text())
    metadata["base_model_hash"] = "0" * 64
    (mismatched / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"adapter .*mismatched: base_model_hash 000000000000"):
        MSDDAPipeline.from_pretrained("world", adapters=[str(adapters[0]), str(mismatched)])
    metadata["base_model_hash"] = json.loads((adapters[0] / METADATA_FILE).read_text())["base_model_hash"]
    metadata["num_inference_steps"] = 50
    (mismatched / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="num_inference_steps is 50 but adapter .* has 4"):
        MSDDAPipeline.from_pretrained("world", adapters=[str(adapters[0]), str(mismatched)])


def test_fuse_cli_writes_images_grid_and_settings(adapters, tmp_path) -> None:
    from msdda.cli import main

    out = tmp_path / "fused"
    assert main(["fuse", "--adapter", str(adapters[0]), "--adapter", str(adapters[1]), "--weights", "0.3,0.7",
                 "--prompt", PROMPT, "--seeds", "0-2", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["weights"] == [0.3, 0.7] and settings["num_inference_steps"] == STEPS
    assert len(settings["images"]) == 3 and (out / "grid.png").is_file()
    assert main(["fuse", "--adapter", str(adapters[0]), "--weights", "-1", "--prompt", PROMPT,
                 "--out", str(out)]) == 2
    # a YAML config, with flags overriding it
    config = tmp_path / "fuse.yaml"
    config.write_text(f"adapters: [{adapters[0]}, {adapters[1]}]\nweights: [0.5, 0.5]\nprompts: ['{PROMPT}']\n"
                      f"seeds: '0-3'\nout: {tmp_path / 'from_config'}\n")
    assert main(["fuse", "--config", str(config), "--seeds", "5", "--method", "output-average"]) == 0
    settings = json.loads((tmp_path / "from_config" / "settings.json").read_text())
    assert settings["seeds"] == "5" and settings["method"] == "output-average" and settings["weights"] == [0.5, 0.5]
    assert [image["seed"] for image in settings["images"]] == [5]


@pytest.fixture(scope="module")
def learned_variance_base(tmp_path_factory) -> Path:
    """The world's VAE and text encoder with a (random) UNet that predicts epsilon and a variance, DDPM."""
    from diffusers import DDPMScheduler

    from msdda.world.models import build_scheduler, build_unet

    folder = tmp_path_factory.mktemp("learned") / "pipeline"
    world = StableDiffusionPipeline.from_pretrained(world_path(), local_files_only=True)
    torch.manual_seed(0)
    unet = build_unet()
    unet = type(unet).from_config({**unet.config, "out_channels": 8})
    scheduler = DDPMScheduler.from_config(build_scheduler().config, variance_type="learned_range")
    StableDiffusionPipeline(vae=world.vae, text_encoder=world.text_encoder, tokenizer=world.tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_learned_variances_are_precision_weighted_not_averaged(learned_variance_base, tmp_path) -> None:
    from msdda.diffusion import adapter_kernels
    from msdda.fuse import fuse_gaussians

    adapters = [random_world_adapter(tmp_path / name, seed, num_inference_steps=STEPS, base=learned_variance_base)
                for name, seed in (("a", 1), ("b", 2))]
    pipe = MSDDAPipeline.from_pretrained(str(learned_variance_base), adapters=[str(a) for a in adapters])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"

    # one step by hand: per-element variances from each adapter, fused by precision
    pipe.scheduler.set_timesteps(STEPS)
    timestep = pipe.scheduler.timesteps[1]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    positive, negative = pipe.encode_prompt([PROMPT], "cpu", 1, True)
    with torch.no_grad():
        first, second = adapter_kernels(pipe.unet, pipe.scheduler, latents, timestep, positive, negative,
                                        ["adapter_0", "adapter_1"], 3.0, None)
    assert first.variance.shape == latents.shape and not torch.allclose(first.variance, second.variance)
    mean, variance = fuse_gaussians([first.mean, second.mean], [first.variance, second.variance], [0.5, 0.5])
    precision = 0.5 / first.variance + 0.5 / second.variance
    torch.testing.assert_close(variance, 1 / precision)
    torch.testing.assert_close(mean, (0.5 * first.mean / first.variance + 0.5 * second.mean / second.variance) / precision)
    averaged = 0.5 * first.mean + 0.5 * second.mean
    assert (mean - averaged).abs().max() > 1e-4  # precision weighting is not output averaging here

    fused = _images(pipe, weights=[0.5, 0.5])
    output_average = _images(pipe, weights=[0.5, 0.5], method="output-average")
    assert (fused - output_average).abs().max() > 1e-3
