"""The fusion-method interface, the per-call context it reads, and the registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from msdda.diffusion import BASE, adapter_kernels
from msdda.errors import UserError
from msdda.fuse.closed_form import exponents
from msdda.kernels import StepKernel
from msdda.sampling import denoise

__all__ = ["FusionContext", "FusionMethod", "entering_kernels", "register", "unregister", "get_method", "method_names"]


@dataclass(frozen=True)
class FusionContext:
    """One sampling call as every method sees it: the model, the prompts' embeddings and the weights."""

    unet: torch.nn.Module
    scheduler: object
    positive: torch.Tensor
    negative: torch.Tensor | None
    adapter_names: list[str]
    weights: list[float]
    exponents: list[float]
    """The method's own exponents (:meth:`FusionMethod.exponents`), one per adapter."""
    guidance_scale: float
    eta: float | None
    generator: torch.Generator
    prompts: Sequence[str] = ()
    reward: Callable | None = None
    """The weighted reward sum_i w_i r_i of decoded images, for methods that score while sampling."""
    decode: Callable | None = None
    code_candidates: int = 20
    code_block: int = 5

    def kernels(self, latents: torch.Tensor, timestep: torch.Tensor, names: list[str] | None,
                positive: torch.Tensor | None = None, negative: torch.Tensor | None = None) -> list[StepKernel]:
        """The step kernel of each named adapter ("__base__": the reference; None: the UNet as configured), from
        one batched forward with guidance applied per adapter. ``positive``/``negative`` replace the call's
        embeddings (e.g. repeated for candidates)."""
        if positive is None:
            positive, negative = self.positive, self.negative
        return adapter_kernels(self.unet, self.scheduler, latents, timestep, positive, negative, names,
                               self.guidance_scale, self.eta)


def entering_kernels(context: FusionContext, latents: torch.Tensor, timestep: torch.Tensor,
                     reference_exponent: float) -> tuple[list[StepKernel], list[float], StepKernel | None]:
    """The kernels of the adapters with a positive exponent, and the reference's when its exponent is not 0,
    from one batched forward: (adapter kernels, their exponents, reference kernel or None)."""
    entering = [(name, power) for name, power in zip(context.adapter_names, context.exponents) if power > 0]
    names = [name for name, _ in entering] + ([BASE] if reference_exponent else [])
    kernels = context.kernels(latents, timestep, names)
    reference = kernels[-1] if reference_exponent else None
    return kernels[:len(entering)], [power for _, power in entering], reference


class FusionMethod:
    """One way of sampling K reward adapters at given weights; subclass, set the class attributes, register."""

    name: ClassVar[str]
    label: ClassVar[str]
    """How reports and plots name it."""
    uses_betas: ClassVar[bool] = False
    """Weights adapters by their KL weights (l_i = w_i beta_i / beta); the others take the weights as given."""
    normalises_weights: ClassVar[bool] = False
    """Uses the weights' shares w_i / sum(w) (weights off the simplex mean the same as their normalisation)."""
    needs_adapters: ClassVar[bool] = True
    """Samples through at least one adapter (the base model alone does not)."""
    needs_rewards: ClassVar[bool] = False
    """Calls the rewards while sampling."""
    gaussian: ClassVar[bool] = True
    """Each step samples from one Gaussian kernel (so its KL to another kernel is defined)."""
    sweeps_weights: ClassVar[bool] = True
    """Its samples depend on the weights (a sweep samples it at every weight vector)."""
    coincides_with: ClassVar[str | None] = None
    """A method whose samples equal this one's in a common case, and :attr:`coincidence` says when."""
    coincidence: ClassVar[str] = ""

    def exponents(self, weights: Sequence[float], betas: Sequence[float], beta: float | None) -> list[float]:
        """Each adapter's exponent; validated the one way for every method (non-negative, not all zero)."""
        return exponents(weights)

    def reference_exponent(self, context: FusionContext) -> float:
        """The reference kernel's exponent; a method whose kernel involves the reference says so."""
        return 0.0

    def cell_weights(self, grid: list[tuple[float, ...]], count: int) -> list[tuple[float, ...]]:
        """The weight vectors a sweep samples this method at: the grid, unless its samples ignore the weights."""
        return grid

    @contextmanager
    def active(self, pipeline, adapter_names: list[str], weights: list[float]):
        """Set the pipeline up for this method while it samples (e.g. the soup's weighted LoRA deltas)."""
        yield

    def kernel(self, context: FusionContext, index: int, timestep: torch.Tensor,
               latents: torch.Tensor) -> StepKernel:
        """The Gaussian kernel this method samples x_{t-1} from at step ``index``."""
        raise NotImplementedError(f"{type(self).__name__} defines no step kernel")

    def sample(self, context: FusionContext, latents: torch.Tensor, timesteps) -> torch.Tensor:
        """Denoise ``latents`` over ``timesteps`` (x_T to x_0) with this method's kernels."""
        return denoise(timesteps, latents, lambda index, timestep, x_t: self.kernel(context, index, timestep, x_t),
                       context.generator, context.positive)


_REGISTRY: dict[str, FusionMethod] = {}


def register(cls: type[FusionMethod]) -> type[FusionMethod]:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise UserError(f"a fusion method named {cls.name!r} is registered already")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (a plug-in's, or a test's)."""
    if name not in _REGISTRY:
        raise UserError(f"no fusion method named {name!r} is registered; registered: {method_names()}")
    del _REGISTRY[name]


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> FusionMethod:
    """The registered method called ``name``; an unknown name is an error that lists the known ones."""
    if name not in _REGISTRY:
        raise UserError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]
