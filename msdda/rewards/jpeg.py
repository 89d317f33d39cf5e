"""JPEG (in)compressibility: the file size of the image saved as JPEG, DDPO's simplest rewards."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from msdda.rewards.base import Reward, register_reward

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_kilobytes"]

QUALITY = 95


def jpeg_kilobytes(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """Size in kB of each ``[B, 3, H, W]`` image in [0, 1] saved with PIL as JPEG at ``quality``."""
    from PIL import Image

    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg-compressibility")
class JpegCompressibility(Reward):
    """Minus the JPEG size in kB (smaller files: simpler images). Not differentiable."""

    name = "jpeg-compressibility"
    version = "1"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_kilobytes(images)


@register_reward("jpeg-incompressibility")
class JpegIncompressibility(Reward):
    """The JPEG size in kB (larger files: more detail). Not differentiable."""

    name = "jpeg-incompressibility"
    version = "1"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_kilobytes(images)
