"""msdda: align text-to-image diffusion models with several rewards at once.

Train one LoRA adapter per reward with step-level KL-regularised RL, then fuse any of them at sampling time
with the exact MSDDA closed form. See README.md.
"""

__version__ = "0.1.0"
