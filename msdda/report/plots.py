"""A sweep's figures: the Pareto plot, reward against path KL, and one image grid per method."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from msdda.report.load import ORACLE, Curve
from msdda.report.metrics import standard_error
from msdda.sweep.grid import weight_key

__all__ = ["point_label", "pareto_plot", "kl_plot", "method_grids"]


def point_label(weights: tuple[float, ...]) -> str:
    """The text beside a Pareto plot's point: its first weight for two rewards on the simplex (the second is one
    minus it), else the whole weight vector, so that (1, 1) and (1, 0) are told apart."""
    if len(weights) == 2 and math.isclose(sum(weights), 1.0, abs_tol=1e-9):
        return f"{weights[0]:g}"
    return ",".join(f"{w:.2g}" for w in weights)


def pareto_plot(curves: list[Curve], names: list[str], path: Path, title: str) -> list[list[tuple[float, float]]]:
    """Mean rewards per weight with standard-error bars; one curve per weight-sweeping method, one panel per pair
    of rewards (the first three pairs). MSDDA's and the oracles' points carry their weights (K = 2: the first).

    Returns, per curve and cell, the point's (x, y) in the first panel (the first two rewards) in the saved PNG's
    pixels (y down from the top), so that a click on the image can be mapped back to its cell (msdda studio does)."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(range(len(names)), 2))[:3]
    figure, panels = plt.subplots(1, len(pairs), figsize=(7 * len(pairs), 5.5), squeeze=False)
    for axes, (x_index, y_index) in zip(panels[0], pairs):
        markers = iter("osD^v<>ph*")
        for curve in curves:
            means, errors = curve.means(), curve.errors()
            style = "-" if curve.sweeps_weights and curve.method != ORACLE and len(means) > 1 and len(names) == 2 \
                else "none"  # with K > 2 the cells are a grid on the simplex, not a path
            # MSDDA on top as open circles: with equal variances and betas it coincides with output averaging
            emphasis = dict(markersize=10, markerfacecolor="none", linewidth=2.2, zorder=5) \
                if curve.method == "msdda" else dict(markersize=5, linewidth=1.2)
            drawn = axes.errorbar(means[:, x_index], means[:, y_index], xerr=errors[:, x_index],
                                  yerr=errors[:, y_index], linestyle=style, marker=next(markers, "o"), capsize=2,
                                  label=curve.label, **emphasis)
            if curve.method in ("msdda", ORACLE):  # the points the method is judged by, labelled with w
                for weights, x, y in zip(curve.weights, means[:, x_index], means[:, y_index]):
                    text = point_label(weights)
                    axes.annotate(text, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=7,
                                  color=drawn[0].get_color(), bbox=dict(boxstyle="round,pad=0.1", fc="white",
                                                                        ec="none", alpha=0.75), zorder=6)
        axes.set_xlabel(f"{names[x_index]} (mean, higher is better)")
        axes.set_ylabel(f"{names[y_index]} (mean, higher is better)")
        axes.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8, loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    dpi = 150
    scale, height = dpi / figure.dpi, figure.get_figheight() * dpi
    first = panels[0][0]
    pixels = [[(float(x) * scale, height - float(y) * scale) for x, y in first.transData.transform(curve.means()[:, :2])]
              for curve in curves]
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return pixels


def kl_plot(curves: list[Curve], names: list[str], path: Path, title: str) -> None:
    """Reward against path KL to the base, one panel per reward: each Gaussian-kernel method's cells as a curve
    (x: mean KL, y: mean reward, standard-error bars on both). Each reward, not the weighted objective, because
    along a curve the weights change and with them the objective, so one panel per reward is the reward-at-KL
    comparison RLHF makes. Methods without a Gaussian kernel (CoDe) have no KL and are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for column, (axes, name) in enumerate(zip(panels[0], names)):
        markers = iter("osD^v<>ph*")
        for curve in (c for c in curves if c.gaussian):
            kl = np.array([values.mean() for values in curve.kl])
            kl_errors = np.array([standard_error(values) for values in curve.kl])
            style = "-" if curve.sweeps_weights and curve.method != ORACLE and len(kl) > 1 else "none"
            axes.errorbar(kl, curve.means()[:, column], xerr=kl_errors, yerr=curve.errors()[:, column],
                          linestyle=style, marker=next(markers, "o"), capsize=2, label=curve.label,
                          markersize=8 if curve.method == "msdda" else 5)
        axes.set_xlabel("path KL to the base (mean over samples)")
        axes.set_ylabel(f"{name} (mean, higher is better)")
        axes.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8, loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def method_grids(folder: Path, curves: list[Curve]) -> dict[str, Path]:
    """One image per weight-sweeping method: a row per weight (its cell's first prompts, first seed)."""
    from PIL import Image, ImageDraw

    out = folder / "grids"
    out.mkdir(exist_ok=True)
    grids = {}
    for curve in curves:
        if not curve.sweeps_weights or curve.method == ORACLE or None in curve.images:
            continue
        strips = [Image.open(folder / image).convert("RGB") for image in curve.images]
        label_width = 110
        canvas = Image.new("RGB", (label_width + strips[0].width, sum(s.height for s in strips)), "white")
        draw, top = ImageDraw.Draw(canvas), 0
        for weights, strip in zip(curve.weights, strips):
            canvas.paste(strip, (label_width, top))
            draw.text((6, top + strip.height // 2 - 6), "w = " + weight_key(weights), fill="black")
            top += strip.height
        grids[curve.label] = out / f"{curve.method}.png"
        canvas.save(grids[curve.label])
    return grids
