"""The trainer on the embedded world: configs, bad input, rollouts, export, resume, multi-process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from msdda.adapters import (
    METADATA_FILE,
    WEIGHTS_FILE,
    load_adapter_metadata,
    weights_hash,
)
from msdda.cli import main
from msdda.config import ConfigError, load_config
from msdda.diffusion import adapter_kernels, decode_latents, encode_prompts, load_base_pipeline
from msdda.errors import UserError
from msdda.rewards import Reward, load_reward
from msdda.train import TrainConfig
from msdda.train.checkpoint import latest_checkpoint, lora_state, optimizer_from_files, optimizer_to_files
from msdda.train.trainer import Trainer
from msdda.train.updates import transitions
from msdda.world import world_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=1",
        "train.batch_size=4", "sample_every=0", "log_with=null", "checkpoint.every=1", "train.gauge_prompts=0"]
"""A run of a few seconds; without the final optimality gauge, which tests/test_replay.py and test_gauge.py test."""


CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
"""The environment of a subprocess that must run on the CPU, also where there is a GPU."""


def _config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                       [*TINY, f"output_dir={tmp_path / 'run'}", *overrides])


def test_config_loads_yaml_with_dotted_overrides(tmp_path) -> None:
    config = _config(tmp_path, "train.learning_rate=1e-4", "lora.target_modules=[to_q]", "resume=latest")
    assert config.train.learning_rate == 1e-4 and config.lora.target_modules == ["to_q"]
    assert config.sampling.num_inference_steps == 4 and config.resume == "latest"
    with pytest.raises(ConfigError, match="unknown config key train.learning_rat"):
        _config(tmp_path, "train.learning_rat=1")
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        _config(tmp_path, "epochs=two")
    with pytest.raises(ConfigError, match="step_reward must be one of"):
        _config(tmp_path, "reward.step_reward=dense")
    with pytest.raises(ConfigError, match="key.sub=value"):
        _config(tmp_path, "epochs")


@pytest.mark.parametrize("override, message", [
    ("reward.name=sharpness", "unknown reward 'sharpness'"),
    ("sampling.eta=0.0", "deterministic"),
    ("prompts=missing_prompts.txt", "does not exist"),
    ("beta=-0.1", "beta must be"),
    ("lora.target_modules=[to_qq]", "match no module"),
    ("train.batch_size=3", "must divide"),
    ("reward.step_reward=terminal train.estimator=pathwise", "set reward.step_reward=tweedie"),
    ("train.timestep_fraction=0", "timestep_fraction must be in"),
    ("reward.name=tests.user_rewards:brightness reward.step_reward=tweedie train.estimator=pathwise",
     "needs a differentiable reward"),
    ("train.single_pass=true", "single_pass needs train.estimator=policy-gradient"),
    ("train.single_pass=true train.estimator=policy-gradient train.inner_epochs=2", "set train.inner_epochs=1"),
    ("train.single_pass=true train.estimator=policy-gradient sampling.batch_size=8",
     "set train.gradient_accumulation_steps=2"),
    ("train.compile=true train.gradient_checkpointing=true", "train.compile does not run with"),
    ("ema.decay=1.0", r"ema.decay must be in \(0, 1\)"),
    ("ema.decay=0.9 ema.start_step=-1", "ema.start_step must be at least 0"),
    ("process_group_timeout=0", "process_group_timeout must be a number of seconds > 0"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(_config(tmp_path, *override.split()))
    assert not (tmp_path / "run").exists()


def test_more_processes_than_gpus_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """Two processes on one GPU would crash in NCCL; the trainer says what to launch instead."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as torchrun sets it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # this machine has no GPU to launch on
    with pytest.raises(ValueError, match="2 processes were launched on this machine, which has 1 GPU.*CUDA_VISIBLE"):
        Trainer(_config(tmp_path))


@pytest.mark.parametrize("version, override, message", [
    ("1", "", "asks for FSDP version 1; msdda trains under FSDP2"),
    ("2", "train.single_pass=true train.estimator=policy-gradient", "single_pass does not run under FSDP"),
])
def test_fsdp1_and_the_single_pass_under_fsdp_are_refused_before_any_work(tmp_path, monkeypatch, version, override,
                                                                         message) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate launch sets them for an FSDP config
    monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(ValueError, match=message):
        Trainer(_config(tmp_path, *override.split()))
    assert not (tmp_path / "run").exists()


def test_process_group_timeout_reaches_the_process_group(tmp_path, fresh_accelerator_state) -> None:
    """The timeout a launch's process group is created with (Accelerate's InitProcessGroupKwargs)."""
    from datetime import timedelta

    from msdda.train.distributed import build_accelerator

    accelerator = build_accelerator(_config(tmp_path, "process_group_timeout=5400"))
    assert accelerator.init_handler.timeout == timedelta(minutes=90)
    assert build_accelerator(_config(tmp_path)).init_handler is None  # torch's default


def test_single_pass_is_refused_under_deepspeed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as accelerate launch sets it for a DeepSpeed config
    with pytest.raises(ValueError, match="single_pass does not run under DeepSpeed"):
        Trainer(_config(tmp_path, "train.single_pass=true", "train.estimator=policy-gradient"))


