"""The embedded world's two rewards, which pull apart.

- ``world-consistency``: does the image show what the prompt asks? The mean over colour, shape and position
  of the probability the shipped attribute classifier gives the prompt's attribute (like text-image
  consistency rewards on Stable Diffusion). In [0, 1]; about 0.99 on training data. A probability rather than
  a log-probability keeps it on the aesthetic reward's scale (so weights mean what they say) and keeps one
  hopeless attribute from dominating it.
- ``world-aesthetic``: does it look good? Colourfulness (Hasler & Süsstrunk 2003, a metric that tracks
  people's colourfulness ratings) plus a centred composition (the subject's centroid near the image centre).
  A person prefers the vivid, centred picture; the prompt often asks for a shape "on the left", so the two
  rewards conflict, as aesthetic and consistency rewards do on real models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from msdda.rewards.base import Reward, register_reward
from msdda.world.data import IMAGE_SIZE, parse_prompt

__all__ = ["WorldConsistency", "WorldAesthetic", "colourfulness", "centredness"]


@register_reward("world-consistency")
class WorldConsistency(Reward):
    """Mean probability, under the shipped attribute classifier, of each attribute the prompt asks for."""

    name = "world-consistency"
    version = "2"
    differentiable = True

    def __init__(self, classifier_folder: str | Path | None = None) -> None:
        super().__init__()
        from msdda.world import classifier_path
        from msdda.world.models import AttributeClassifier

        self.classifier = AttributeClassifier.load(classifier_folder or classifier_path())
        self.classifier.requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        targets = torch.tensor([parse_prompt(p).indices for p in prompts], device=images.device)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        logits = self.classifier(images.clamp(0, 1))
        return sum(
            torch.softmax(logit, dim=-1).gather(1, targets[:, i:i + 1]).squeeze(1) for i, logit in enumerate(logits)
        ) / len(logits)


SUBJECT_THRESHOLD = 0.15


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Süsstrunk's colourfulness M = sigma_rgyb + 0.3 mu_rgyb on 0-255 RGB, divided by 100."""
    red, green, blue = (images * 255).unbind(dim=1)
    rg, yb = red - green, 0.5 * (red + green) - blue
    spread = (rg.flatten(1).var(dim=1, unbiased=False) + yb.flatten(1).var(dim=1, unbiased=False)).sqrt()
    offset = (rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2).sqrt()
    return (spread + 0.3 * offset) / 100


def centredness(images: torch.Tensor) -> torch.Tensor:
    """1 - (distance of the subject's centroid from the centre) / (centre-to-corner distance).

    The subject is what differs clearly (by more than SUBJECT_THRESHOLD in RGB distance, above background
    gradients and noise) from the background, taken as the median colour of the border pixels. An image with
    no subject scores 0.
    """
    batch, _, height, width = images.shape
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    saliency = ((images - background).norm(dim=1) - SUBJECT_THRESHOLD).clamp(min=0)  # [B, H, W]
    total = saliency.flatten(1).sum(dim=1)
    weights = saliency / total.clamp(min=1e-6)[:, None, None]
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5)[None, :, None]
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5)[None, None, :]
    centre_y, centre_x = (weights * ys).flatten(1).sum(1), (weights * xs).flatten(1).sum(1)
    distance = ((centre_y - height / 2) ** 2 + (centre_x - width / 2) ** 2).sqrt()
    score = 1 - distance / (0.5 * (height**2 + width**2) ** 0.5)
    return torch.where(total > 1e-6, score, torch.zeros_like(score))


@register_reward("world-aesthetic")
class WorldAesthetic(Reward):
    """Colourfulness plus centred composition; needs no weights and ignores the prompt."""

    name = "world-aesthetic"
    version = "1"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return colourfulness(images) + centredness(images)
