"""Rewards scored in a background thread while the next batch samples (reward.score_while_sampling): the same
trajectories, rewards and trained weights bit for bit as scoring each batch at once."""

from __future__ import annotations

from pathlib import Path

import torch

from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "sampling.num_inference_steps=3", "sampling.batch_size=2", "sampling.batches_per_epoch=2",
        "train.batch_size=2", "sample_every=0", "log_with=null", "checkpoint.every=1", "train.gauge_prompts=0"]


def _train(output_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                                  [*TINY, f"output_dir={output_dir}", *overrides]))
    trainer.run()
    return trainer


POLICY_GRADIENT_TWEEDIE = ["reward.step_reward=tweedie", "train.estimator=policy-gradient"]
"""A reward call per step and batch, all of them in the background thread."""


def test_scoring_while_sampling_trains_the_same_adapter_bit_for_bit(tmp_path) -> None:
    at_once = _train(tmp_path / "at_once", *POLICY_GRADIENT_TWEEDIE)
    overlapped = _train(tmp_path / "overlapped", *POLICY_GRADIENT_TWEEDIE, "reward.score_while_sampling=true")
    assert [h["reward_mean"] for h in overlapped.history] == [h["reward_mean"] for h in at_once.history]
    assert [h["loss"] for h in overlapped.history] == [h["loss"] for h in at_once.history]
    a, b = (trainer.unwrapped.state_dict() for trainer in (at_once, overlapped))
    trained = [key for key in a if "lora_" in key]
    assert trained and all(torch.equal(a[key], b[key]) for key in trained)
    assert any(not torch.equal(a[key], torch.zeros_like(a[key])) for key in trained if "lora_B" in key)