SINGLE_PASS_EQUIVALENT = ["epochs=2", "train.estimator=policy-gradient", "sampling.batches_per_epoch=2",
                          "train.gradient_accumulation_steps=2", "train.learning_rate=3e-3"]
"""One on-policy gradient step per epoch over two sampling batches, where the two update schemes must agree."""


def _lora(trainer: Trainer) -> dict[str, torch.Tensor]:
    return lora_state(trainer.accelerator, trainer.learner.model)


def _relative_difference_of_trained_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||B_a - B_b|| / ||B_a|| over the LoRA B matrices, which start at zero: all they hold is what training
    wrote. (Adam's first steps are about lr * sign(gradient), so single elements with near-zero gradients can
    flip on float noise; the norm over all of them cannot.)"""
    keys = [k for k in a if "lora_B" in k or "lora.up" in k]
    assert keys and a.keys() == b.keys()
    difference = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in keys))
    return float(difference / torch.sqrt(sum((a[k] ** 2).sum() for k in keys)))


@pytest.mark.parametrize("step_reward", ["terminal", "tweedie"])
def test_single_pass_trains_the_adapter_the_update_pass_trains(tmp_path, step_reward, fresh_accelerator_state,
                                                              exact_float32) -> None:
    """Backpropagating through the sampling forward's graph is the update pass's first inner step (ratio 1), so
    two epochs of either end with the same adapter and log the same KL, up to float summation order; tweedie's
    per-step advantages check that each graph step meets its own advantage."""
    results = {}
    for single_pass in ("false", "true"):
        trainer = Trainer(_config(tmp_path / single_pass, *SINGLE_PASS_EQUIVALENT, f"reward.step_reward={step_reward}",
                                  f"train.single_pass={single_pass}"))
        trainer.run()
        results[single_pass] = _lora(trainer), trainer.history
    (update_lora, update_history), (single_lora, single_history) = results["false"], results["true"]
    assert _relative_difference_of_trained_weights(update_lora, single_lora) < 1e-2
    assert update_history[-1]["kl"] > 0
    for update, single in zip(update_history, single_history):
        assert single["reward_mean"] == pytest.approx(update["reward_mean"], rel=1e-5)
        assert single["kl"] == pytest.approx(update["kl"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("recipe", ["world_aesthetic", "world_lv_aesthetic", "world_flow_aesthetic"])
def test_the_update_kernel_at_the_rollouts_weights_is_the_recorded_one_bit_for_bit(tmp_path, recipe, module_cache,
                                                                                 fresh_accelerator_state) -> None:
    """pi_old (the rollout's log-probs) and pi_theta (the update's policy kernel) come from one guided forward, so
    on-policy the importance ratio is exactly 1 (as Flow-GRPO checks) at every step for the batch as sampled, and 1 to
    float rounding for a shuffled subset of its rows (DDIM with CFG, DDPM with a learned variance, the flow SDE): on
    some CPUs (AVX-512) a forward of fewer rows runs other kernels, whose sums differ in the last bits."""
    config = load_config(TrainConfig, ROOT / f"configs/train/{recipe}.yaml",
                         [*TINY, f"output_dir={tmp_path / 'run'}", "train.estimator=policy-gradient"])
    trainer = Trainer(config)
    trajectories = trainer.sample(0)
    advantages = torch.zeros(4, 4)
    for step in trajectories.stochastic.nonzero()[:, 0].tolist():
        for rows in (torch.arange(4), torch.tensor([2, 0])):
            batch = transitions(trajectories, advantages, rows, step)
            with torch.no_grad():
                log_probs = trainer.policy_kernel(batch).log_prob(batch.next_latents)
            if len(rows) == len(trajectories.prompts):
                assert torch.equal(log_probs, batch.log_probs), (recipe, step)
            else:  # log-probs near -1000 in float32: a few units in their last place, a ratio within 1e-3 of 1
                torch.testing.assert_close(log_probs, batch.log_probs, rtol=0, atol=1e-3)


def test_single_pass_graphs_are_the_trained_steps_of_each_sampling_batch(tmp_path) -> None:
    """With timestep_fraction < 1 each sampling batch trains its own random steps; the differentiable log-probs
    and KLs must sit at those steps, and the KL must be the one the update pass computes there."""
    trainer = Trainer(_config(tmp_path, *SINGLE_PASS_EQUIVALENT, "sampling.num_inference_steps=6",
                              "train.timestep_fraction=0.5", "train.single_pass=true"))
    trajectories = trainer.sample(0)
    indices = trajectories.graph_step_indices
    assert indices.shape == (8, 3) and trajectories.graph_log_probs.requires_grad
    assert not torch.equal(indices[0], indices[4]), "both sampling batches drew the same steps (seeded: should not)"
    torch.testing.assert_close(trajectories.graph_log_probs.detach(), trajectories.log_probs.gather(1, indices))
    for row in (0, 5):
        for column, step in enumerate(indices[row].tolist()):
            terms = trainer.step_loss(transitions(trajectories, torch.zeros(8, 6), torch.tensor([row]), step))
            torch.testing.assert_close(trajectories.graph_kls[row, column].detach(), terms.kl, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_sampling_trains_the_adapter_eager_sampling_trains(tmp_path, fresh_accelerator_state,
                                                                   exact_float32) -> None:
    """train.compile runs the sampling pass's policy and reference forwards through torch.compile: the same
    trajectories, reference means and differentiable log-probs as eager (float rounding aside), the reference a
    copy of the module tree without any LoRA layer that copies no weight, and the same trained adapter."""
    from peft.tuners.lora import LoraLayer

    results = {}
    for compiled in ("false", "true"):
        trainer = Trainer(_config(tmp_path / compiled, *SINGLE_PASS_EQUIVALENT, "train.single_pass=true",
                                  f"train.compile={compiled}"))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # an adapter that moves the policy, so that the reference must leave it out
            for parameter in trainer.policy.lora_parameters:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        results[compiled] = trainer, trainer.sample(0)
    (eager_trainer, eager), (trainer, compiled) = results["false"], results["true"]
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.reference_means, eager.reference_means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.graph_log_probs.detach(), eager.graph_log_probs.detach(), rtol=1e-4, atol=1e-3)
    assert compiled.graph_log_probs.requires_grad
    with torch.no_grad():  # the adapter moves the policy's mean, so a reference with the adapter in would show
        policy = adapter_kernels(trainer.unwrapped, trainer.policy.pipeline.scheduler, compiled.latents[:, 0],
                                 compiled.timesteps[0], compiled.prompt_embeds, compiled.negative_embeds, None,
                                 guidance_scale=3.0, noise_scale=1.0)
    assert (policy[0].mean - eager.reference_means[:, 0]).abs().max() > 1e-2
    reference = trainer.policy.reference_unet._orig_mod
    assert not any(isinstance(module, LoraLayer) for module in reference.modules())
    base_weights = {p.data_ptr() for n, p in trainer.unwrapped.named_parameters() if "lora_" not in n}
    assert {p.data_ptr() for p in reference.parameters()} == base_weights
    assert (trainer.run() / WEIGHTS_FILE).is_file()
    eager_trainer.run()
    assert _relative_difference_of_trained_weights(_lora(eager_trainer), _lora(trainer)) < 1e-2


def test_output_dir_holding_another_run_is_refused(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.yaml").write_text("epochs: 1\n")
    with pytest.raises(ValueError, match="holds another run"):
        Trainer(_config(tmp_path))


def test_step_rewards_are_what_they_say(tmp_path) -> None:
    """terminal: r(x_0) at every step; tweedie: r of the reference's x0 estimate at x_{t-1}; last: r(x_0)."""
    from msdda.train.rollout import Conditioning, Sampler, sample_trajectories

    pipeline = load_base_pipeline("world")
    reward = load_reward("world-aesthetic")
    prompts = ["a red circle on the left", "a blue square at the top"]
    positive, negative = encode_prompts(pipeline, prompts, torch.device("cpu"))
    results = {}
    for name in ("terminal", "tweedie", "rollout"):
        from peft import LoraConfig

        if not getattr(pipeline.unet, "peft_config", None):
            pipeline.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
        results[name] = sample_trajectories(Sampler(pipeline, pipeline.unet, 4, 1.0, 3.0), reward,
                                            Conditioning(prompts, positive, negative), name,
                                            torch.Generator().manual_seed(0), need_reference=True)
    terminal, tweedie, rollout = results["terminal"], results["tweedie"], results["rollout"]
    torch.testing.assert_close(terminal.latents, tweedie.latents)  # same seed, same trajectory
    assert terminal.step_rewards.shape == (2, 4) and bool((terminal.step_rewards == terminal.final_rewards[:, None]).all())
    torch.testing.assert_close(tweedie.final_rewards, reward(decode_latents(pipeline, tweedie.latents[:, -1]), prompts))
    assert not torch.allclose(tweedie.step_rewards[:, 0], tweedie.final_rewards)
    torch.testing.assert_close(rollout.step_rewards[:, -1], terminal.final_rewards)
    assert tweedie.log_probs.shape == (2, 4) and tweedie.reference_means.shape == (2, 4, 4, 16, 16)


