"""Fusion's word on adapters far from their step optimum, read from the gauge their training recorded.

MSDDA's exponents l_i = w_i beta_i / beta are exact for adapters at their step optimum (msdda.train.gauge). An
adapter that stopped short behaves as one trained at a larger beta, its implied beta, and fusing it at its nominal
beta over-weights it against adapters nearer their optimum.

What the exponents scale is each adapter's shift, so what they need is the right size of shift at every step: the scale
condition (``max_scale_deviation``: each step's shift at its best multiple), which a LoRA can meet (per-step scales,
``msdda calibrate``) where the pointwise one (``max_ratio_deviation``, the shift equal to the optimum's) is out of the
reach of a family that cannot point where the optimum points. Gauges recorded before the scale condition was are read
by the pointwise one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from msdda.adapters import AdapterMetadata

__all__ = ["FAR_FROM_OPTIMUM", "FAR_FROM_OPTIMUM_WARNING", "far_from_optimum", "warn_far_from_optimum"]

FAR_FROM_OPTIMUM = 0.5
"""An adapter whose mean shift at some step that carries KL is off its optimum's by more than this fraction."""

FAR_FROM_OPTIMUM_WARNING = "adapters far from their step optimum"
"""How the warning about such adapters begins (a filter's ``message``, where the advice does not apply)."""


def far_from_optimum(metadata: AdapterMetadata | None) -> bool:
    """Whether the adapter's recorded gauge puts it far from its step optimum (False where nothing was recorded)."""
    gauge = metadata.optimality if metadata is not None else None
    if not gauge:
        return False
    worst = _worst_deviation(gauge)
    return worst is None or worst > FAR_FROM_OPTIMUM


def _worst_deviation(gauge: dict) -> float | None:
    """The scale condition's worst step where the gauge has it, else the pointwise one's."""
    return gauge["max_scale_deviation"] if "max_scale_deviation" in gauge else gauge.get("max_ratio_deviation")


def warn_far_from_optimum(sources: Sequence[str], metadata: Sequence[AdapterMetadata | None], stacklevel: int = 2
                          ) -> None:
    """One warning, one line, naming every adapter far from its step optimum, its trained and implied betas, and the
    fix; nothing when none is."""
    far = [(source, meta) for source, meta in zip(sources, metadata) if far_from_optimum(meta)]
    if not far:
        return
    described = "; ".join(
        f"{source} (beta {meta.beta:g}, implied {_implied(meta.optimality)}, worst step off by "
        f"{_worst(meta.optimality)})" for source, meta in far)
    warnings.warn(f"{FAR_FROM_OPTIMUM_WARNING}, so MSDDA's exponents w_i beta_i / beta do not fit them: "
                  f"{described}. Fit their per-step scales (msdda calibrate), retrain them (train.stop_near_optimum) "
                  "or fuse with --betas set to the implied betas", stacklevel=stacklevel + 1)


def _implied(gauge: dict) -> str:
    value = gauge.get("implied_beta")
    return "none" if value is None else f"{value:.3g}"


def _worst(gauge: dict) -> str:
    value = _worst_deviation(gauge)
    return "an unmeasured amount" if value is None else f"{value:.0%}"
