"""Adapter metadata: a user reward trained by import path is found again by evaluate and sweep."""

from __future__ import annotations

import json

import pytest

from msdda.adapters import METADATA_FILE, AdapterMetadata, load_adapter_metadata
from msdda.errors import UserError
from msdda.testing import random_world_adapter
from msdda.train.evaluate import evaluate_adapter, reward_arguments


def test_evaluate_scores_a_user_reward_by_the_import_path_training_recorded(tmp_path) -> None:
    adapter = random_world_adapter(tmp_path / "adapter", seed=3, num_inference_steps=2)
    path = adapter / METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["reward_name"] = "redness"  # what the user's class calls itself: not a registered name
    path.write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="unknown reward 'redness'"):  # an adapter written before reward_spec
        load_adapter_metadata(adapter).trained_reward()
    metadata.update(reward_spec="tests.user_rewards:Redness", reward_kwargs={"strength": 2.0})
    path.write_text(json.dumps(metadata))
    report = evaluate_adapter(str(adapter), num_prompts=2, seeds=[0], batch_size=2, device="cpu")
    assert list(report["rewards"]) == ["redness"] and report["samples"] == 2
    assert report["reward_kwargs"]["redness"] == {"kwargs": {"strength": 2.0}, "from": "recorded in the adapter"}
    # named by its import path (as docs/rewards.md says to), the reward keeps the arguments training recorded;
    # arguments the user gives go over them: the same images score exactly half at strength 1
    spec = "tests.user_rewards:Redness"
    named = evaluate_adapter(str(adapter), rewards=[spec], num_prompts=2, seeds=[0], batch_size=2, device="cpu")
    assert named["rewards"][spec] == report["rewards"]["redness"]
    given = evaluate_adapter(str(adapter), rewards=[spec], num_prompts=2, seeds=[0], batch_size=2, device="cpu",
                             reward_kwargs={"strength": 1.0})
    assert given["reward_kwargs"][spec]["kwargs"] == {"strength": 1.0}
    assert given["rewards"][spec]["base_mean"] == pytest.approx(report["rewards"]["redness"]["base_mean"] / 2)


def test_reward_arguments_come_from_the_adapter_for_its_own_reward_only() -> None:
    metadata = AdapterMetadata(
        reward_name="redness", reward_version="1", beta=0.01, step_reward="tweedie", base_model="world",
        base_model_hash="0", scheduler_class="DDIMScheduler", scheduler_config={}, num_inference_steps=2, eta=1.0,
        guidance_scale=3.0, lora_rank=2, lora_alpha=2.0, lora_target_modules=[], training={},
        reward_spec="tests.user_rewards:Redness", reward_kwargs={"strength": 2.0, "offset": 1})
    assert reward_arguments(metadata, "tests.user_rewards:Redness") == ({"strength": 2.0, "offset": 1},
                                                                          "recorded in the adapter")
    assert reward_arguments(metadata, "redness", {"strength": 1.0})[0] == {"strength": 1.0, "offset": 1}
    assert reward_arguments(metadata, "world-aesthetic") == ({}, "the reward's defaults")
    assert reward_arguments(metadata, "world-aesthetic", {"scale": 3}) == ({"scale": 3}, "given")
