"""A finished ``msdda sweep`` folder as the studio shows it: the report's Pareto plot and each cell's image strip.

The plot is the report's own PNG (:func:`msdda.report.plots.pareto_plot`), which also says where each point was
drawn, in the PNG's pixels; a click on the image (Gradio gives its pixel coordinates) then picks the nearest cell.
That keeps one plotting code for report and studio and a click that names a cell exactly, which an interactive
Gradio plot does not: its select events give ranges of data, not the point clicked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from msdda.errors import UserError
from msdda.studio.core import format_kl
from msdda.sweep.grid import weight_key

__all__ = ["SweepCell", "SweepView", "CLICK_RADIUS"]

CLICK_RADIUS = 30.0
"""How far (PNG pixels) a click may land from a point and still pick it: about the size of a marker and a half."""


@dataclass(frozen=True)
class SweepCell:
    """One point of the plot: a method at one weight vector, its mean rewards and mean path KL to the base."""

    label: str
    method: str
    weights: tuple[float, ...]
    means: tuple[float, ...]
    kl_to_base: float
    """NaN for a method without a Gaussian kernel (CoDe)."""
    strip: Path | None
    """The cell's sample strip (its first prompts at the first seed), when the sweep wrote one."""
    pixel: tuple[float, float]

    @property
    def name(self) -> str:
        """What the cell picker lists: method and weights, unique within a sweep."""
        return f"{self.label} at w = {weight_key(self.weights)}"


class SweepView:
    """A sweep folder's cells and its Pareto plot, drawn once into ``plot`` (a PNG beside nothing of the sweep's)."""

    def __init__(self, folder: str | Path, plot: str | Path) -> None:
        from msdda.report.load import load_curves
        from msdda.report.plots import pareto_plot

        self.folder = Path(folder)
        curves, self.reward_names, _ = load_curves(self.folder)
        if len(self.reward_names) < 2:
            raise UserError(f"sweep {self.folder} scores {len(self.reward_names)} reward; a Pareto plot needs two")
        self.plot = Path(plot)
        pixels = pareto_plot(curves, self.reward_names, self.plot, f"{self.folder.name}: mean rewards per cell")
        self.cells = [
            SweepCell(curve.label, curve.method, weights, tuple(float(m) for m in means), float(kl.mean()),
                      self.folder / strip if strip else None, pixel)
            for curve, curve_pixels in zip(curves, pixels)
            for weights, means, kl, strip, pixel in zip(curve.weights, curve.means(), curve.kl, curve.images,
                                                         curve_pixels)
        ]

    def cell(self, name: str) -> SweepCell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise UserError(f"the sweep has no cell {name!r}")

    def nearest(self, x: float, y: float) -> SweepCell | None:
        """The cell whose point is nearest a click at (x, y) in PNG pixels, if one is within CLICK_RADIUS."""
        distance, cell = min(((math.dist((x, y), cell.pixel), cell) for cell in self.cells), key=lambda pair: pair[0])
        return cell if distance <= CLICK_RADIUS else None

    def describe(self, cell: SweepCell) -> str:
        """The cell's numbers as one Markdown line under its strip."""
        rewards = ", ".join(f"{name} {mean:.3f}" for name, mean in zip(self.reward_names, cell.means))
        missing = "" if cell.strip is not None else " (the sweep wrote no sample strip for it)"
        return f"**{cell.name}**: mean {rewards}; mean path KL to the base {format_kl(cell.kl_to_base)}{missing}"
