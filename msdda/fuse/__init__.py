"""Retraining-free fusion of reward adapters (MSDDA): the closed form, the sampler and the baselines.

Every name is imported on first use (PEP 562), so that ``msdda fuse --help`` and the other commands' argument
errors answer without importing torch: the closed form needs torch, the pipelines diffusers."""

__all__ = ["fuse_gaussians", "exponents", "reference_exponent", "REFERENCE_TOLERANCE", "MSDDAPipeline",
           "MSDDA3Pipeline", "MSDDAFluxPipeline"]

_CLOSED_FORM = ("fuse_gaussians", "exponents", "reference_exponent", "REFERENCE_TOLERANCE")


def __getattr__(name: str):
    if name in _CLOSED_FORM:
        from msdda.fuse import closed_form

        return getattr(closed_form, name)
    if name in ("MSDDAPipeline", "MSDDA3Pipeline", "MSDDAFluxPipeline"):
        from msdda.fuse import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
