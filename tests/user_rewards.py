"""User rewards loaded by import path in the tests."""

import torch

from msdda.rewards import Reward


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


class Redness(Reward):
    name = "redness"
    version = "1"

    def score(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
