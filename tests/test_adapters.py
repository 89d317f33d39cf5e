"""Adapter metadata: a user reward trained by import path is found again by evaluate and sweep."""

from __future__ import annotations

import json

import pytest

from msdda.adapters import METADATA_FILE, load_adapter_metadata
from msdda.errors import UserError
from msdda.testing import random_world_adapter
from msdda.train.evaluate import evaluate_adapter


def test_evaluate_scores_a_user_reward_by_the_import_path_training_recorded(tmp_path) -> None:
    adapter = random_world_adapter(tmp_path / "adapter", seed=3, num_inference_steps=2)
    path = adapter / METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["reward_name"] = "redness"  # what the user's class calls itself: not a registered name
    path.write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="unknown reward 'redness'"):  # an adapter written before reward_spec
        load_adapter_metadata(adapter).trained_reward()
    metadata.update(reward_spec="tests.user_rewards:Redness", reward_kwargs={})
    path.write_text(json.dumps(metadata))
    report = evaluate_adapter(str(adapter), num_prompts=2, seeds=[0], batch_size=2, device="cpu")
    assert list(report["rewards"]) == ["redness"] and report["samples"] == 2