def test_one_epoch_exports_an_adapter_stock_diffusers_loads(tmp_path, capsys) -> None:
    config = _config(tmp_path, "log_with=tensorboard")
    final = Trainer(config).run()
    assert {WEIGHTS_FILE, METADATA_FILE, "README.md"} <= {p.name for p in final.iterdir()}
    assert (final / "README.md").read_text().startswith("---\nlibrary_name: diffusers")
    metadata = load_adapter_metadata(final)
    assert metadata.reward_name == "world-aesthetic" and metadata.beta == config.beta
    assert metadata.scheduler_class == "DDIMScheduler" and metadata.num_inference_steps == 4
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-00001" / "adapter" / WEIGHTS_FILE).is_file()

    pipeline = StableDiffusionPipeline.from_pretrained(world_path(), local_files_only=True)
    assert metadata.base_model_hash == weights_hash(pipeline.unet)  # the base stayed bit-identical
    pipeline.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red circle on the left"], num_inference_steps=4, eta=1.0, output_type="pt")
    before = pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    pipeline.load_lora_weights(final)
    after = pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(before, after)

    # resuming the finished run: nothing left to train, and final/ is not written again
    written = {path.name: path.stat().st_mtime_ns for path in final.iterdir()}
    arguments = [f"output_dir={tmp_path / 'run'}", "log_with=tensorboard", *TINY]
    assert main(["train", "--config", str(ROOT / "configs/train/world_aesthetic.yaml"), "--resume", *arguments]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in final.iterdir()} == written


