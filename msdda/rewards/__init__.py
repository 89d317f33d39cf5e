"""Rewards: one interface (images + prompts -> one float per image), a registry, and user rewards by path.

A reward is ``reward(images, prompts) -> Tensor[B]`` where ``images`` are ``[B, 3, H, W]`` floats in [0, 1]
(what a diffusers pipeline returns with ``output_type="pt"``). Built-in names are listed by
:func:`available_rewards`; ``"package.module:attribute"`` loads a user's Reward class or plain function.
"""

# importing the modules registers their rewards
from msdda.rewards import clip as _clip  # noqa: F401,E402
from msdda.rewards import imagereward as _imagereward  # noqa: F401,E402
from msdda.rewards import jpeg as _jpeg  # noqa: F401,E402
from msdda.rewards import weighted as _weighted  # noqa: F401,E402
from msdda.rewards import world as _world  # noqa: F401,E402
from msdda.rewards.base import (
    FunctionReward,
    Reward,
    available_rewards,
    load_reward,
    register_reward,
)

__all__ = ["Reward", "FunctionReward", "register_reward", "load_reward", "available_rewards"]
