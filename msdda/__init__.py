"""msdda: align text-to-image diffusion models with several rewards at once.

Train one LoRA adapter per reward with step-level KL-regularised RL, then fuse any of them at sampling time
with the exact MSDDA closed form. See README.md.
"""

import logging

__version__ = "0.1.0"


class _DiffusersImageProcessorFallback(logging.Filter):
    """Drops transformers' warning that CLIPImageProcessor and SiglipImageProcessor fall back to their PIL
    versions without torchvision, and nothing else.

    diffusers' Stable Diffusion pipeline and IP-adapter loader import those two names when the pipeline is
    first imported, so without this every msdda command (even ``--help``) began with two lines telling the
    user to install torchvision. msdda needs no torchvision: it preprocesses images in torch itself and reads
    only a processor's settings, which the PIL versions hold too. Other processors' fallback warnings, and
    every other transformers message, still show."""

    PREFIXES = tuple(f"`{name}` requires torchvision" for name in ("CLIPImageProcessor", "SiglipImageProcessor"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


# transformers' loggers are the standard library's, by module name; this imports nothing from transformers
logging.getLogger("transformers.utils.import_utils").addFilter(_DiffusersImageProcessorFallback())
