"""The flow world: the shipped world's VAE, text encoder and tokenizer around a tiny SD3 transformer, its
rectified-flow pretraining, and the shipped one loading as a stock StableDiffusion3Pipeline, sampling through
msdda's loop, training and fusing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msdda.config import load_config
from msdda.diffusion import (
    decode_latents,
    encode_prompts,
    guided_output,
    load_base_pipeline,
    resolve_base,
    sampler_kernel,
)
from msdda.errors import UserError
from msdda.world import ASSETS, FLOW, flow_world_path, world_path
from msdda.world.flow import build_flow_scheduler, pretrain_flow_world, rectified_flow_loss, shifted_sigmas

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on the left", "a blue square at the top"]


pytestmark = pytest.mark.usefixtures("module_cache")  # world-flow is assembled once, away from the user's cache


def test_the_shipped_flow_world_is_the_shipped_world_around_a_small_transformer() -> None:
    folder = flow_world_path()
    assert resolve_base("world-flow") == str(folder)
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        ours = load_file(folder / part.replace("text_encoder/", "text_encoder_2/"))
        theirs = load_file(world_path() / part)
        assert all(torch.equal(ours[f"text_model.{key}" if "text_encoder" in part else key], weight)
                   for key, weight in theirs.items()), part
    projection = load_file(folder / "text_encoder/model.safetensors")["text_projection.weight"]
    assert torch.equal(projection, torch.eye(len(projection)))  # the pooled embedding is the world encoder's own
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    shipped = sum(path.stat().st_size for path in FLOW.rglob("*") if path.is_file())
    assert shipped < 10 * 2**20, f"the flow world's own files are {shipped / 2**20:.1f} MiB"
    whole = sum(path.stat().st_size for part in (folder, ASSETS / "classifier") for path in part.rglob("*")
                if path.is_file())
    assert whole < 20 * 2**20, f"the flow world with its classifier is {whole / 2**20:.1f} MiB; the budget is 20 MiB"
    record = json.loads((FLOW / "pretraining.json").read_text())
    assert record["flow"] and record["continued_from"] == json.loads((ASSETS / "pretraining.json").read_text())
    assert 1e6 < record["transformer_parameters"] < 5e6


def test_the_flow_world_is_assembled_once_and_leaves_the_random_stream_alone() -> None:
    state = torch.random.get_rng_state()
    folder = flow_world_path()
    assert torch.equal(torch.random.get_rng_state(), state)
    built = (folder / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert flow_world_path() == folder
    assert (folder / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == built
    left = [p for p in folder.parent.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert not left  # no temporary left (the build's lock file stays beside the folder, as filelock's locks do)


def test_the_flow_world_loads_with_the_flow_sampler_only() -> None:
    pipeline = load_base_pipeline("world-flow", "flow")
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline" and pipeline.text_encoder_3 is None
    assert pipeline.scheduler.config.shift == 3.0 and pipeline.vae.config.shift_factor == 0.0
    with pytest.raises(UserError, match=r"sampling.scheduler in \['flow'\]"):
        load_base_pipeline("world-flow", "ddim")


def test_msdda_encodes_no_t5_rows_and_its_loop_is_the_stock_pipeline_told_so() -> None:
    """Without T5, msdda's conditioning is the 12 CLIP tokens and one packed pooled row (diffusers would append 256
    rows of zeros); the stock pipeline with ``max_sequence_length=0`` then samples what msdda's loop samples."""
    from msdda.kernels import initial_latents
    from msdda.sampling import denoise

    pipeline = load_base_pipeline("world-flow", "flow")
    positive, negative = encode_prompts(pipeline, PROMPTS, torch.device("cpu"))
    assert positive.shape == negative.shape == (2, 12 + 1, 128)
    call = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=0)
    stock = pipeline(**call, generator=torch.Generator().manual_seed(3), output_type="pt").images
    scheduler, transformer = pipeline.scheduler, pipeline.transformer
    scheduler.set_timesteps(4)
    latents = initial_latents(scheduler, (2, 4, 16, 16), torch.Generator().manual_seed(3), positive)

    def euler(_index, timestep, x_t):
        return sampler_kernel(scheduler, guided_output(transformer, x_t, timestep, positive, negative, 3.0),
                              timestep, x_t, 0.0)

    ours = decode_latents(pipeline, denoise(scheduler.timesteps, latents, euler))
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_rectified_flow_loss_is_the_velocity_error_at_the_interpolated_point() -> None:
    seen = {}

    class Velocity(torch.nn.Module):
        def forward(self, sample, timestep, conditioning):
            seen.update(sample=sample, timestep=timestep)
            return type("Output", (), {"sample": torch.zeros_like(sample)})()

    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    sigmas = torch.tensor([0.1, 0.5, 1.0])
    loss = rectified_flow_loss(Velocity(), clean, noise, sigmas, torch.zeros(3, 2, 8))
    torch.testing.assert_close(loss, ((noise - clean) ** 2).mean())
    torch.testing.assert_close(seen["sample"], (1 - sigmas[:, None, None, None]) * clean
                               + sigmas[:, None, None, None] * noise)
    torch.testing.assert_close(seen["timestep"], sigmas * 1000)


