"""The embedded world's rewards.

- ``world-consistency``: does the image show what the prompt asks? The mean over colour, shape and position
  of the probability the shipped attribute classifier gives the prompt's attribute (like text-image
  consistency rewards on Stable Diffusion). In [0, 1]; about 0.99 on training data. A probability rather than
  a log-probability keeps it on the aesthetic reward's scale (so weights mean what they say) and keeps one
  hopeless attribute from dominating it.
- ``world-consistency-measured``: the same question answered by measuring the subject (the pixels that stand
  out from the background) instead of asking the classifier: the mean of its colour's nearness to the
  prompt's colour, the probability of the prompt's shape when the subject is matched against the three shape
  templates, and its centroid's nearness to the prompt's position. About 0.91 on training data. Its gradients
  agree from batch to batch where the classifier's do not (mean cosine +0.34 against about 0 between
  independent 64-trajectory gradients), but with the shipped base, which ignores position, training does not
  raise it either (docs/training.md).
- ``world-aesthetic``: does it look good? Colourfulness (Hasler & Süsstrunk 2003, a metric that tracks
  people's colourfulness ratings) plus a centred composition (the subject's centroid near the image centre).
  A person prefers the vivid, centred picture; the prompt often asks for a shape "on the left", so the
  aesthetic and consistency rewards conflict, as they do on real models.
- ``world-thirds``: is it composed by the rule of thirds? The subject's centroid near the nearest of the four
  points where the lines at a third of the width and height cross, a placement photographers are taught to
  prefer to the centre. It pulls against the aesthetic reward's centring by construction, and against
  consistency because the prompt's positions lie between the thirds points (docs/world.md measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from msdda.rewards.base import Reward, register_reward
from msdda.world.data import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, parse_prompt, shape_coverage

__all__ = ["WorldConsistency", "WorldConsistencyMeasured", "WorldAesthetic", "colourfulness", "centredness",
           "WorldThirds", "placement", "thirds", "colour_match", "shape_probabilities"]

SUBJECT_THRESHOLD = 0.15
"""RGB distance from the background above which a pixel belongs to the subject (above gradients and noise)."""
SUBJECT_SOLID = 0.2
"""RGB distance beyond the threshold at which a pixel counts as wholly subject in its mask."""
PLACEMENT_SCALE = 15.0
"""Pixels at which placement reaches 0: the distance between the left and right positions."""
THIRDS_SCALE = 10.0
"""Pixels from the nearest thirds point at which the thirds score reaches 0: a centred subject, 7.5 px away,
scores 0.25, one at a prompt's position (5.8 px away for left, right, top and bottom) 0.43."""
COLOUR_SCALE = 0.5
"""RGB distance (channels in [0, 1]) at which the colour match reaches 0; red to orange is 0.39."""
SHAPE_TEMPERATURE = 0.05
"""Of the softmax over template overlaps: the right template overlaps a drawn shape 0.12-0.28 more than the
wrong ones, which gives it a probability of about 0.94 on training data."""


def subject_saliency(images: torch.Tensor) -> torch.Tensor:
    """How far each pixel ``[B, H, W]`` stands out from the background beyond SUBJECT_THRESHOLD (0 if not).

    The background is the median colour of the border pixels. Saliency grows smoothly with the pixel, so
    everything measured from it moves smoothly with the image.
    """
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    return ((images - background).norm(dim=1) - SUBJECT_THRESHOLD).clamp(min=0)


