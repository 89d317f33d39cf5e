"""Fusion methods as a registry: one small object per method, read by the sampler, pipeline, CLI, sweep and report.

A method says what it needs (a reference forward, the rewards while sampling, the adapters' betas) and how it
gets each step's kernel; the denoising loop (msdda.sampling) is shared. Adding a method is one module that
subclasses :class:`FusionMethod` and decorates it with :func:`register`, plus its import below.
"""

from __future__ import annotations

from msdda.fuse.methods.base import (
    FusionContext,
    FusionMethod,
    PathKL,
    get_method,
    method_names,
    register,
    unregister,
)

# the built-in methods register on import, in this order: the order the CLI, sweeps and reports list them
from msdda.fuse.methods import msdda, soup, output_average, diffusion_blend, code, rgg, single, reference  # noqa: E402,F401  # isort: skip

__all__ = ["FusionContext", "FusionMethod", "PathKL", "register", "unregister", "get_method", "method_names"]
