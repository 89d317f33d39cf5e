"""Per-prompt advantages: step rewards minus a running per-prompt baseline, as DDPO computes them.

Pure functions of the rewards (no processes, no devices): the trainer gathers every process's rewards first,
so that each prompt's statistics see all of its samples, and keeps its own rows of the result.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

from msdda.errors import UserError

__all__ = ["PerPromptStatTracker", "per_prompt_advantages"]

Normalisation = Literal["center", "standardize"]


class PerPromptStatTracker:
    """Running reward statistics per key (prompt, or prompt and step), as DDPO keeps them.

    ``center`` subtracts the key's running mean (an unbiased baseline: the optimum keeps its beta);
    ``standardize`` also divides by the running std (DDPO's choice: steadier steps, but the effective KL weight
    becomes beta * std). Keys with fewer than ``min_count`` stored rewards use the batch's global statistics.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, normalisation: Normalisation = "center"):
        if normalisation not in ("center", "standardize"):
            raise UserError(f"normalisation must be 'center' or 'standardize', got {normalisation!r}")
        self.buffer_size, self.min_count, self.normalisation = buffer_size, min_count, normalisation
        self.buffers: dict[Hashable, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, keys: Sequence[Hashable], rewards: np.ndarray) -> np.ndarray:
        """Advantages for ``rewards`` (one per key), after adding them to the running buffers."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        global_mean, global_std = rewards.mean(), rewards.std() + 1e-6
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, key in enumerate(keys):
            groups[key].append(index)
        for key, indices in groups.items():
            buffer = self.buffers[key]
            buffer.extend(rewards[indices].tolist())
            if len(buffer) < self.min_count:
                mean, std = global_mean, global_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer)) + 1e-6
            scale = std if self.normalisation == "standardize" else 1.0
            advantages[indices] = (rewards[indices] - mean) / scale
        return advantages

    def state_dict(self) -> dict:
        return {"buffers": {repr(k): (k, list(v)) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for key, values in state["buffers"].values():
            key = tuple(key) if isinstance(key, list) else key
            self.buffers[key].extend(values)


def per_prompt_advantages(step_rewards: np.ndarray, prompts: Sequence[str], tracker: PerPromptStatTracker,
                          step_reward: str) -> np.ndarray:
    """Advantages ``[B, T]`` of the step rewards ``[B, T]`` of B trajectories, updating ``tracker``.

    A ``terminal`` reward is one number per trajectory, so each prompt keeps one baseline and every step of a
    trajectory gets the same advantage; a dense step reward (``tweedie``, ``rollout``) keeps one baseline per
    (prompt, step), since the reward's scale changes along the chain. A trajectory with any non-finite reward
    is dropped: it stays out of the statistics and its row is NaN, which the updates skip.
    """
    step_rewards = np.asarray(step_rewards)
    finite = np.isfinite(step_rewards).all(axis=1)
    advantages = np.zeros_like(step_rewards)
    if finite.any():
        steps = step_rewards.shape[1]
        if step_reward == "terminal":
            keys = [p for p, ok in zip(prompts, finite) if ok]
            advantages[finite] = tracker.update(keys, step_rewards[finite, -1])[:, None]
        else:
            rows = np.flatnonzero(finite)
            keys = [(prompts[r], s) for r in rows for s in range(steps)]
            advantages[finite] = tracker.update(keys, step_rewards[finite].reshape(-1)).reshape(-1, steps)
    advantages[~finite] = np.nan
    return advantages
