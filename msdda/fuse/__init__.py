"""Retraining-free fusion of reward adapters (MSDDA): the closed form, and later the sampler and baselines."""

from msdda.fuse.closed_form import REFERENCE_TOLERANCE, exponents, fuse_gaussians, reference_exponent

__all__ = ["fuse_gaussians", "exponents", "reference_exponent", "REFERENCE_TOLERANCE"]
