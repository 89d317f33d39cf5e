"""User rewards loaded by import path in the tests."""

import torch

from msdda.rewards import Reward


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
