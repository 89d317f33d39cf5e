"""``weighted-sum``: sum_i w_i r_i of other rewards, the objective MSDDA's weights stand for.

Training on it gives the oracle adapter for weights w (what MSDDA claims to match without retraining).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from msdda.errors import UserError
from msdda.rewards.base import Reward, load_reward, register_reward

__all__ = ["WeightedSum"]


@register_reward("weighted-sum")
class WeightedSum(Reward):
    """sum_i weights[i] * rewards[i](images, prompts); differentiable when every part is."""

    version = "1"

    def __init__(self, rewards: Sequence[str], weights: Sequence[float],
                 kwargs: Sequence[dict] | None = None) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise UserError(f"weighted-sum needs one weight per reward, got rewards={list(rewards)} and "
                             f"weights={list(weights)}")
        kwargs = list(kwargs) if kwargs is not None else [{} for _ in rewards]
        self.parts = nn.ModuleList([load_reward(name, **options) for name, options in zip(rewards, kwargs)])
        self.weights = [float(w) for w in weights]
        self.name = "weighted-sum(" + " + ".join(f"{w:g}*{part.name}" for w, part in zip(self.weights, self.parts)) + ")"
        self.differentiable = all(part.differentiable for part in self.parts)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return sum(weight * part.score(images, prompts) for weight, part in zip(self.weights, self.parts))
