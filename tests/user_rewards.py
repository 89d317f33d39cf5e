"""User rewards loaded by import path in the tests."""

import os
import signal

import torch

from msdda.rewards import Reward
from msdda.rewards.world import WorldAesthetic


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


class Redness(Reward):
    name = "redness"
    version = "1"

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength

    def score(self, images, prompts):
        return self.strength * (images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3)))


DIE_AFTER = "MSDDA_TEST_REWARD_DIES_AFTER"
"""Set in a reward server's environment, the number of calls ServedAesthetic answers before its process dies."""


class ServedAesthetic(WorldAesthetic):
    """world-aesthetic under its own name, for a reward server that dies: with ``MSDDA_TEST_REWARD_DIES_AFTER=N`` in
    its environment, the process that scores it is killed (SIGKILL, no goodbye) by the call after the N-th."""

    name = "served-aesthetic"

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.die_after = 0, int(os.environ.get(DIE_AFTER, "0")) or None

    def score(self, images, prompts):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score(images, prompts)
