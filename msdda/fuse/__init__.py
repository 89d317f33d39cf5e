"""Retraining-free fusion of reward adapters (MSDDA): the closed form, the sampler and the baselines."""

from msdda.fuse.closed_form import (
    REFERENCE_TOLERANCE,
    exponents,
    fuse_gaussians,
    reference_exponent,
)

__all__ = ["fuse_gaussians", "exponents", "reference_exponent", "REFERENCE_TOLERANCE", "MSDDAPipeline",
           "MSDDA3Pipeline", "MSDDAFluxPipeline"]


def __getattr__(name: str):
    # imported lazily: the closed form needs no diffusers
    if name in ("MSDDAPipeline", "MSDDA3Pipeline", "MSDDAFluxPipeline"):
        from msdda.fuse import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
