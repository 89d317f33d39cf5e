"""``msdda report``: from a sweep folder, the Pareto plot, the reward-against-KL plot, hypervolumes, weighted and
regularised objectives, path KLs (to the base, to retrained oracles), costs and grids, written as report.md,
report.html and metrics.json beside the sweep's tables."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from msdda.errors import UserError
from msdda.report.metrics import (
    bootstrap_standard_error,
    hypervolume,
    standard_error,
    weighted_objective,
)
from msdda.fuse.methods import get_method, method_names
from msdda.sweep.grid import weight_key
from msdda.sweep.run import COSTS, KL_TO_BASE, KL_TO_ORACLE, load_manifest, weight_column

__all__ = ["Curve", "load_curves", "build_report"]

ORACLE = "oracle"
"""The sweep's cells of adapters retrained on the weighted reward: not a fusion method, one adapter per weight."""
NO_KERNEL = "no Gaussian kernel"
"""What the tables say instead of a KL for a method whose step is not one Gaussian kernel (CoDe)."""
OBJECTIVES_NOTE = (
    "The regularised objective is the trajectory-level one: sum_i w_i r_i of the terminal sample minus beta times "
    "the path KL to the base, sum over steps of KL(method kernel || base kernel) at the method's own states. MSDDA "
    "is exact for the step-level objective (per step, the step reward minus beta times that step's KL), which this "
    "report does not compute; the two rank methods alike only as far as the step rewards track the terminal one.")


@dataclass
class Curve:
    """One method's cells: weight vectors and per-sample rewards, rows paired across curves by (prompt, seed)."""

    label: str
    method: str
    weights: list[tuple[float, ...]]
    rewards: list[np.ndarray]  # one [N, K] array per weight vector
    costs: dict[str, float]
    kl: list[np.ndarray] = field(default_factory=list)
    """Per weight vector, each sample's path KL to the base ([N]; NaN without a Gaussian kernel)."""
    kl_to_oracle: list[np.ndarray] = field(default_factory=list)
    """Per weight vector, each sample's path KL to the oracle retrained there ([N]; NaN where there is none)."""

    def means(self, rows: np.ndarray | None = None) -> np.ndarray:
        return np.stack([(r if rows is None else r[rows]).mean(axis=0) for r in self.rewards])

    def errors(self) -> np.ndarray:
        return np.stack([[standard_error(r[:, k]) for k in range(r.shape[1])] for r in self.rewards])

    images: list[str | None] = field(default_factory=list)
    """Per weight vector, the cell's image strip (relative to the sweep folder), when it has one."""

    @property
    def sweeps_weights(self) -> bool:
        return self.method == ORACLE or get_method(self.method).sweeps_weights

    @property
    def gaussian(self) -> bool:
        """Its steps are Gaussian kernels, so its path KLs are numbers."""
        return self.method == ORACLE or get_method(self.method).gaussian


def load_curves(folder: Path) -> tuple[list[Curve], list[str], dict]:
    """The sweep's curves (``single`` split per reward), its reward names and its config, from its manifest."""
    import pandas as pd

    manifest = load_manifest(folder)
    config = yaml.safe_load((folder / manifest["config"]).read_text())
    names = manifest["rewards"]
    table = pd.read_csv(folder / manifest["results"])
    if KL_TO_BASE not in table or "beta" not in manifest:
        raise UserError(f"{folder} was swept before KL accounting (no {KL_TO_BASE} column): run msdda sweep with "
                        f"output_dir={folder} again; it samples only those cells again and rewrites the tables")
    images = {(cell["method"], tuple(cell["weights"])): cell["images"] for cell in manifest["cells"]}
    weight_columns = [weight_column(n) for n in names]
    table = table.sort_values(["prompt", "seed"], kind="stable")
    curves: dict[str, Curve] = {}
    for (method, *weights), cell in table.groupby(["method", *weight_columns], sort=False):
        weights = tuple(float(w) for w in weights)
        label = f"single: {names[int(np.argmax(weights))]}" if method == "single" else method
        curve = curves.setdefault(label, Curve(label, method, [], [], {}))
        curve.weights.append(weights)
        curve.rewards.append(cell[names].to_numpy(dtype=np.float64))
        curve.kl.append(cell[KL_TO_BASE].to_numpy(dtype=np.float64))
        curve.kl_to_oracle.append(cell[KL_TO_ORACLE].to_numpy(dtype=np.float64))
        curve.images.append(images.get((method, weights)))
        for key in COSTS:
            curve.costs[key] = curve.costs.get(key, 0.0) + float(cell[key].iloc[0])
    for curve in curves.values():
        order = np.argsort([w[0] for w in curve.weights], kind="stable")
        for name in ("weights", "rewards", "kl", "kl_to_oracle", "images"):
            setattr(curve, name, [getattr(curve, name)[i] for i in order])
        curve.costs = {k: v / len(curve.weights) for k, v in curve.costs.items()}
    sizes = {len(r) for c in curves.values() for r in c.rewards}
    if len(sizes) != 1:
        raise UserError(f"{folder}: cells hold different numbers of samples {sorted(sizes)}; re-run the sweep")
    return list(curves.values()), names, {**config, "beta": manifest["beta"]}


