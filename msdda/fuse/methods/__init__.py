"""Fusion methods as a registry: one small object per method, read by the sampler, pipeline, CLI, sweep and report.

A method says what it needs (a reference forward, the rewards while sampling, the adapters' betas) and how it
gets each step's kernel; the denoising loop (msdda.sampling) is shared. Adding a method is one module that
subclasses :class:`FusionMethod` and decorates it with :func:`register`, plus its import below.
"""

from __future__ import annotations

from msdda.fuse.methods.base import FusionContext, FusionMethod, get_method, method_names, register

# the built-in methods, in the order the CLI, sweeps and reports list them
from msdda.fuse.methods import code as _code  # noqa: E402,F401
from msdda.fuse.methods import diffusion_blend as _diffusion_blend  # noqa: E402,F401
from msdda.fuse.methods import msdda as _msdda  # noqa: E402,F401  (registers on import)
from msdda.fuse.methods import output_average as _output_average  # noqa: E402,F401
from msdda.fuse.methods import reference as _reference  # noqa: E402,F401
from msdda.fuse.methods import single as _single  # noqa: E402,F401
from msdda.fuse.methods import soup as _soup  # noqa: E402,F401

__all__ = ["FusionContext", "FusionMethod", "register", "get_method", "method_names"]
