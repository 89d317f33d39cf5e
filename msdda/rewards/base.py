"""The Reward interface and registry."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from msdda.errors import UserError

__all__ = ["Reward", "FunctionReward", "register_reward", "load_reward", "available_rewards"]

_REGISTRY: dict[str, Callable[..., Reward]] = {}


class Reward(nn.Module):
    """Scores images against prompts: ``forward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]``.

    Subclasses set ``name`` and ``version`` (recorded in adapter metadata so fusion can check what an adapter
    was trained for) and implement ``score``. Calls run in eval mode on the reward's device and return float32
    on the images' device, without grad unless ``grad=True`` is asked of a reward that sets ``differentiable``
    (its score is a differentiable function of the pixels; the pathwise estimator needs that).
    """

    name: str = "reward"
    version: str = "0"
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def reload_kwargs(self, given: dict) -> dict:
        """The constructor arguments that load this same reward again elsewhere (an adapter records them): the
        ``given`` ones, plus whatever the reward must check then (a remote reward: its server's name and version)."""
        return dict(given)

    @property
    def device(self) -> torch.device:
        for tensor in [*self.parameters(), *self.buffers()]:
            return tensor.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
        if grad and not self.differentiable:
            raise UserError(f"reward {self.name!r} is not differentiable (its class does not set differentiable = "
                             "True); use train.estimator=policy-gradient with it")
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{self.name}: images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise UserError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        self.eval()
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            scores = self.score(images.to(self.device, torch.float32), list(prompts))
        return scores.to(images.device, torch.float32).reshape(len(images))


class FunctionReward(Reward):
    """Wraps a plain ``fn(images, prompts) -> Tensor[B]`` (the ddpo-pytorch style) as a Reward."""

    def __init__(self, function: Callable[[torch.Tensor, list[str]], torch.Tensor], name: str, version: str = "0"):
        super().__init__()
        self.function, self.name, self.version = function, name, version

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.function(images, list(prompts)))


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a Reward factory (usually the class) under ``name``."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise UserError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def load_reward(spec: str, **kwargs) -> Reward:
    """A registered reward by name, ``"module:attribute"`` naming a Reward class or a reward function, or
    ``"remote:URL"`` naming a reward server (msdda.rewards.remote)."""
    from msdda.rewards.remote import REMOTE_PREFIX, RemoteReward

    if spec.startswith(REMOTE_PREFIX):
        return RemoteReward(spec[len(REMOTE_PREFIX):], **kwargs)
    if spec in _REGISTRY:
        return _REGISTRY[spec](**kwargs)
    if ":" not in spec:
        raise UserError(
            f"unknown reward {spec!r}; built-in rewards are {available_rewards()}, or give 'package.module:name' "
            "for your own Reward class or function, or 'remote:http://host:port' for a reward server"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(f"cannot load reward {spec!r}: {error}") from error
    if inspect.isclass(target) and issubclass(target, Reward):
        return target(**kwargs)
    if callable(target):
        return FunctionReward(target, name=spec, **kwargs)
    raise UserError(f"reward {spec!r} is neither a Reward class nor a function")
