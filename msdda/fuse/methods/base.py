"""The fusion-method interface, the per-call context it reads, the path-KL meter it records into, and the
registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from msdda.diffusion import BASE, adapter_kernels, uses_guidance
from msdda.errors import UserError
from msdda.fuse.closed_form import exponents
from msdda.kernels import StepKernel, kernel_kl
from msdda.sampling import Step, denoise

__all__ = ["FusionContext", "FusionMethod", "PathKL", "entering_kernels", "register", "unregister", "get_method",
           "method_names", "OPTIMAL_SCALE"]

OPTIMAL_SCALE = "optimal"
"""The ``rgg_scale`` that moves each step by s_t^2 / beta times the step reward's gradient (msdda.fuse.methods.rgg)."""


@dataclass
class PathKL:
    """Per sample, sum over the stochastic steps of KL(method's kernel at x_t || target's kernel at x_t) along
    the method's own trajectory, for each target adapter (``"__base__"``: the reference; other names: adapters
    loaded only to compare against, e.g. retrained oracles). Deterministic steps (variance 0) have no density
    and add nothing, as in msdda.train.evaluate.

    The targets' kernels come from their own UNet forward at each step, separate from the method's: a larger
    batch can change the method's rows in their last bits (measured on CPU), and the KL must not change the
    sampled trajectory. A target the method's own forward already evaluated at that x_t (the reference inside
    MSDDA's product, the base model's own kernel) is reused, so the base's KL to itself is exactly 0 and costs
    nothing. ``unet_rows`` and ``seconds`` are what the measuring forwards cost, kept apart from the method's.

    With ``keeps_reference_x0`` it also keeps the reference's x0 estimate at every state x_T ... x_1 of the
    trajectory (deterministic steps included): the clean images the ``tweedie`` step reward scores, from which a
    sweep computes the step-level objective the adapters were trained for.

    With ``defers`` the targets' own forwards wait until :meth:`complete`, so that the samples are ready first (the
    studio shows a grid before its KLs); the samples are the same either way. :attr:`totals` refuses to be read
    while steps wait.
    """

    targets: tuple[str, ...]
    _totals: dict[str, torch.Tensor]
    unet_rows: int = 0
    seconds: float = 0.0
    keeps_reference_x0: bool = False
    defers: bool = False
    reference_x0: list[torch.Tensor] = field(default_factory=list)
    """With ``keeps_reference_x0``: the reference's x0 estimate at each step's x_t, in sampling order."""
    _seen: tuple[torch.Tensor, torch.Tensor, dict[str, StepKernel]] | None = field(default=None, repr=False)
    _waiting: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @classmethod
    def zeros(cls, targets: Sequence[str], batch: int, keeps_reference_x0: bool = False,
              defers: bool = False) -> PathKL:
        return cls(tuple(targets), {name: torch.zeros(batch, dtype=torch.float64) for name in targets},
                   keeps_reference_x0=keeps_reference_x0, defers=defers)

    @property
    def totals(self) -> dict[str, torch.Tensor]:
        """Target name -> ``[B]`` float64 path KL (NaN when the method has no Gaussian kernel)."""
        if self._waiting:
            raise UserError(f"the path KL of {len(self._waiting)} steps was deferred (defer_kl=True) and is not "
                            "measured yet: call path_kl.complete() first")
        return self._totals

    @property
    def waiting_steps(self) -> int:
        """Steps whose targets' forwards wait for :meth:`complete`."""
        return len(self._waiting)

    def wait(self, measure: Callable[[], None]) -> None:
        """Keep one step's measurement for :meth:`complete`."""
        self._waiting.append(measure)

    @torch.no_grad()
    def complete(self) -> PathKL:
        """Run the deferred steps' measurements, in sampling order; returns the meter."""
        while self._waiting:
            self._waiting.pop(0)()
        return self

    @classmethod
    def undefined(cls, targets: Sequence[str], batch: int) -> PathKL:
        """For a method without a Gaussian kernel (CoDe): every KL is NaN."""
        return cls(tuple(targets), {name: torch.full((batch,), float("nan"), dtype=torch.float64)
                                    for name in targets})

    def remember(self, latents: torch.Tensor, timestep: torch.Tensor, names: Sequence[str],
                 kernels: Sequence[StepKernel]) -> None:
        """Keep the targets among the kernels a method's forward computed at (x_t, t), to reuse at this step."""
        self._seen = (latents, timestep, {n: k for n, k in zip(names, kernels) if n in self.targets})

    def known(self, latents: torch.Tensor, timestep: torch.Tensor) -> dict[str, StepKernel]:
        """The targets' kernels already computed at exactly this x_t and t (the same tensors)."""
        if self._seen is None or self._seen[0] is not latents or self._seen[1] is not timestep:
            return {}
        return self._seen[2]

    def add(self, kernel: StepKernel, targets: dict[str, StepKernel]) -> None:
        """Add one stochastic step: KL(kernel || each target's kernel)."""
        for name in self.targets:
            self._totals[name] += kernel_kl(kernel, targets[name]).double().cpu()


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
    """``reward(images, prompts, grad=False)``: the weighted reward sum_i w_i r_i of decoded images (with the shares
    w_i / sum(w) for a method that normalises the weights), for methods that score while sampling; ``grad=True``
    keeps it differentiable in the images."""
    decode: Callable | None = None
    """``decode(latents, grad=False)``: images in [0, 1], differentiable in the latents with ``grad=True``."""
    code_candidates: int = 20
    code_block: int = 5
    beta: float | None = None
    """The fused objective's KL weight (sum_i w_i r_i - beta KL)."""
    rgg_scale: float | str = OPTIMAL_SCALE
    """RGG's step scale: a number, or ``"optimal"`` (s_t^2 / beta)."""
    path_kl: PathKL | None = None
    """Where :meth:`record` sums the path KL to the targets (None: no KL is measured)."""

    def kernels(self, latents: torch.Tensor, timestep: torch.Tensor, names: list[str] | None,
                positive: torch.Tensor | None = None, negative: torch.Tensor | None = None) -> list[StepKernel]:
        """The step kernel of each named adapter ("__base__": the reference; None: the UNet as configured), from
        one batched forward with guidance applied per adapter. ``positive``/``negative`` replace the call's
        embeddings (e.g. repeated for candidates)."""
        measured = positive is None and names is not None and self.path_kl is not None
        if positive is None:
            positive, negative = self.positive, self.negative
        kernels = adapter_kernels(self.unet, self.scheduler, latents, timestep, positive, negative, names,
                                  self.guidance_scale, self.eta)
        if measured:
            self.path_kl.remember(latents, timestep, names, kernels)
        return kernels

    def record(self, step: Step) -> None:
        """The loop's recorder: add the step's KL to each target of :attr:`path_kl` (none: nothing to do). The
        targets the method's forward did not evaluate get one forward of their own; the measurement's time and
        UNet rows are counted apart from the method's."""
        meter = self.path_kl
        deterministic = step.kernel.is_deterministic
        if meter is None or (deterministic and not meter.keeps_reference_x0):
            return
        targets = dict(meter.known(step.latents, step.timestep))
        if meter.defers:
            meter.wait(lambda: self._measure(step, targets, deterministic))
        else:
            self._measure(step, targets, deterministic)

    def _measure(self, step: Step, targets: dict[str, StepKernel], deterministic: bool) -> None:
        """One step's measurement: forwards for the targets the method's did not evaluate, then the KLs."""
        meter = self.path_kl
        started = self._synchronized_clock()
        wanted = (BASE,) if deterministic else meter.targets
        missing = [name for name in wanted if name not in targets]
        if missing:
            targets.update(zip(missing, self.kernels(step.latents, step.timestep, missing)))
            halves = 2 if uses_guidance(self.negative, self.guidance_scale) else 1
            meter.unet_rows += len(step.latents) * len(missing) * halves
        if meter.keeps_reference_x0:
            meter.reference_x0.append(targets[BASE].pred_original_sample)
        if not deterministic:
            meter.add(step.kernel, targets)
        meter.seconds += self._synchronized_clock() - started

    def _synchronized_clock(self) -> float:
        """Now, once the GPU has finished what it was given (else its time would count for the wrong forward)."""
        if self.positive.device.type == "cuda":
            torch.cuda.synchronize(self.positive.device)
        return time.perf_counter()


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
    needs_reward_gradients: ClassVar[bool] = False
    """Differentiates the rewards while sampling (so they must be differentiable)."""
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

    def check_rewards(self, rewards: Sequence) -> None:
        """Refuse, in one message naming them, rewards this method cannot use while sampling: without gradients, for a
        method that follows them."""
        if not self.needs_reward_gradients:
            return
        flat = [getattr(reward, "name", repr(reward)) for reward in rewards
                if not getattr(reward, "differentiable", False)]
        if flat:
            raise UserError(f"method {self.name!r} follows the rewards' gradients while sampling, but {flat} are not "
                            "differentiable (their Reward class does not set differentiable = True); use "
                            "differentiable rewards, or method 'code', which only scores samples")

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
                       context.generator, context.positive, record=context.record)


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
