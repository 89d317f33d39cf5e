"""The model families msdda trains and fuses, one module each (msdda.models.base says what a family declares):
``StableDiffusionPipeline`` (msdda.models.sd: SD 1.x/2.x, the embedded ``world`` and ``world-lv``),
``StableDiffusionXLPipeline`` (msdda.models.sdxl), ``StableDiffusion3Pipeline`` (msdda.models.sd3: SD 3 and 3.5, the
embedded ``world-flow``), ``FluxPipeline`` (msdda.models.flux: FLUX.1), ``Flux2Pipeline`` (msdda.models.flux2:
FLUX.2 [dev]) and ``QwenImagePipeline`` (msdda.models.qwen_image: Qwen-Image). Importing this package registers them;
docs/model-families.md says how to add one."""

from msdda.models import flux, flux2, qwen_image, sd, sd3, sdxl  # noqa: F401  (each registers its family)
from msdda.models.base import (
    ModelFamily,
    family_named,
    family_of,
    family_of_denoiser,
    pipeline_classes,
    register_family,
)

__all__ = ["ModelFamily", "register_family", "family_of", "family_named", "family_of_denoiser", "pipeline_classes"]