def test_training_noise_levels_are_the_schedule_shift_of_uniform_draws() -> None:
    """A uniform grid from 1 to the scheduler's smallest training noise level, shifted by ``shifted_sigmas``, lands
    on the flow world's own sampling schedule (diffusers spaces the unshifted levels evenly and shifts them)."""
    scheduler = build_flow_scheduler()
    scheduler.set_timesteps(10)
    torch.testing.assert_close(shifted_sigmas(torch.linspace(1.0, scheduler.sigma_min, 10), scheduler.config.shift),
                               scheduler.sigmas[:-1], rtol=1e-5, atol=1e-6)


def _small_world(tmp_path: Path, num_images: int) -> Path:
    """A copy of the shipped world whose record asks for ``num_images`` training images."""
    world = tmp_path / "world"
    world.mkdir()
    shutil.copytree(world_path(), world / "pipeline")
    shutil.copytree(ASSETS / "classifier", world / "classifier")
    record = json.loads((ASSETS / "pretraining.json").read_text())
    record["config"]["num_images"] = num_images
    (world / "pretraining.json").write_text(json.dumps(record))
    return world


def test_pretraining_writes_a_flow_world_and_refuses_to_continue_one(tmp_path) -> None:
    world = _small_world(tmp_path, num_images=64)
    out = pretrain_flow_world(world, tmp_path / "flow", steps=3)
    pipeline = load_base_pipeline(str(out / "pipeline"), "flow")
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline"
    assert torch.equal(load_file(out / "classifier/model.safetensors")["colour.weight"],
                       load_file(ASSETS / "classifier/model.safetensors")["colour.weight"])
    record = json.loads((out / "pretraining.json").read_text())
    assert record["config"]["steps"] == 3 and record["config"]["num_images"] == 64 and record["flow"]
    with pytest.raises(UserError, match="already a flow world"):
        pretrain_flow_world(out, tmp_path / "again", steps=3)
    with pytest.raises(UserError, match="--flow-steps"):
        pretrain_flow_world(world, tmp_path / "none", steps=0)


def test_a_flow_recipe_trains_and_msdda_fuses_on_the_flow_world(tmp_path) -> None:
    from msdda.adapters import load_adapter_metadata
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.train import TrainConfig, train

    tiny = ["epochs=1", "sampling.num_inference_steps=3", "sampling.batch_size=2", "sampling.batches_per_epoch=1",
            "train.batch_size=2", "sample_every=0", "log_with=null", "checkpoint.every=1"]
    finals = []
    for name in ("aesthetic", "thirds"):
        config = load_config(TrainConfig, ROOT / f"configs/train/world_flow_{name}.yaml",
                             [*tiny, f"output_dir={tmp_path / name}"])
        finals.append(train(config))
    metadata = load_adapter_metadata(finals[0])
    assert metadata.pipeline_class == "StableDiffusion3Pipeline" and metadata.flow_noise_level == 0.7
    assert metadata.flow_shift == 3.0 and metadata.base_model == "world-flow"
    pipeline = MSDDAPipeline.from_pretrained("world-flow", adapters=[str(final) for final in finals])
    output = pipeline(PROMPTS, weights=[0.5, 0.5], num_inference_steps=3, output_type="pt", return_kl=True,
                      generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (2, 3, 32, 32) and bool((output.kl_to_base > 0).all())


@pytest.mark.slow
def test_the_shipped_flow_world_follows_colour_shape_and_position_above_chance() -> None:
    from msdda.world.evaluate import evaluate_world

    report = evaluate_world(base="world-flow", num_prompts=16, held_out_per_combo=2)
    accuracy = report["classifier_accuracy_samples_train_prompts"]
    assert accuracy["colour"] > 0.5 and accuracy["shape"] > 0.5 and accuracy["position"] > 0.3  # chance 1/6, 1/3, 1/5
