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


class _DeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's warning that it found no GPU and uses the CPU, and nothing else.

    scripts/install.sh installs DeepSpeed, and Accelerate imports it on every run, so on a CPU machine every
    ``msdda train`` (DeepSpeed or not) printed that warning, though the CPU is what the run asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU.")


# both loggers are the standard library's, by name; this imports nothing from transformers or DeepSpeed
logging.getLogger("transformers.utils.import_utils").addFilter(_DiffusersImageProcessorFallback())
logging.getLogger("DeepSpeed").addFilter(_DeepSpeedCpuNotice())

# the embedded worlds register their base names ("world", "world-lv", "world-flow") with msdda.bases, which the
# loaders ask; importing them here, at the top, keeps the loaders free of any import of msdda.world
from msdda import world as _world  # noqa: E402,F401
