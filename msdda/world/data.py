"""Procedural data of the embedded world: coloured shapes at positions on muted backgrounds, with prompts.

The grammar is "a {colour} {shape} {position}", e.g. "a red circle on the left". Images are 32x32 RGB,
deterministic from a seed. A few attribute combinations are held out of training so that generalisation to
unseen combinations can be measured.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from msdda.errors import UserError

__all__ = [
    "COLOURS",
    "SHAPES",
    "POSITIONS",
    "IMAGE_SIZE",
    "HELD_OUT",
    "Attributes",
    "parse_prompt",
    "prompt_for",
    "all_combinations",
    "training_combinations",
    "render_images",
    "shape_coverage",
    "sample_attributes",
    "procedural_dataset",
    "PromptError",
]

IMAGE_SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 50, 195),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    # name: (phrase, (x, y) centre in pixels)
    "left": ("on the left", (8.5, 16.0)),
    "right": ("on the right", (23.5, 16.0)),
    "top": ("at the top", (16.0, 8.5)),
    "bottom": ("at the bottom", (16.0, 23.5)),
    "center": ("in the center", (16.0, 16.0)),
}
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "right"),
    ("green", "circle", "top"),
    ("blue", "square", "bottom"),
    ("yellow", "triangle", "left"),
    ("purple", "circle", "center"),
    ("orange", "square", "top"),
)


class PromptError(UserError):
    """A prompt outside the embedded world's grammar."""


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    position: str

    @property
    def indices(self) -> tuple[int, int, int]:
        return list(COLOURS).index(self.colour), SHAPES.index(self.shape), list(POSITIONS).index(self.position)


def prompt_for(attributes: Attributes) -> str:
    return f"a {attributes.colour} {attributes.shape} {POSITIONS[attributes.position][0]}"


_PROMPT_PATTERN = re.compile(
    r"^\s*(?:an?\s+)?(?P<colour>\w+)\s+(?P<shape>\w+)\s+(?P<position>on the left|on the right|at the top|"
    r"at the bottom|in the center|in the centre)\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a prompt of the world asks for; raises PromptError naming the grammar otherwise."""
    match = _PROMPT_PATTERN.match(prompt or "")
    grammar = (
        f"the embedded world understands 'a <colour> <shape> <position>' with colour in {list(COLOURS)}, "
        f"shape in {list(SHAPES)} and position in {[phrase for phrase, _ in POSITIONS.values()]}"
    )
    if not match:
        raise PromptError(f"prompt {prompt!r} is not in the world's grammar: {grammar}")
    colour, shape = match["colour"].lower(), match["shape"].lower()
    position_phrase = match["position"].lower().replace("centre", "center")
    if colour not in COLOURS or shape not in SHAPES:
        raise PromptError(f"prompt {prompt!r} names an unknown colour or shape: {grammar}")
    position = next(name for name, (phrase, _) in POSITIONS.items() if phrase == position_phrase)
    return Attributes(colour, shape, position)


def all_combinations() -> list[Attributes]:
    return [Attributes(*combo) for combo in itertools.product(COLOURS, SHAPES, POSITIONS)]


def training_combinations() -> list[Attributes]:
    held_out = {Attributes(*combo) for combo in HELD_OUT}
    return [combo for combo in all_combinations() if combo not in held_out]


def _background(rng: np.random.Generator) -> np.ndarray:
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9)
    base = np.array(colorsys.hsv_to_rgb(hue, saturation, value))
    ramp = np.linspace(-1, 1, IMAGE_SIZE)[:, None, None] * rng.uniform(-0.08, 0.08)
    return np.clip(base[None, None, :] + ramp, 0, 1)


def shape_coverage(shape: str, centres: torch.Tensor, radii: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Anti-aliased coverage ``[B, size, size]`` of the shape at each (x, y) centre ``[B, 2]`` (pixels) and radius
    ``[B]``: clip(0.5 - signed distance, 0, 1). The renderer draws with it and the consistency reward matches
    templates with it, so both see the same geometry."""
    grid = torch.arange(size, dtype=centres.dtype, device=centres.device) + 0.5
    dx = grid[None, None, :] - centres[:, 0, None, None]
    dy = grid[None, :, None] - centres[:, 1, None, None]
    radius = radii[:, None, None]
    if shape == "circle":
        distance = torch.hypot(dx, dy) - radius
    elif shape == "square":
        distance = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    elif shape == "triangle":  # upward: the largest distance to its three edges
        half = radius * 1.1
        distance = torch.maximum(torch.maximum(dy - 0.6 * half, (-math.sqrt(3) * dx - dy - half * 0.9) / 2),
                                 (math.sqrt(3) * dx - dy - half * 0.9) / 2)
    else:
        raise UserError(f"unknown shape {shape!r}; the world's shapes are {SHAPES}")
    return (0.5 - distance).clamp(0, 1)


def render_images(attributes: list[Attributes], seed: int) -> np.ndarray:
    """Images ``[N, 32, 32, 3]`` uint8 showing each attribute triple, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(attributes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, attribute in enumerate(attributes):
        background = _background(rng)
        x, y = POSITIONS[attribute.position][1]
        centre = (x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5))
        alpha = shape_coverage(attribute.shape, torch.tensor([centre], dtype=torch.float64),
                               torch.tensor([rng.uniform(5.0, 7.0)], dtype=torch.float64))[0, ..., None].numpy()
        colour = np.clip(np.array(COLOURS[attribute.colour]) + rng.uniform(-15, 15, 3), 0, 255) / 255
        image = background * (1 - alpha) + colour * alpha + rng.normal(0, 0.01, background.shape)
        images[index] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return images


def sample_attributes(count: int, seed: int, split: str = "train") -> list[Attributes]:
    """``count`` attribute triples drawn uniformly from the split's combinations ("train", "held_out", "all")."""
    pools = {
        "train": training_combinations(),
        "held_out": [Attributes(*combo) for combo in HELD_OUT],
        "all": all_combinations(),
    }
    if split not in pools:
        raise UserError(f"split must be one of {list(pools)}, got {split!r}")
    rng = np.random.default_rng(seed)
    pool = pools[split]
    return [pool[i] for i in rng.integers(0, len(pool), count)]


def procedural_dataset(count: int, seed: int = 0, split: str = "train"):
    """A ``datasets.Dataset`` of ``count`` images with columns image, prompt, colour, shape, position."""
    import datasets
    from PIL import Image

    attributes = sample_attributes(count, seed, split)
    images = render_images(attributes, seed + 1)
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(image) for image in images],
            "prompt": [prompt_for(a) for a in attributes],
            "colour": [a.colour for a in attributes],
            "shape": [a.shape for a in attributes],
            "position": [a.position for a in attributes],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "prompt": datasets.Value("string"),
                "colour": datasets.ClassLabel(names=list(COLOURS)),
                "shape": datasets.ClassLabel(names=list(SHAPES)),
                "position": datasets.ClassLabel(names=list(POSITIONS)),
            }
        ),
    )
