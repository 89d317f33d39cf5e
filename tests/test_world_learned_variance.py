"""The learned-variance world: its variational-bound step term, the continuation that makes it, and the shipped
one loading, training and fusing with a learned_range DDPM scheduler."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from msdda.config import load_config
from msdda.diffusion import load_base_pipeline
from msdda.errors import UserError
from msdda.world import ASSETS, LEARNED_VARIANCE, learned_variance_world_path, world_path
from msdda.world.learned_variance import continue_learned_variance, learned_variance_scheduler, step_vlb

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("module_cache")  # world-lv is assembled once, away from the user's cache


def _closed_form_bound(scheduler, epsilon, v, noise, t: int, stride: int, x_t) -> torch.Tensor:
    """L_t in bits per dimension, written out from Ho et al.'s posterior and Nichol & Dhariwal's learned_range."""
    abar = scheduler.alphas_cumprod.double()
    a_t, a_s = abar[t], abar[t - stride]
    beta = 1 - a_t / a_s

    def posterior_mean(x0):
        return a_s.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_s) / (1 - a_t) * x_t

    var_q = (1 - a_s) / (1 - a_t) * beta
    mean_q = posterior_mean((x_t - (1 - a_t).sqrt() * noise) / a_t.sqrt())
    mean_p = posterior_mean((x_t - (1 - a_t).sqrt() * epsilon) / a_t.sqrt())
    var_p = torch.exp((v + 1) / 2 * beta.log() + (1 - v) / 2 * var_q.log())
    kl = 0.5 * (var_q / var_p - 1 - (var_q / var_p).log() + (mean_q - mean_p) ** 2 / var_p)
    return kl.flatten(1).mean(1) / math.log(2)


@pytest.mark.parametrize("steps", [10, 20])
def test_the_step_bound_is_the_strided_posterior_kl_with_the_mean_held_fixed(steps: int) -> None:
    scheduler = learned_variance_scheduler(steps)
    stride = 1000 // steps
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 5)
    x_t, noise = torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(shape, generator=generator,
                                                                                             dtype=torch.float64)
    epsilon = (noise + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    v = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    for t in scheduler.timesteps[:-1].tolist():
        timesteps = torch.full((3,), t)
        bound = step_vlb(scheduler, epsilon, v, noise, timesteps, x_t)
        expected = _closed_form_bound(scheduler, epsilon.detach(), v.detach(), noise, t, stride, x_t)
        torch.testing.assert_close(bound.detach(), expected, rtol=1e-9, atol=1e-12)
        bound.sum().backward()
        assert epsilon.grad is None, "the bound must not train the mean (improved DDPM's stop-gradient)"
        assert v.grad.abs().sum() > 0
        v.grad = None
        # the true noise with v = -1 is the posterior itself: the bound is 0
        zero = step_vlb(scheduler, noise, -torch.ones_like(noise), noise, timesteps, x_t)
        assert zero.abs().max() < 1e-12


def test_the_shipped_learned_variance_world_is_the_shipped_world_with_a_variance_head() -> None:
    from safetensors.torch import load_file

    fixed = load_file(world_path() / "unet/diffusion_pytorch_model.safetensors")
    learned = load_file(learned_variance_world_path() / "unet/diffusion_pytorch_model.safetensors")
    assert learned.keys() == fixed.keys()
    for key, weight in fixed.items():
        if key.startswith("conv_out."):
            assert torch.equal(learned[key][:4], weight), key  # the epsilon channels are the shipped world's
            start = -1.0 if key.endswith("bias") else 0.0  # the variance head's initial value (v = -1)
            assert (learned[key][4:] != start).any(), f"{key}: the variance channels were not trained"
        else:
            assert torch.equal(learned[key], weight), key
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert all(torch.equal(a, b) for a, b in zip(load_file(world_path() / part).values(),
                                                     load_file(learned_variance_world_path() / part).values()))
    record = json.loads((LEARNED_VARIANCE / "pretraining.json").read_text())
    assert record["continued_from"] == json.loads((ASSETS / "pretraining.json").read_text())
    assert sum(f.stat().st_size for f in LEARNED_VARIANCE.iterdir()) < 64 * 2**10  # the head, not a second world
    bound = record["learned_variance_bound_bits_per_dim"]["10_steps"]
    assert len(bound) == 9
    total = {name: sum(step[name] for step in bound.values()) for name in ("learned", "fixed_small", "fixed_large")}
    assert total["learned"] < min(total["fixed_small"], total["fixed_large"])  # it learned something


def test_the_learned_variance_world_is_assembled_once_and_leaves_the_random_stream_alone() -> None:
    first_state = torch.random.get_rng_state()
    folder = learned_variance_world_path()
    assert torch.equal(torch.random.get_rng_state(), first_state)
    built = (folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert learned_variance_world_path() == folder
    assert (folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == built
    left = [p.name for p in folder.parent.parent.iterdir() if p.suffix != ".lock"]  # the build's lock file stays
    assert left == [folder.parent.name]  # no temporary left


def test_the_learned_variance_world_loads_with_ddpm_and_refuses_ddim_before_loading() -> None:
    pipeline = load_base_pipeline("world-lv", "ddpm")
    assert pipeline.scheduler.config.variance_type == "learned_range"
    assert pipeline.unet.config.out_channels == 2 * pipeline.unet.config.in_channels
    with pytest.raises(UserError, match="DDIM cannot use: set sampling.scheduler: ddpm"):
        load_base_pipeline("world-lv", "ddim")


def test_a_recipe_trains_and_msdda_fuses_with_learned_variances(tmp_path) -> None:
    from msdda.adapters import load_adapter_metadata
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.testing import random_world_adapter
    from msdda.train import TrainConfig, train

    tiny = ["epochs=1", "sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=1",
            "train.batch_size=4", "sample_every=0", "log_with=null", "checkpoint.every=1",
            f"output_dir={tmp_path / 'run'}"]
    config = load_config(TrainConfig, ROOT / "configs/train/world_lv_aesthetic.yaml", tiny)
    final = train(config)
    metadata = load_adapter_metadata(final)
    assert metadata.scheduler_class == "DDPMScheduler"
    assert metadata.scheduler_config["variance_type"] == "learned_range"

    other = random_world_adapter(tmp_path / "other", seed=3, beta=config.beta, base=learned_variance_world_path())
    pipeline = MSDDAPipeline.from_pretrained("world-lv", adapters=[str(final), str(other)])
    call = dict(prompt=["a red circle on the left", "a blue square at the top"], weights=[0.5, 0.5],
                num_inference_steps=4, output_type="pt")
    images = {method: pipeline(**call, method=method, generator=torch.Generator().manual_seed(0)).images
              for method in ("msdda", "output-average")}
    assert all(torch.isfinite(image).all() for image in images.values())
    # the adapters' variances differ, so precision weighting (msdda) is not output averaging
    assert not torch.equal(images["msdda"], images["output-average"])


@pytest.mark.slow
def test_the_continuation_trains_only_the_variance_and_records_its_bound(tmp_path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    shutil.copytree(world_path(), world / "pipeline")
    record = json.loads((ASSETS / "pretraining.json").read_text())
    record["config"]["num_images"] = 32
    (world / "pretraining.json").write_text(json.dumps(record))
    out = continue_learned_variance(world, tmp_path / "lv", steps=3, bound_samples=4)

    from safetensors.torch import load_file

    before = load_file(world / "pipeline/unet/diffusion_pytorch_model.safetensors")
    after = load_file(out / "pipeline/unet/diffusion_pytorch_model.safetensors")
    assert after["conv_out.weight"].shape[0] == 8 and torch.equal(after["conv_out.weight"][:4], before["conv_out.weight"])
    assert (after["conv_out.bias"][4:] != -1).all(), "three steps of Adam move every variance bias off its start"
    assert all(torch.equal(after[key], before[key]) for key in before if not key.startswith("conv_out."))
    head = load_file(out / "variance_head.safetensors")  # what msdda ships of it
    assert torch.equal(head["weight"], after["conv_out.weight"][4:]) and torch.equal(head["bias"], after["conv_out.bias"][4:])
    config = json.loads((out / "pipeline/scheduler/scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler" and config["variance_type"] == "learned_range"
    written = json.loads((out / "pretraining.json").read_text())
    assert written["config"]["steps"] == 3 and written["continued_from"]["config"]["num_images"] == 32
    bounds = written["learned_variance_bound_bits_per_dim"]
    assert list(bounds) == ["10_steps", "20_steps"] and len(bounds["10_steps"]) == 9 and len(bounds["20_steps"]) == 19
    with pytest.raises(UserError, match="already a learned-variance world"):
        continue_learned_variance(out, tmp_path / "again", steps=3)
    with pytest.raises(UserError, match="must be 1 or more"):
        continue_learned_variance(world, tmp_path / "none", steps=0)


def test_the_learned_variance_job_trains_by_the_world_recipes_rule_and_sweeps_what_it_trained(tmp_path) -> None:
    from msdda.sweep.config import SweepConfig
    from msdda.train import TrainConfig
    from tests.launch_scripts import budget, commands_of, train_config

    commands = commands_of("launch/world_lv.sh", tmp_path)
    assert [c[0] for c in commands] == ["train", "evaluate", "train", "evaluate", "train", "sweep", "report"]
    trained = [train_config(commands[0]), train_config(commands[2])]
    oracle = train_config(commands[4])
    assert budget(oracle) == budget(trained[0]) and (oracle.base, oracle.beta) == ("world-lv", 0.001)
    assert oracle.reward.kwargs == {"rewards": [c.reward.name for c in trained], "weights": [0.5, 0.5]}
    fixed_world = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml")
    assert {budget(c) for c in trained} == {budget(fixed_world)}  # the world recipes' shared rule
    assert [(c.base, c.sampling.scheduler, c.beta) for c in trained] == [("world-lv", "ddpm", 0.001)] * 2
    start = commands[5].index("--config") + 1
    sweep = load_config(SweepConfig, ROOT / commands[5][start], commands[5][start + 1:])
    sweep.validate()
    assert sweep.base == "world-lv" and sweep.adapters == [f"{c.output_dir}/final" for c in trained]
    assert sweep.rewards == [c.reward.name for c in trained] and sweep.beta == 0.001
    assert [1.0, 1.0] in sweep.weights and {"msdda", "output-average", "soup"} <= set(sweep.methods)
    assert {key: str(path) for key, path in sweep.oracles.items()} == {"0.5,0.5": f"{oracle.output_dir}/final"}