def test_pathwise_update_follows_the_step_reward_gradient(tmp_path) -> None:
    """One pathwise step on a fresh adapter (beta 0, plain SGD) raises the tweedie step reward of the very
    transitions it was computed on, as a first-order step must; and it trains only the LoRA."""
    trainer = Trainer(_config(tmp_path, "reward.step_reward=tweedie", "train.estimator=pathwise", "beta=0"))
    trajectories = trainer.sample(0)
    advantages, rows = trainer.advantages(trajectories), torch.arange(4)

    def objective() -> torch.Tensor:
        return -sum(trainer.step_loss(transitions(trajectories, advantages, rows, step)).loss for step in range(4))

    with torch.no_grad():
        before = float(objective())
    trainer.learner.optimizer.zero_grad()
    (-objective()).backward()
    gradient_norm = torch.sqrt(sum((p.grad**2).sum() for p in trainer.policy.lora_parameters))
    assert gradient_norm > 0
    with torch.no_grad():
        for parameter in trainer.policy.lora_parameters:
            parameter -= 1e-2 / gradient_norm * parameter.grad  # a small step down the loss
    with torch.no_grad():
        after = float(objective())
    assert after > before


def test_pathwise_rollout_reward_differentiates_the_deterministic_reference_continuation(tmp_path) -> None:
    """The pathwise update's rollout step reward is r of stock DDIM (eta 0, guidance as configured, the frozen
    base) run from x_{t-1} to the end, and its gradient in x_{t-1} is that function's slope (central differences)."""
    trainer = Trainer(_config(tmp_path, "reward.step_reward=rollout", "train.estimator=pathwise", "beta=0"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so that a continuation with the adapter on would differ (small,
        for parameter in trainer.policy.lora_parameters:  # so that the samples stay where the reward is smooth)
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.03)
    trajectories = trainer.sample(0)
    rows, step = torch.arange(4), 0
    batch = transitions(trajectories, trainer.advantages(trajectories), rows, step)
    action = batch.next_latents.clone().requires_grad_(True)
    step_reward = trainer.step_reward()
    reward = step_reward(action, batch)
    direction = torch.randn(action.shape, generator=torch.Generator().manual_seed(1)).to(action.device)
    (slope,) = torch.autograd.grad(reward.sum(), action)

    pipeline, guidance = trainer.policy.pipeline, trainer.config.sampling.guidance_scale
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(len(trajectories.timesteps))
    embeds = torch.cat([trajectories.negative_embeds, trajectories.prompt_embeds])

    @torch.no_grad()
    def stock_rollout_reward(latents: torch.Tensor) -> torch.Tensor:
        pipeline.unet.disable_adapters()
        for timestep in scheduler.timesteps[step + 1:]:
            unconditional, conditional = pipeline.unet(torch.cat([latents] * 2), timestep, embeds).sample.chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
            latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
        pipeline.unet.enable_adapters()
        return trainer.reward(decode_latents(pipeline, latents), trajectories.prompts)

    torch.testing.assert_close(reward.detach(), stock_rollout_reward(action.detach()), rtol=1e-4, atol=1e-4)
    epsilon = 1e-2
    difference = (stock_rollout_reward(action.detach() + epsilon * direction)
                  - stock_rollout_reward(action.detach() - epsilon * direction)).sum() / (2 * epsilon)
    torch.testing.assert_close((slope * direction).sum(), difference, rtol=0.05, atol=1e-4)


@pytest.mark.parametrize("step_reward", ["tweedie", "rollout"])
def test_gradient_checkpointing_leaves_the_pathwise_gradient_unchanged(tmp_path, step_reward) -> None:
    """Backward recomputes each checkpointed UNet block. The pathwise step's reference forwards (adapter off, a
    mixed-adapter batch) must be recomputed with the adapter off too, or the gradient is wrong (or the recompute
    fails on a shape mismatch)."""
    trainer = Trainer(_config(tmp_path, f"reward.step_reward={step_reward}", "train.estimator=pathwise",
                              "train.gradient_checkpointing=true"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so that adapter on and off differ
        for parameter in trainer.policy.lora_parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    trajectories = trainer.sample(0)
    advantages = trainer.advantages(trajectories)
    trainer.learner.model.train()

    def gradient() -> torch.Tensor:
        trainer.learner.optimizer.zero_grad()
        steps = range(len(trajectories.timesteps) - 1)  # each with a reference forward at x_{t-1}
        sum(trainer.step_loss(transitions(trajectories, advantages, torch.arange(4), step)).loss
            for step in steps).backward()
        return torch.cat([parameter.grad.flatten() for parameter in trainer.policy.lora_parameters])

    checkpointed = gradient()
    trainer.unwrapped.disable_gradient_checkpointing()
    trainer.policy.pipeline.vae.disable_gradient_checkpointing()
    plain = gradient()
    assert plain.abs().max() > 0
    # the tolerance allows for the GPU's attention backward, which is not bit-reproducible; the routing bug this
    # guards against changes the gradient by its own size
    torch.testing.assert_close(checkpointed, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    trainer = Trainer(_config(tmp_path, "epochs=3"))
    clean_loss = trainer.step_loss

    def poisoned(batch):  # the second epoch's loss is NaN
        terms = clean_loss(batch)
        return dataclasses.replace(terms, loss=terms.loss * float("nan")) if len(trainer.history) == 1 else terms

    monkeypatch.setattr(trainer, "step_loss", poisoned)
    with pytest.raises(UserError, match="loss became nan at epoch 2.*checkpoint-00001"):
        trainer.run()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00001"
    assert not (tmp_path / "run" / "final").exists()
    lora = load_file(latest_checkpoint(tmp_path / "run") / "lora.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in lora.values())


class FirstImageFails(Reward):
    """A reward that cannot score some images: NaN for the first of every batch, the mean brightness otherwise."""

    name = "first-image-fails"

    def score(self, images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        scores[0] = float("nan")
        return scores


class EveryImageFails(Reward):
    name = "every-image-fails"

    def score(self, images, prompts):
        return torch.full((len(images),), float("nan"))


POLICY_GRADIENT = ["reward.step_reward=terminal", "train.estimator=policy-gradient"]


def test_samples_the_reward_cannot_score_are_dropped_and_counted_each_epoch(tmp_path, capsys) -> None:
    """Each epoch says how many samples a NaN reward dropped: in the history, in TensorBoard, on the bar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(_config(tmp_path, "reward.name=tests.test_train:FirstImageFails", *POLICY_GRADIENT, "epochs=2",
                              "log_with=tensorboard"))
    trainer.run()
    assert [h["dropped_samples"] for h in trainer.history] == [1, 1]
    assert all(torch.isfinite(t).all() for t in _lora(trainer).values())
    assert "dropped=1" in capsys.readouterr().err
    logged = {}
    for events_file in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if "dropped_samples" in events.Tags()["scalars"]:
            logged = {event.step: event.value for event in events.Scalars("dropped_samples")}
    assert logged == {1: 1.0, 2: 1.0}


def test_a_reward_that_scores_no_sample_stops_the_run_with_one_line_naming_it(tmp_path, capsys) -> None:
    """A user error, not a crash: the CLI prints one line with the reward, the count and what to do."""

    overrides = [*TINY, f"output_dir={tmp_path / 'run'}", "reward.name=tests.test_train:EveryImageFails",
                 *POLICY_GRADIENT, "epochs=3", "max_bad_epochs=2"]
    assert main(["train", "--config", str(ROOT / "configs/train/world_aesthetic.yaml"), *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("msdda: error:")]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "reward 'every-image-fails' returned NaN or inf for all 4 samples of each of the last 2 epochs" in lines[0]
    assert "finite score" in lines[0]
    assert not (tmp_path / "run" / "final").exists()


def test_optimizer_state_round_trips_through_safetensors_files(tmp_path) -> None:
    """Checkpoints hold the optimizer as tensors plus JSON (no pickle); one read back takes the very next step."""
    def parameters() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(3, 2, generator=generator)), torch.nn.Parameter(torch.randn(4))]

    def step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        sum((p**2 * torch.arange(p.numel()).view_as(p)).sum() for p in optimizer.param_groups[0]["params"]).backward()
        optimizer.step()

    trained = torch.optim.AdamW(parameters(), lr=1e-2)
    for _ in range(2):
        step(trained)
    tensors, meta = optimizer_to_files(trained)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    (tmp_path / "state.json").write_text(json.dumps(meta))
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in trained.param_groups[0]["params"]],
                                 lr=1.0)
    optimizer_from_files(restored, load_file(tmp_path / "optimizer.safetensors"),
                         json.loads((tmp_path / "state.json").read_text()))
    step(trained)
    step(restored)
    for a, b in zip(trained.param_groups[0]["params"], restored.param_groups[0]["params"]):
        assert torch.equal(a, b)


def _run_training(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "msdda.train", "--config", str(ROOT / "configs/train/world_aesthetic.yaml"),
               *TINY, "epochs=4", "sampling.batch_size=8", "train.batch_size=4", f"output_dir={output_dir}", *extra]
    # on the CPU, as the guarantee is stated: on a GPU, attention's backward kernels are not bit-reproducible
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CPU_ONLY)



def test_the_sample_grid_is_decoded_without_calling_the_reward(tmp_path, monkeypatch) -> None:
    """The epoch's grid needs images, not scores: with a reward server a call there would be a wasted request, and
    its failure on the main process alone would leave the other processes waiting."""
    trainer = Trainer(_config(tmp_path, "sample_every=1", "train.estimator=policy-gradient",
                              "reward.step_reward=terminal"))
    scored = []
    reward_class = type(trainer.reward)
    call = reward_class.__call__
    monkeypatch.setattr(reward_class, "__call__", lambda self, images, prompts: scored.append(len(images)) or
                        call(self, images, prompts))
    trainer.run()
    assert (tmp_path / "run" / "samples" / "epoch-00001.png").is_file()
    assert scored == [4]  # the epoch's one sampling batch, nothing for the grid of 8 prompts

def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_beginning(tmp_path) -> None:
    """A run killed before it wrote a checkpoint left only its run config: --resume (as the launch scripts pass
    whenever a run was started) trains it from the start, to the adapter an uninterrupted run writes."""
    fresh = Trainer(_config(tmp_path / "fresh")).run()
    stopped = _config(tmp_path / "stopped", "resume=latest")
    Path(stopped.output_dir).mkdir(parents=True)
    (Path(stopped.output_dir) / "run_config.yaml").write_text("epochs: 1\n")
    restarted = Trainer(stopped).run()
    a, b = load_file(fresh / WEIGHTS_FILE), load_file(restarted / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STATE_REPLAY = ("train.fresh_noise=true", "train.reference_states=0.5", "sampling.batch_size=4",
                "sampling.batches_per_epoch=2", "train.inner_epochs=2", "train.lr_schedule=cosine",
                "train.lr_warmup_steps=1", "train.gauge_every=2", "train.gauge_prompts=2", "ema.decay=0.9",
                "ema.start_step=1")
"""The state-replay mode with everything that carries state across epochs: reference batches, fresh action noise
over inner epochs, a learning-rate schedule with warm-up, gauges in the history, an EMA of the weights."""
ON_POLICY = ("ema.decay=0.9", "ema.start_step=1")
"""The recipe's update on the adapter's own samples, with an EMA of the weights that starts after the first optimizer
step."""
REUSED_GRADIENTS = ("train.reuse_reward_gradients=true", "train.inner_epochs=2", "train.proximal_weight=2",
                    "ema.decay=0.9", "ema.start_step=1")
"""The reward's gradients taken once per epoch and reused over two inner epochs, with an EMA."""


@pytest.mark.slow
@pytest.mark.parametrize("mode", [ON_POLICY, STATE_REPLAY, REUSED_GRADIENTS],
                         ids=["on-policy", "state-replay", "reused-gradients"])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, mode: tuple[str, ...]) -> None:
    uninterrupted = _run_training(tmp_path / "a", *mode)
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()

    killed = _run_training(tmp_path / "b", *mode)
    deadline = time.time() + 600
    while latest_checkpoint(tmp_path / "b") is None or latest_checkpoint(tmp_path / "b").name < "checkpoint-00002":
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)  # mid-epoch 3
    killed.wait()
    assert not (tmp_path / "b" / "final").exists()
    for folder in (tmp_path / "b" / "checkpoints").glob("checkpoint-*"):
        assert folder.suffix == ".tmp" or (folder / "trainer_state.json").is_file(), f"{folder} is half-written"

    resumed = _run_training(tmp_path / "b", *mode, "resume=latest")
    assert resumed.wait() == 0, resumed.stderr.read()
    for final in ("final", "final-raw"):  # the EMA's average and the raw weights
        a, b = load_file(tmp_path / "a" / final / WEIGHTS_FILE), load_file(tmp_path / "b" / final / WEIGHTS_FILE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), final
    history = json.loads((latest_checkpoint(tmp_path / "b") / "trainer_state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    if mode == STATE_REPLAY:
        uninterrupted_history = json.loads((latest_checkpoint(tmp_path / "a") / "trainer_state.json").read_text())
        assert [h.get("gauge_implied_beta") for h in history] == \
            [h.get("gauge_implied_beta") for h in uninterrupted_history["history"]]
        assert load_adapter_metadata(tmp_path / "b/final").optimality == \
            load_adapter_metadata(tmp_path / "a/final").optimality


def _launch(config_file: str, output_dir: Path, *overrides: str,
            recipe: str = "world_consistency.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch/accelerate" / config_file), "-m", "msdda.train", "--config",
               str(ROOT / "configs/train" / recipe), *TINY, f"output_dir={output_dir}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=CPU_ONLY)  # CPU processes


def _flux_overrides(root: Path) -> list[str]:
    """configs/train/flux_pickscore.yaml at toy size on a tiny random FLUX.1-dev and a tiny CLIP (PickScore's
    classes), written to ``root``."""
    from msdda.testing import tiny_clip, tiny_flux

    clip = tiny_clip(root / "clip")
    return [f"base={tiny_flux(root / 'flux')}", f"reward.kwargs={{model: {clip}, processor: {clip}}}",
            "prompts=[a photo of a cat, a red car]", "mixed_precision=no", "sampling.resolution=16",
            "train.gradient_accumulation_steps=1", "lora.rank=2", "lora.alpha=4"]


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_exports_one_adapter(tmp_path) -> None:
    result = _launch("cpu_2proc.yaml", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = load_adapter_metadata(tmp_path / "run" / "final")
    assert metadata.training["processes"] == 2 and metadata.training["trajectories_per_epoch"] == 8


@pytest.mark.slow
def test_two_processes_single_pass_averages_gradients_as_ddp_does(tmp_path) -> None:
    """single_pass runs its forwards outside DDP's wrapper and averages the gradients itself: over two
    processes it must end where the update pass (DDP's all-reduce) ends."""
    finals = {}
    for single_pass in ("false", "true"):
        result = _launch("cpu_2proc.yaml", tmp_path / single_pass, *SINGLE_PASS_EQUIVALENT,
                         f"train.single_pass={single_pass}")
        assert result.returncode == 0, result.stderr[-3000:]
        finals[single_pass] = load_file(tmp_path / single_pass / "final" / WEIGHTS_FILE)
    assert _relative_difference_of_trained_weights(finals["false"], finals["true"]) < 1e-2


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero2_with_two_cpu_processes_trains_checkpoints_and_resumes(tmp_path) -> None:
    """ZeRO-2 shards the optimizer state: checkpoints hold DeepSpeed's shards, and a resume reads them back.
    In bf16 (the GPU config's precision) the export is the float32 master LoRA, not the engine's bf16 copy, and the
    EMA averages the masters too: held before its start step, where it copies what it averages, it exports them."""
    pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed (DS_BUILD_OPS=0)")
    settings = ["sampling.batches_per_epoch=2", "mixed_precision=bf16", "ema.decay=0.9", "ema.start_step=1000"]
    result = _launch("deepspeed_zero2_cpu.yaml", tmp_path / "run", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "run")
    shards = sorted(p.name for p in (checkpoint / "deepspeed").rglob("*optim_states*"))
    assert len(shards) == 2, shards  # one optimizer shard per process, beside our own files
    assert not (checkpoint / "optimizer.safetensors").exists()
    resumed = _launch("deepspeed_zero2_cpu.yaml", tmp_path / "run", *settings, "epochs=2", "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metadata = load_adapter_metadata(tmp_path / "run" / "final")
    assert metadata.training["processes"] == 2 and metadata.training["epochs"] == 2
    lora = load_file(tmp_path / "run" / "final" / WEIGHTS_FILE)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in lora.values())  # more than bf16's precision
    raw = load_file(tmp_path / "run" / "final-raw" / WEIGHTS_FILE)  # s - (s - p): p up to float32 rounding
    assert raw.keys() == lora.keys() and all(torch.allclose(raw[key], lora[key], rtol=1e-6, atol=1e-9) for key in raw)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["world-flow", "flux"])
def test_accelerate_launch_with_two_cpu_processes_trains_a_flow_model(tmp_path, base: str) -> None:
    """The SD3-class flow world and a tiny FLUX.1-dev under DDP: one adapter with both processes' trajectories."""
    recipe, overrides = (("world_flow_aesthetic.yaml", []) if base == "world-flow" else
                         ("flux_pickscore.yaml", _flux_overrides(tmp_path / "models")))
    result = _launch("cpu_2proc.yaml", tmp_path / "run", *overrides, recipe=recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = load_adapter_metadata(tmp_path / "run" / "final")
    assert metadata.training["processes"] == 2 and metadata.training["trajectories_per_epoch"] == 8
    assert metadata.pipeline_class == ("StableDiffusion3Pipeline" if base == "world-flow" else "FluxPipeline")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero2_trains_and_resumes_the_flow_world(tmp_path) -> None:
    """ZeRO-2 on 2 CPU processes with the flow world's SD3 transformer: sharded optimizer state, resumed."""
    pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed (DS_BUILD_OPS=0)")
    result = _launch("deepspeed_zero2_cpu.yaml", tmp_path / "run", "mixed_precision=bf16",
                     recipe="world_flow_thirds.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in (latest_checkpoint(tmp_path / "run") / "deepspeed").rglob("*optim_states*"))
    assert len(shards) == 2, shards
    resumed = _launch("deepspeed_zero2_cpu.yaml", tmp_path / "run", "mixed_precision=bf16", "epochs=2",
                      "resume=latest", recipe="world_flow_thirds.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metadata = load_adapter_metadata(tmp_path / "run" / "final")
    assert metadata.training["processes"] == 2 and metadata.training["epochs"] == 2
    assert metadata.pipeline_class == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("config_file", ["fsdp2.yaml", "fsdp2_cpu.yaml"])
def test_fsdp2_launch_configs_shard_each_familys_denoiser_block_by_block(config_file: str) -> None:
    """The launch configs read as Accelerate reads them, and its FSDP2 wrap policy (the blocks each diffusers model
    lists in _no_split_modules) finds blocks to shard in the UNet, SD3's transformer and FLUX's, as on GPUs."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    launch = load_config_from_file(str(ROOT / "launch/accelerate" / config_file))
    assert launch.distributed_type == DistributedType.FSDP and launch.fsdp_config["fsdp_version"] == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                            auto_wrap_policy=launch.fsdp_config["fsdp_auto_wrap_policy"].lower())
    flow = world_path().parent / "flow" / "transformer"
    denoisers = {"JointTransformerBlock": SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(flow)),
                 "BasicTransformerBlock": UNet2DConditionModel.from_config(
                     UNet2DConditionModel.load_config(world_path() / "unet")),
                 "FluxSingleTransformerBlock": FluxTransformer2DModel(
                     in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))}
    for block, denoiser in denoisers.items():
        policy = fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
        assert any(policy(module) for module in denoiser.modules() if type(module).__name__ == block), block


@pytest.mark.slow
def test_fsdp2_with_two_cpu_processes_trains_checkpoints_and_resumes_to_the_uninterrupted_weights(tmp_path) -> None:
    """FSDP2 shards the denoiser, base and LoRA, over the processes (Accelerate's FSDP2 path on gloo); checkpoints
    gather the shards into msdda's own files and a resume shards them again, so an epoch, a resume and a second
    epoch end where two epochs in one go end, bit for bit, the EMA included. Every process samples the grids (each
    forward gathers the weights)."""
    settings = ["ema.decay=0.5", "sample_every=1"]
    straight = _launch("fsdp2_cpu.yaml", tmp_path / "straight", *settings, "epochs=2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _launch("fsdp2_cpu.yaml", tmp_path / "resumed", *settings)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _launch("fsdp2_cpu.yaml", tmp_path / "resumed", *settings, "epochs=2", "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for final in ("final", "final-raw"):
        a, b = (load_file(tmp_path / run / final / WEIGHTS_FILE) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), final
    metadata = load_adapter_metadata(tmp_path / "resumed" / "final")
    assert metadata.training["distributed_type"] == "FSDP" and metadata.training["processes"] == 2
    assert metadata.training["epochs"] == 2 and metadata.weights == "ema"
    assert sorted(p.name for p in (tmp_path / "resumed" / "samples").glob("*.png")) == ["epoch-00001.png",
                                                                                         "epoch-00002.png"]


def test_a_deepspeed_checkpoint_is_not_resumed_without_deepspeed(tmp_path) -> None:
    """Its optimizer state is ZeRO's shards, which only a DeepSpeed engine can read back."""
    Trainer(_config(tmp_path)).run()
    checkpoint = latest_checkpoint(tmp_path / "run")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["optimizer"]  # as a DeepSpeed run writes it: the shards live in deepspeed/
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="written under DeepSpeed"):
        Trainer(_config(tmp_path, "resume=latest", "epochs=2")).run()


def test_bf16_run_keeps_the_stored_base_hash_and_a_float32_lora(tmp_path, fresh_accelerator_state) -> None:
    """Mixed precision casts the frozen base for speed; the adapter still names the weights fusion loads."""
    trainer = Trainer(_config(tmp_path, "mixed_precision=bf16"))
    final = trainer.run()
    assert trainer.policy.pipeline.unet.dtype == torch.bfloat16
    stored = load_base_pipeline("world")
    assert load_adapter_metadata(final).base_model_hash == weights_hash(stored.unet)
    assert all(t.dtype == torch.float32 for t in load_file(final / WEIGHTS_FILE).values())


def test_evaluate_compares_an_adapter_with_its_base_on_paired_samples(tmp_path) -> None:
    from msdda.testing import random_world_adapter
    from msdda.train.evaluate import evaluate_adapter

    adapter = random_world_adapter(tmp_path / "adapter", seed=1, num_inference_steps=4)
    prompts = ["a red circle on the left", "a blue square at the top"]
    report = evaluate_adapter(str(adapter), rewards=["world-aesthetic", "world-consistency"], prompts=prompts,
                              seeds=[0, 1], batch_size=2, out=tmp_path / "eval")
    assert report["samples"] == 4 and report["kl_to_base"]["mean"] > 0 and report["weights"] == "raw"
    for values in report["rewards"].values():
        assert values["paired_difference"] == pytest.approx(values["adapter_mean"] - values["base_mean"])
    assert (tmp_path / "eval" / "before_after.png").is_file() and (tmp_path / "eval" / "evaluation.json").is_file()
    # a zero-weight adapter is its base: identical samples, zero KL
    zero = random_world_adapter(tmp_path / "zero", seed=2, num_inference_steps=4, scale=0.0)
    same = evaluate_adapter(str(zero), rewards=["world-aesthetic"], prompts=prompts, seeds=[0], batch_size=2)
    # exactly 0 on the CPU; on a GPU the base and adapter batches may take kernels that round differently
    assert abs(same["kl_to_base"]["mean"]) < 1e-6
    assert abs(same["rewards"]["world-aesthetic"]["paired_difference"]) < 1e-6


def test_attention_and_conv_lora_both_reach_stock_diffusers(tmp_path) -> None:
    """The recipes train LoRA on attention and ResNet convs: load_lora_weights must load every tensor."""
    config = _config(tmp_path, "lora.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2]")
    trainer = Trainer(config)
    final = trainer.run()
    saved = load_file(final / WEIGHTS_FILE)
    pipeline = StableDiffusionPipeline.from_pretrained(world_path(), local_files_only=True)
    pipeline.load_lora_weights(final)
    loaded = {name: p for name, p in pipeline.unet.named_parameters() if "lora_" in name}
    assert len(loaded) == len(saved) and any("attn" in n for n in loaded) and any("conv1" in n for n in loaded)
    trained = {n.replace(".default", ""): p for n, p in trainer.unwrapped.named_parameters() if "lora_" in n}
    for name, parameter in loaded.items():
        torch.testing.assert_close(parameter, trained[name.replace(".default_0", "")].detach().cpu())



def test_ddpm_trains_with_its_step_into_x0_deterministic(tmp_path, fresh_accelerator_state) -> None:
    """diffusers' DDPM clamps the zero posterior variance of its step into x_0 to 1e-20 and samples from it; msdda
    takes that step as deterministic, so it is no action: a finite KL, a zero log-prob there, never trained."""
    trainer = Trainer(_config(tmp_path, "sampling.scheduler=ddpm", "epochs=2"))
    trajectories = trainer.sample(0)
    assert trajectories.stochastic.tolist() == [True] * 3 + [False]
    assert trajectories.timesteps[-1] == 1 and (trajectories.log_probs[:, -1] == 0).all()
    assert torch.isfinite(trajectories.log_probs).all() and (trajectories.log_probs[:, :-1] != 0).all()
    trainer.run()
    assert 0 < trainer.history[-1]["kl"] < 1e3