def _objective_weights(count: int, firsts: list[float]) -> list[tuple[float, ...]]:
    if count == 2:
        return [(w, 1.0 - w) for w in firsts]
    return [tuple(1.0 / count for _ in range(count))]


def _cell_at(curve: Curve, weights: tuple[float, ...]) -> int | None:
    """The index of the curve's cell whose samples stand for ``weights`` (its only one when it does not sweep)."""
    if not curve.sweeps_weights:
        return 0
    return next((i for i, cell_weights in enumerate(curve.weights) if np.allclose(cell_weights, weights)), None)


def _mean_sem(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "sem": standard_error(values)}


def compute_metrics(curves: list[Curve], names: list[str], reference: list[float] | None,
                    objective_firsts: list[float], resamples: int, beta: float) -> dict:
    all_means = np.concatenate([c.means() for c in curves])
    reference_point = np.asarray(reference if reference is not None else all_means.min(axis=0), dtype=np.float64)
    count = len(curves[0].rewards[0])
    metrics: dict = {"rewards": names, "reference_point": reference_point.tolist(), "samples_per_cell": count,
                     "reference_point_rule": "given" if reference is not None else
                     "the lowest mean of each reward over all cells", "beta": beta, "methods": {}}
    targets = _objective_weights(len(names), objective_firsts)
    for curve in curves:
        volume = hypervolume(curve.means(), reference_point)
        error = bootstrap_standard_error(lambda rows, c=curve: hypervolume(c.means(rows), reference_point), count,
                                         resamples)
        objectives, regularised = {}, {}
        for weights in targets:
            index = _cell_at(curve, weights)
            if index is not None:
                values = weighted_objective(curve.rewards[index], weights)
                objectives[weight_key(weights)] = _mean_sem(values)
                if curve.gaussian:  # paired: each sample's reward less its own KL
                    regularised[weight_key(weights)] = _mean_sem(values - beta * curve.kl[index])
        points = []
        for w, m, e, kl, to_oracle in zip(curve.weights, curve.means(), curve.errors(), curve.kl, curve.kl_to_oracle):
            point = {"weights": list(w), "mean": m.tolist(), "sem": e.tolist(),
                     "kl_to_base": _mean_sem(kl) if curve.gaussian else None}
            if curve.gaussian and np.isfinite(to_oracle).all():
                point["kl_to_oracle"] = _mean_sem(to_oracle)
            points.append(point)
        metrics["methods"][curve.label] = {
            "hypervolume": volume, "hypervolume_sem": error, "gaussian": curve.gaussian,
            "weighted_objective": objectives, "regularised_objective": regularised, "points": points,
            "costs": curve.costs,
        }
    return metrics