def _weighted_mean(weights: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[B, C]`` of per-pixel ``values`` ``[B or 1, C, H, W]`` under ``weights`` ``[B, H, W]``, and
    whether the weights have any mass ``[B]``."""
    total = weights.flatten(1).sum(dim=1)
    normalised = weights / total.clamp(min=1e-6)[:, None, None]
    return (normalised[:, None] * values).flatten(2).sum(2), total > 1e-6


def _centroid(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' centroid ``[B, 2]`` as (x, y) in pixels, and whether they have any mass ``[B]``."""
    _, height, width = weights.shape
    ys = (torch.arange(height, device=weights.device, dtype=weights.dtype) + 0.5)[:, None].expand(height, width)
    xs = (torch.arange(width, device=weights.device, dtype=weights.dtype) + 0.5)[None, :].expand(height, width)
    return _weighted_mean(weights, torch.stack([xs, ys])[None])


def centredness(images: torch.Tensor) -> torch.Tensor:
    """1 - (distance of the subject's centroid from the centre) / (centre-to-corner distance); 0 without a
    subject."""
    height, width = images.shape[-2:]
    centroid, has_subject = _centroid(subject_saliency(images))
    centre = torch.tensor([width / 2, height / 2], device=images.device, dtype=images.dtype)
    score = 1 - ((centroid - centre) ** 2).sum(dim=1).sqrt() / (0.5 * (height**2 + width**2) ** 0.5)
    return torch.where(has_subject, score, torch.zeros_like(score))


def placement(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - (distance of the subject's centroid from its target (x, y) ``[B, 2]``) / PLACEMENT_SCALE, floored at
    0; 0 without a subject. For 32x32 images. A centred subject scores 0.5 for "on the left"."""
    centroid, has_subject = _centroid(subject_saliency(images))
    score = (1 - (centroid - targets).norm(dim=1) / PLACEMENT_SCALE).clamp(min=0)
    return torch.where(has_subject, score, torch.zeros_like(score))


def thirds(images: torch.Tensor) -> torch.Tensor:
    """1 - (distance of the subject's centroid from the nearest thirds point) / THIRDS_SCALE, floored at 0; 0
    without a subject. The thirds points are (W/3, H/3), (2W/3, H/3), (W/3, 2H/3) and (2W/3, 2H/3). For 32x32
    images."""
    height, width = images.shape[-2:]
    centroid, has_subject = _centroid(subject_saliency(images))
    points = torch.tensor([[width * i / 3, height * j / 3] for j in (1, 2) for i in (1, 2)],
                          device=images.device, dtype=images.dtype)
    nearest = (centroid[:, None] - points[None]).norm(dim=2).min(dim=1).values
    score = (1 - nearest / THIRDS_SCALE).clamp(min=0)
    return torch.where(has_subject, score, torch.zeros_like(score))


def colour_match(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - (distance of the subject's mean colour from its target RGB ``[B, 3]`` in [0, 1]) / COLOUR_SCALE,
    floored at 0; 0 without a subject. Pixels count by their saliency."""
    colour, has_subject = _weighted_mean(subject_saliency(images), images)
    score = (1 - (colour - targets).norm(dim=1) / COLOUR_SCALE).clamp(min=0)
    return torch.where(has_subject, score, torch.zeros_like(score))


@cache
def _template_geometry(shape: str) -> tuple[float, float]:
    """(area per squared radius, downward offset of the centroid from the drawing centre per radius)."""
    radius, centre = 6.0, IMAGE_SIZE / 2
    coverage = shape_coverage(shape, torch.tensor([[centre, centre]], dtype=torch.float64),
                              torch.tensor([radius], dtype=torch.float64))
    centroid, _ = _centroid(coverage)
    return float(coverage.sum()) / radius**2, (float(centroid[0, 1]) - centre) / radius


def shape_probabilities(images: torch.Tensor) -> torch.Tensor:
    """``[B, len(SHAPES)]``: a softmax over how well each shape's template overlaps the subject's mask (soft
    intersection over union). Each template is fitted to the subject: drawn with its area, centred on its
    centroid. The gradient holds the fit fixed and moves only the subject's pixels: the gradient of the best
    overlap over all placements would ignore the placement too (envelope theorem), and the fit approximates the
    best placement; differentiating the fit as well left the gradient of three independent 64-trajectory sets
    agreeing at +0.12 instead of +0.34 (docs/training.md). All 0 without a subject. For 32x32 images."""
    mask = (subject_saliency(images) / SUBJECT_SOLID).clamp(max=1)
    area = mask.flatten(1).sum(dim=1).detach().clamp(min=1.0)  # the fit is held fixed in the gradient
    centroid, has_subject = _centroid(mask.detach())
    overlaps = []
    for shape in SHAPES:
        area_per_radius2, centroid_offset = _template_geometry(shape)
        radii = (area / area_per_radius2).sqrt()
        centres = centroid - torch.stack([torch.zeros_like(radii), centroid_offset * radii], dim=1)
        template = shape_coverage(shape, centres, radii, mask.shape[-1]).to(mask.dtype)
        overlaps.append(torch.minimum(mask, template).flatten(1).sum(1)
                        / torch.maximum(mask, template).flatten(1).sum(1).clamp(min=1e-6))
    probabilities = torch.softmax(torch.stack(overlaps, dim=1) / SHAPE_TEMPERATURE, dim=1)
    return torch.where(has_subject[:, None], probabilities, torch.zeros_like(probabilities))


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
        logits = self.classifier(_world_size(images).clamp(0, 1))
        return sum(
            torch.softmax(logit, dim=-1).gather(1, targets[:, i:i + 1]).squeeze(1) for i, logit in enumerate(logits)
        ) / len(logits)


@register_reward("world-consistency-measured")
class WorldConsistencyMeasured(Reward):
    """Mean of the subject's colour match, the probability of the prompt's shape and the subject's placement."""

    name = "world-consistency-measured"
    version = "1"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        attributes = [parse_prompt(p) for p in prompts]
        images = _world_size(images).clamp(0, 1)
        like = {"device": images.device, "dtype": images.dtype}
        colours = torch.tensor([COLOURS[a.colour] for a in attributes], **like) / 255
        shapes = torch.tensor([SHAPES.index(a.shape) for a in attributes], device=images.device)
        positions = torch.tensor([POSITIONS[a.position][1] for a in attributes], **like)
        shape = shape_probabilities(images).gather(1, shapes[:, None]).squeeze(1)
        return (colour_match(images, colours) + shape + placement(images, positions)) / 3


def _world_size(images: torch.Tensor) -> torch.Tensor:
    """The images at the world's 32x32, which the classifier and the measured scores' pixel scales assume."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Süsstrunk's colourfulness M = sigma_rgyb + 0.3 mu_rgyb on 0-255 RGB, divided by 100."""
    red, green, blue = (images * 255).unbind(dim=1)
    rg, yb = red - green, 0.5 * (red + green) - blue
    spread = (rg.flatten(1).var(dim=1, unbiased=False) + yb.flatten(1).var(dim=1, unbiased=False)).sqrt()
    offset = (rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2).sqrt()
    return (spread + 0.3 * offset) / 100


@register_reward("world-aesthetic")
class WorldAesthetic(Reward):
    """Colourfulness plus centred composition; needs no weights and ignores the prompt."""

    name = "world-aesthetic"
    version = "1"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return colourfulness(images) + centredness(images)


@register_reward("world-thirds")
class WorldThirds(Reward):
    """The subject's nearness to the nearest rule-of-thirds point; needs no weights and ignores the prompt."""

    name = "world-thirds"
    version = "1"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return thirds(_world_size(images).clamp(0, 1))
