"""Per-step adapter scales: an adapter whose LoRA is applied at step t with the factor g_t of its own.

One LoRA serves every denoising step, so its mean shift at step t is tied to its shifts at the others: where the
step optimum asks for much at the middle steps and nothing at the last (whose small variance makes every shift
expensive in KL), the shared weights trade one against the other and meet neither. A factor per step restores the
one degree of freedom per step that the step-level objective decouples: the best multiple c of the adapter's own
shift d at a step is (msdda.train.stationarity.scale_beta; to first order in the shift)

    c = sum <d, g> / (beta sum |d|^2 / s^2)        (g = E[grad R_t], summed over the step's states)

and an adapter whose factors meet c = 1 at every step is at the optimum of the family {g_t * LoRA}: its restricted
step optimum. A factor 0 switches the adapter off at a step (a gated step: its kernel is the reference's).

The factors are recorded in the adapter's metadata as (timestep, scale) pairs and applied by every sampler of msdda
(fusion, evaluation, the studio) through :func:`scaled_adapters` inside the one guided forward. In stock diffusers the
same sampling is ``pipe.set_adapters(name, scale)`` before each step (``callback_on_step_end``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from msdda.errors import UserError
from msdda.models.base import unwrapped
from msdda.routing import lora_layers

__all__ = ["StepScale", "register_step_scales", "registered_step_scales", "scaled_adapters", "scale_at",
           "rescaled_factors", "resolved", "RESOLVED"]

StepScale = Mapping[str, float]
"""One recorded factor: ``{"step": index, "timestep": t, "scale": g_t}`` (JSON in ``msdda_adapter.json``)."""

_ATTRIBUTE = "msdda_step_scales"
"""The denoiser's attribute holding ``{adapter name: [StepScale, ...]}`` for the adapters loaded with factors."""


def register_step_scales(denoiser: torch.nn.Module, adapter: str, scales: Sequence[StepScale] | None) -> None:
    """Apply ``scales`` to ``denoiser``'s adapter ``adapter`` whenever it runs (None: remove them)."""
    model = unwrapped(denoiser)
    registered = dict(getattr(model, _ATTRIBUTE, {}))
    if scales is None:
        registered.pop(adapter, None)
    else:
        for entry in scales:
            if not (math.isfinite(float(entry["scale"])) and float(entry["scale"]) >= 0):
                raise UserError(f"adapter {adapter!r}: step scale {entry['scale']!r} at timestep {entry['timestep']} "
                                "is not a finite number >= 0; re-fit the scales (msdda calibrate)")
        registered[adapter] = [dict(entry) for entry in scales]
    setattr(model, _ATTRIBUTE, registered)


def registered_step_scales(denoiser: torch.nn.Module) -> dict[str, list[StepScale]]:
    """The per-step factors registered on ``denoiser``, by adapter name."""
    return getattr(unwrapped(denoiser), _ATTRIBUTE, {})


def scale_at(scales: Sequence[StepScale], timestep: float, adapter: str) -> float:
    """The factor of ``scales`` at ``timestep``; refused where none was recorded (a schedule of other steps)."""
    for entry in scales:
        if abs(float(entry["timestep"]) - timestep) <= 1e-4 * max(1.0, abs(timestep)):
            return float(entry["scale"])
    recorded = [float(entry["timestep"]) for entry in scales]
    raise UserError(f"adapter {adapter!r} has per-step scales for the timesteps {recorded}, not for {timestep:g}: "
                    "sample it with the steps and scheduler it was calibrated with (its msdda_adapter.json)")


@contextmanager
def scaled_adapters(denoiser: torch.nn.Module, timestep: torch.Tensor | float) -> Iterator[None]:
    """Within the block, every adapter with registered factors runs at its factor for ``timestep`` (PEFT's per-layer
    ``scaling``, restored after). A block with one timestep per row (a training update) is refused for such
    adapters: a factor per row is not a LoRA scaling."""
    registered = registered_step_scales(denoiser)
    if not registered:
        yield
        return
    if torch.is_tensor(timestep) and timestep.ndim:
        if len(torch.unique(timestep)) != 1:
            raise UserError(f"adapters {sorted(registered)} carry per-step scales, which apply to one timestep per "
                            "forward; they cannot be trained or run with a timestep per row")
        timestep = timestep[0]
    value = float(timestep)
    factors = {name: scale_at(scales, value, name) for name, scales in registered.items()}
    from peft.tuners.lora import LoraLayer

    saved = []
    for module in lora_layers(denoiser, LoraLayer):
        for name, factor in factors.items():
            if name in module.scaling:
                saved.append((module, name, module.scaling[name]))
                module.scaling[name] = module.scaling[name] * factor
    try:
        yield
    finally:
        for module, name, scaling in saved:
            module.scaling[name] = scaling


RESOLVED = 0.5
"""A step's best multiple is acted on only where its standard error is at most this (two errors span at most 1)."""


def resolved(gain_error: float, kl: float, beta: float) -> bool:
    """Whether a step's best multiple gain / (2 beta KL) is measured to within ``RESOLVED`` (``gain_error``: the
    standard error of the gain, ``kl`` the KL it is weighed against, both summed or both averaged over the states)."""
    return kl > 0 and gain_error / (2 * beta * kl) <= RESOLVED


def rescaled_factors(current: Sequence[float], gains: Sequence[float], gain_errors: Sequence[float],
                     kls: Sequence[float], beta: float, largest: float) -> list[float]:
    """The next factor of every step from the gauge at the ``current`` factors: each multiplied by its step's best
    multiple c = gain / (2 beta KL) (``gains``: sum <d, g> over the step's states, with standard errors
    ``gain_errors``; ``kls``: sum |d|^2 / (2 s^2)), 0 where the shift goes against the reward's gradient (c <= 0), at
    most ``largest``.

    A step keeps its factor where c is not resolved (its error above ``RESOLVED``: the step reward's gradient is lost
    in its noise there, as the one-step clean estimate's at the first, noisiest steps can be, and a guess would undo
    what training found), where nothing moved (KL 0), and once switched off. Steps whose optimum hardly moves but the
    LoRA does (the last ones) get c near 0, measured well: there a shift is all cost."""
    factors = []
    for factor, gain, error, kl in zip(current, gains, gain_errors, kls, strict=True):
        if factor == 0 or not resolved(error, kl, beta):
            factors.append(factor)
        else:
            factors.append(min(max(factor * gain / (2 * beta * kl), 0.0), largest))
    return factors