def pareto_plot(curves: list[Curve], names: list[str], path: Path, title: str) -> list[list[tuple[float, float]]]:
    """Mean rewards per weight with standard-error bars; one curve per weight-sweeping method (first two
    rewards when there are more). MSDDA's and the oracles' points carry the first reward's weight.

    Returns, per curve and cell, the point's (x, y) in the saved PNG's pixels (y down from the top), so that a
    click on the image can be mapped back to its cell (msdda studio does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5.5))
    markers = iter("osD^v<>ph*")
    for curve in curves:
        means, errors = curve.means(), curve.errors()
        style = "-" if curve.sweeps_weights and curve.method != ORACLE and len(means) > 1 else "none"
        # MSDDA on top as open circles: with equal variances and betas it coincides with output averaging
        emphasis = dict(markersize=10, markerfacecolor="none", linewidth=2.2, zorder=5) \
            if curve.method == "msdda" else dict(markersize=5, linewidth=1.2)
        drawn = axes.errorbar(means[:, 0], means[:, 1], xerr=errors[:, 0], yerr=errors[:, 1], linestyle=style,
                              marker=next(markers, "o"), capsize=2, label=curve.label, **emphasis)
        if curve.method in ("msdda", ORACLE):  # the pairs the method is judged by, labelled with w_1
            for weights, (x, y) in zip(curve.weights, means[:, :2]):
                axes.annotate(f"{weights[0]:g}", (x, y), xytext=(5, 5), textcoords="offset points", fontsize=7,
                              color=drawn[0].get_color(), bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none",
                                                                    alpha=0.75), zorder=6)
    axes.set_xlabel(f"{names[0]} (mean, higher is better)")
    axes.set_ylabel(f"{names[1]} (mean, higher is better)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    dpi = 150
    scale, height = dpi / figure.dpi, figure.get_figheight() * dpi
    pixels = [[(float(x) * scale, height - float(y) * scale) for x, y in axes.transData.transform(curve.means()[:, :2])]
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


def _cell_text(value: dict[str, float] | None) -> str:
    return "" if value is None else f"{value['mean']:.4g} ± {value['sem']:.2g}"


def _by_weights(methods: dict, field: str, keys: list[str]) -> list[list[str]]:
    """Per method, ``field`` (mean ± s.e. keyed by target weights) in columns ``keys``; where the field needs a KL
    and the method has none (CoDe), the row says so."""
    return [[label] + ([NO_KERNEL] * len(keys) if field == "regularised_objective" and not m["gaussian"] else
                       [_cell_text(m[field].get(k)) for k in keys]) for label, m in methods.items()]


def _points_table(methods: dict, field: str) -> tuple[list[str], list[list[str]]]:
    """Per method, a per-cell KL (``kl_to_base``, ``kl_to_oracle``) in columns keyed by the cells' weights: the
    weights where some method has it, and the methods that have it somewhere (or have no Gaussian kernel)."""
    keys = sorted({weight_key(p["weights"]) for m in methods.values() for p in m["points"] if p.get(field)},
                  key=lambda k: [float(v) for v in k.split(",")])
    rows = []
    for label, m in methods.items():
        values = {weight_key(p["weights"]): p.get(field) for p in m["points"]}
        if not m["gaussian"]:
            rows.append([label] + [NO_KERNEL] * len(keys))
        elif any(values.get(k) for k in keys):
            rows.append([label] + [_cell_text(values.get(k)) for k in keys])
    return keys, rows


def _tables(metrics: dict, names: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    methods = metrics["methods"]
    volume_rows = [[label, f"{m['hypervolume']:.4g} ± {m['hypervolume_sem']:.2g}"] for label, m in methods.items()]
    keys = sorted({k for m in methods.values() for k in m["weighted_objective"]})
    cost_rows = [[label, f"{m['costs']['seconds_per_image']:.3f}", f"{m['costs']['unet_rows_per_image']:.0f}",
                  f"{m['costs']['reward_images_per_image']:.0f}", f"{m['costs']['kl_seconds_per_image']:.3f}",
                  f"{m['costs']['kl_unet_rows_per_image']:.0f}"]
                 for label, m in methods.items()]
    kl_keys, kl_rows = _points_table(methods, "kl_to_base")
    oracle_keys, oracle_rows = _points_table(methods, "kl_to_oracle")
    tables = [
        ("Hypervolume (± bootstrap standard error)", ["method", "hypervolume"], volume_rows),
        (f"Weighted objective sum_i w_i r_i (terminal rewards; w over {names}; mean ± standard error)",
         ["method", *keys], _by_weights(methods, "weighted_objective", keys)),
        (f"Regularised objective sum_i w_i r_i - beta * path KL to the base (trajectory level, beta = "
         f"{metrics['beta']:g}; mean ± paired standard error)", ["method", *keys],
         _by_weights(methods, "regularised_objective", keys)),
        ("Path KL to the base, sum over steps of KL(method || base) at the method's own states, per cell "
         "(mean ± standard error)", ["method", *kl_keys], kl_rows),
    ]
    if oracle_keys:
        tables.append(("Path KL to the oracle retrained at w, sum over steps of KL(method || oracle) at the method's "
                       "own states (mean ± standard error)", ["method", *oracle_keys], oracle_rows))
    tables.append(("Cost per image (mean over the method's cells; KL measurement apart)",
                   ["method", "seconds", "UNet rows", "reward calls (images)", "KL seconds",
                    "KL UNet rows"], cost_rows))
    return tables


def _markdown(title: str, intro: list[str], tables, plots: dict[str, str], grids: dict[str, str],
              grid_caption: str) -> str:
    lines = [f"# {title}", "", *intro, ""]
    for alt, plot in plots.items():
        lines += [f"![{alt}]({plot})", ""]
    for caption, header, rows in tables:
        lines += [f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["## Images per method", "", grid_caption, ""]
    for label, path in grids.items():
        lines += [f"### {label}", "", f"![{label}]({path})", ""]
    return "\n".join(lines)


def _html(title: str, intro: list[str], tables, plots: dict[str, str], grids: dict[str, str],
          grid_caption: str) -> str:
    escape = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 8px;"
             "border-bottom:1px solid #ddd}img{max-width:100%}</style>", f"<h1>{escape(title)}</h1>"]
    parts += [f"<p>{escape(line)}</p>" for line in intro]
    parts += [f"<img src='{escape(plot)}' alt='{escape(alt)}'>" for alt, plot in plots.items()]
    for caption, header, rows in tables:
        parts.append(f"<h2>{escape(caption)}</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(f"<h2>Images per method</h2><p>{escape(grid_caption)}</p>")
    for label, path in grids.items():
        parts.append(f"<h3>{escape(label)}</h3><img src='{escape(path)}' alt='{escape(label)}'>")
    return "\n".join(parts)


def _grid_prompts(folder: Path, config: dict) -> list[str]:
    """The prompts the cells' image strips show, in order (the sweep's first prompts at its first seed)."""
    import pandas as pd

    table = pd.read_csv(folder / load_manifest(folder)["results"], usecols=["method", "prompt", "seed"])
    first = table[(table.method == table.method.iloc[0]) & (table.seed == table.seed.iloc[0])]
    return list(first.prompt.iloc[: int(config.get("grid_prompts", 4))])


def _coincidences(curves: list[Curve]) -> list[str]:
    """The registry's notes for methods whose samples coincided with another's in this sweep."""
    by_method = {c.method: c for c in curves}
    notes = []
    for name in method_names():
        other = get_method(name).coincides_with
        if name in by_method and other in by_method:
            mine, theirs = by_method[name], by_method[other]
            if mine.weights == theirs.weights and np.allclose(mine.means(), theirs.means()):
                notes.append(get_method(name).coincidence)
    return notes


def build_report(folder: str | Path, reference_point: list[float] | None = None,
                 objective_weights: list[float] = (0.25, 0.5, 0.75), resamples: int = 200) -> Path:
    """Write pareto.png, kl.png, grids/, metrics.json, report.md and report.html into the sweep ``folder``."""
    folder = Path(folder)
    curves, names, config = load_curves(folder)
    if reference_point is not None and len(reference_point) != len(names):
        raise UserError(f"reference point {reference_point} needs one value per reward {names}")
    metrics = compute_metrics(curves, names, reference_point, list(objective_weights), resamples, config["beta"])
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"MSDDA sweep: {' vs '.join(names)}"
    pareto_plot(curves, names, folder / "pareto.png", title)
    kl_plot(curves, names, folder / "kl.png",
            "Reward against path KL to the base (methods with no Gaussian kernel left out)")
    grids = {label: str(path.relative_to(folder)) for label, path in method_grids(folder, curves).items()}
    notes = [" " + note for note in _coincidences(curves)]
    intro = [f"{metrics['samples_per_cell']} samples per cell ({config.get('num_prompts') or 'all'} prompts × seeds "
             f"{config.get('seeds')}), base {config.get('base')}, adapters {config.get('adapters')}.",
             f"Hypervolume reference point: {[round(v, 4) for v in metrics['reference_point']]} "
             f"({metrics['reference_point_rule']})." + "".join(notes), OBJECTIVES_NOTE]
    tables = _tables(metrics, names)
    shown = _grid_prompts(folder, config)
    grid_caption = (f"Rows: weights w = ({', '.join(names)}). Columns: the first seed of {shown}.")
    plots = {"Pareto plot": "pareto.png", "Reward against path KL to the base": "kl.png"}
    (folder / "report.md").write_text(_markdown(title, intro, tables, plots, grids, grid_caption))
    (folder / "report.html").write_text(_html(title, intro, tables, plots, grids, grid_caption))
    return folder / "report.md"
