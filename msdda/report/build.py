"""``msdda report``: from a sweep folder, the Pareto plot, the reward-against-KL plot, hypervolumes, weighted and
regularised objectives, path KLs (to the base, to retrained oracles), costs and grids, written as report.md,
report.html and metrics.json beside the sweep's tables."""

from __future__ import annotations

import html
import json
import math
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
from msdda.sweep.run import COSTS, KL_TO_BASE, KL_TO_ORACLE, load_manifest, step_column, weight_column

__all__ = ["Curve", "load_curves", "build_report", "point_label"]

ORACLE = "oracle"
"""The sweep's cells of adapters retrained on the weighted reward: not a fusion method, one adapter per weight."""
NO_KERNEL = "no Gaussian kernel"
"""What the tables say instead of a KL for a method whose step is not one Gaussian kernel (CoDe)."""
TRAJECTORY_NOTE = (
    "The regularised objective is the trajectory-level one, what a user sees: sum_i w_i r_i of the terminal sample "
    "minus beta times the path KL to the base, sum over steps of KL(method kernel || base kernel) at the method's own "
    "states.")
STEP_NOTE = (
    "The step-level objective is the one MSDDA's kernel is exact for and each adapter was trained on: sum over steps "
    "of sum_i w_i r_i,t minus beta times that step's KL, with the tweedie step reward r_i,t = r_i of the base's x0 "
    "estimate at the state the step reaches (of x_0 at the last step). The two objectives rank methods alike only as "
    "far as the step rewards track the terminal ones; the table of best methods shows where they do not.")
NO_STEP_NOTE = ("The step-level objective (the one MSDDA is exact for) is not reported: it is measured only for "
                "adapters trained with the tweedie step reward.")
PRECISION_NOTE = (
    "MSDDA's fused precision, P = (1 - sum_i l_i) / s_ref^2 + sum_i l_i / s_i^2, is 1 / s^2 > 0 at every weight "
    "here, off the simplex too: every kernel has the scheduler's variance s^2. (With learned variances it can turn "
    "non-positive, and sampling refuses such weights.)")
LEARNED_PRECISION_NOTE = (
    "MSDDA's fused precision, P = (1 - sum_i l_i) / s_ref^2 + sum_i l_i / s_i^2, weights each kernel by its own "
    "learned variance here, so MSDDA parts from output averaging (the weighted mean of the means and of the "
    "log-variances) as far as the variances differ. Sampling refuses weights where P is not positive; every cell of "
    "this sweep sampled.")


def _learns_variances(adapters: list[str]) -> bool:
    """Whether the adapters were trained on a learned-variance scheduler (their metadata's scheduler config)."""
    from msdda.adapters import METADATA_FILE, load_adapter_metadata, resolve_adapter
    from msdda.kernels import LEARNED_VARIANCE_TYPES

    for source in adapters:
        folder = resolve_adapter(source)
        if (folder / METADATA_FILE).is_file():
            variance_type = (load_adapter_metadata(folder).scheduler_config or {}).get("variance_type")
            if variance_type in LEARNED_VARIANCE_TYPES:
                return True
    return False


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
    step_rewards: list[np.ndarray] = field(default_factory=list)
    """Per weight vector, each sample's step rewards summed over its trajectory ([N, K]; NaN where not measured)."""

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
        steps = [step_column(n) for n in names]
        curve.step_rewards.append(cell[steps].to_numpy(dtype=np.float64) if set(steps) <= set(cell.columns)
                                  else np.full((len(cell), len(names)), np.nan))
        curve.images.append(images.get((method, weights)))
        for key in COSTS:
            curve.costs[key] = curve.costs.get(key, 0.0) + float(cell[key].iloc[0])
    for curve in curves.values():
        order = np.argsort([w[0] for w in curve.weights], kind="stable")
        for name in ("weights", "rewards", "kl", "kl_to_oracle", "step_rewards", "images"):
            setattr(curve, name, [getattr(curve, name)[i] for i in order])
        curve.costs = {k: v / len(curve.weights) for k, v in curve.costs.items()}
    sizes = {len(r) for c in curves.values() for r in c.rewards}
    if len(sizes) != 1:
        raise UserError(f"{folder}: cells hold different numbers of samples {sorted(sizes)}; re-run the sweep")
    return list(curves.values()), names, {**config, "beta": manifest["beta"],
                                          "adapter_betas": manifest.get("adapter_betas")}


def grid_weights(curves: list[Curve]) -> list[tuple[float, ...]]:
    """The weight vectors the sweep's fusion methods sampled (its grid, plus any oracle's), in a stable order:
    where every objective is reported."""
    found = {weight_key(w): w for c in curves if c.sweeps_weights for w in c.weights}
    return [found[key] for key in sorted(found, key=lambda k: [-float(v) for v in k.split(",")])]


def _cell_at(curve: Curve, weights: tuple[float, ...]) -> int | None:
    """The index of the curve's cell whose samples stand for ``weights`` (its only one when it does not sweep)."""
    if not curve.sweeps_weights:
        return 0
    return next((i for i, cell_weights in enumerate(curve.weights) if np.allclose(cell_weights, weights)), None)


def _mean_sem(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "sem": standard_error(values)}


def _objectives(curve: Curve, index: int, weights: tuple[float, ...], beta: float) -> dict[str, np.ndarray]:
    """Per sample at ``weights``: the terminal weighted objective and, for a Gaussian-kernel method, the
    trajectory-level and (where step rewards were measured) step-level regularised objectives."""
    terminal = weighted_objective(curve.rewards[index], weights)
    values = {"weighted_objective": terminal}
    if curve.gaussian:  # paired: each sample's reward less its own KL
        values["regularised_objective"] = terminal - beta * curve.kl[index]
        step = weighted_objective(curve.step_rewards[index], weights) - beta * curve.kl[index]
        if np.isfinite(step).all():
            values["step_objective"] = step
    return values


OBJECTIVES = ("weighted_objective", "regularised_objective", "step_objective")


def compute_metrics(curves: list[Curve], names: list[str], reference: list[float] | None, resamples: int,
                    beta: float) -> dict:
    """Hypervolumes, per-cell rewards and KLs, the three objectives at every grid weight, MSDDA minus every other
    method on them (paired by prompt and seed), and the best method per weight under each objective."""
    all_means = np.concatenate([c.means() for c in curves])
    reference_point = np.asarray(reference if reference is not None else all_means.min(axis=0), dtype=np.float64)
    count = len(curves[0].rewards[0])
    targets = grid_weights(curves)
    metrics: dict = {"rewards": names, "reference_point": reference_point.tolist(), "samples_per_cell": count,
                     "reference_point_rule": "given" if reference is not None else
                     "the lowest mean of each reward over all cells", "beta": beta,
                     "weights": [list(w) for w in targets], "methods": {}, "best": {}}
    per_sample: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for curve in curves:
        volume = hypervolume(curve.means(), reference_point)
        error = bootstrap_standard_error(lambda rows, c=curve: hypervolume(c.means(rows), reference_point), count,
                                         resamples)
        entry = {"hypervolume": volume, "hypervolume_sem": error, "gaussian": curve.gaussian,
                 "sweeps_weights": curve.sweeps_weights, "costs": curve.costs, **{name: {} for name in OBJECTIVES}}
        per_sample[curve.label] = {}
        for weights in targets:
            index = _cell_at(curve, weights)
            if index is None:
                continue
            values = _objectives(curve, index, weights, beta)
            per_sample[curve.label][weight_key(weights)] = values
            for name, samples in values.items():
                entry[name][weight_key(weights)] = _mean_sem(samples)
        points = []
        for w, m, e, kl, to_oracle in zip(curve.weights, curve.means(), curve.errors(), curve.kl, curve.kl_to_oracle):
            point = {"weights": list(w), "mean": m.tolist(), "sem": e.tolist(),
                     "kl_to_base": _mean_sem(kl) if curve.gaussian else None}
            if curve.gaussian and np.isfinite(to_oracle).all():
                point["kl_to_oracle"] = _mean_sem(to_oracle)
            points.append(point)
        entry["points"] = points
        metrics["methods"][curve.label] = entry
    if "msdda" in per_sample:
        ours = per_sample["msdda"]
        for label, theirs in per_sample.items():
            metrics["methods"][label]["msdda_minus"] = {
                key: {name: _mean_sem(ours[key][name] - values[name]) for name in OBJECTIVES
                      if name in values and name in ours.get(key, {})}
                for key, values in theirs.items() if key in ours and label != "msdda"}
    for name in OBJECTIVES:
        best = {}
        for weights in targets:
            key = weight_key(weights)
            scored = {label: m[name][key]["mean"] for label, m in metrics["methods"].items() if key in m[name]}
            if scored:
                best[key] = max(scored, key=scored.get)
        metrics["best"][name] = best
    return metrics


def step_optimum_check(curves: list[Curve], names: list[str], adapter_betas: list[float] | None) -> list[dict]:
    """How near each adapter is to its step optimum, from its own cells against the base's (paired samples).

    At the step optimum of r_t - beta KL_t with a locally linear step reward, the kernel's mean moves by
    s^2 grad r / beta, so the step reward gained is 2 beta times the step's KL. An adapter that moved a fraction
    alpha of that way gains alpha s^2 |grad r|^2 / beta at KL alpha^2 s^2 |grad r|^2 / (2 beta^2): its implied
    beta, gain / (2 KL) summed over steps, is beta / alpha. Implied beta near the trained one: near the optimum;
    far above it: the adapter stopped short (alpha < 1) or moved where its reward does not. MSDDA's exponents
    w_i beta_i / beta assume every alpha_i = 1."""
    by_label = {c.label: c for c in curves}
    base = by_label.get("base")
    if base is None or adapter_betas is None or not np.isfinite(base.step_rewards[0]).all():
        return []
    checks = []
    for index, name in enumerate(names):
        single = by_label.get(f"single: {name}")
        if single is None:
            continue
        gain = single.step_rewards[0][:, index] - base.step_rewards[0][:, index]
        kl = single.kl[0]
        checks.append({"reward": name, "beta": adapter_betas[index], "step_gain": _mean_sem(gain),
                       "kl_to_base": _mean_sem(kl), "implied_beta": float(gain.mean() / (2 * kl.mean())),
                       "terminal_gain": _mean_sem(single.rewards[0][:, index] - base.rewards[0][:, index])})
    return checks


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


def _cell_text(value: dict[str, float] | None) -> str:
    return "" if value is None else f"{value['mean']:.4g} ± {value['sem']:.2g}"


def _point_at(method: dict, key: str, own_cell_only: bool = False) -> dict | None:
    """The method's cell standing for weights ``key``: its own there, or (unless ``own_cell_only``) its only one
    when it ignores weights."""
    points = method["points"]
    found = next((p for p in points if weight_key(p["weights"]) == key), None)
    if found is not None or own_cell_only or len(points) != 1 or method["sweeps_weights"]:
        return found
    return points[0]


def _objective_table(metrics: dict, field: str, keys: list[str]) -> list[list[str]]:
    """Rows per weight vector, a column per method: ``field`` there (mean ± s.e.), the best method's in bold; where
    the field needs a KL and the method has none (CoDe), the cell says so."""
    best = metrics["best"].get(field, {})
    rows = []
    for key in keys:
        row = [key]
        for label, method in metrics["methods"].items():
            if field != "weighted_objective" and not method["gaussian"]:
                row.append(NO_KERNEL)
                continue
            text = _cell_text(method[field].get(key))
            row.append(f"**{text}**" if text and best.get(key) == label else text)
        rows.append(row)
    return rows


def _point_table(metrics: dict, keys: list[str], value, own_cell_only: bool = False) -> list[list[str]]:
    """Rows per weight vector, a column per method: ``value(point, method)`` of the cell standing for it."""
    rows = []
    for key in keys:
        row = [key]
        for method in metrics["methods"].values():
            point = _point_at(method, key, own_cell_only)
            row.append("" if point is None else value(point, method))
        rows.append(row)
    return rows


def _kl_text(field: str):
    def text(point: dict, method: dict) -> str:
        return _cell_text(point.get(field)) if method["gaussian"] else NO_KERNEL
    return text


def _difference_table(metrics: dict, field: str, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """MSDDA minus each other method on ``field`` (paired by prompt and seed), rows per weight vector."""
    others = [label for label, m in metrics["methods"].items() if "msdda_minus" in m]
    rows = [[key] + [_cell_text(metrics["methods"][label]["msdda_minus"].get(key, {}).get(field)) or
                     (NO_KERNEL if not metrics["methods"][label]["gaussian"] and field != "weighted_objective" else "")
                     for label in others] for key in keys]
    return others, rows


def _tables(metrics: dict, names: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    methods = metrics["methods"]
    labels = list(methods)
    keys = [weight_key(w) for w in metrics["weights"]]
    weights_header = f"w ({', '.join(names)})"
    volume_rows = [[label, f"{m['hypervolume']:.4g} ± {m['hypervolume_sem']:.2g}"] for label, m in methods.items()]
    cost_rows = [[label, f"{m['costs']['seconds_per_image']:.3f}", f"{m['costs']['unet_rows_per_image']:.0f}",
                  f"{m['costs']['reward_images_per_image']:.0f}", f"{m['costs']['kl_seconds_per_image']:.3f}",
                  f"{m['costs']['kl_unet_rows_per_image']:.0f}"]
                 for label, m in methods.items()]
    beta = f"beta = {metrics['beta']:g}"
    tables = [("Hypervolume (± bootstrap standard error)", ["method", "hypervolume"], volume_rows)]
    for index, name in enumerate(names):
        tables.append((f"Mean {name} per cell (± standard error)", [weights_header, *labels],
                       _point_table(metrics, keys, lambda p, m, i=index: f"{p['mean'][i]:.4g} ± {p['sem'][i]:.2g}")))
    tables += [
        ("Weighted objective sum_i w_i r_i of the terminal sample (mean ± standard error; best in bold)",
         [weights_header, *labels], _objective_table(metrics, "weighted_objective", keys)),
        (f"Trajectory-level objective sum_i w_i r_i - beta * path KL to the base ({beta}; mean ± paired standard "
         "error; best in bold)", [weights_header, *labels], _objective_table(metrics, "regularised_objective", keys)),
    ]
    measured_steps = any(m["step_objective"] for m in methods.values())
    if measured_steps:
        tables.append((f"Step-level objective sum_t (sum_i w_i r_i,t - beta * KL_t), tweedie step rewards ({beta}; "
                       "mean ± paired standard error; best in bold)", [weights_header, *labels],
                       _objective_table(metrics, "step_objective", keys)))
    if "msdda" in methods:
        for field, caption in (("regularised_objective", "trajectory-level"), ("step_objective", "step-level")):
            if field == "step_objective" and not measured_steps:
                continue
            others, rows = _difference_table(metrics, field, keys)
            tables.append((f"MSDDA minus each method on the {caption} objective, paired by (prompt, seed) "
                           "(mean ± standard error of the differences)", [weights_header, *others], rows))
    tables.append(("Best method per weight vector under each objective", [weights_header, "terminal rewards",
                   "trajectory-level", *(["step-level"] if measured_steps else [])],
                   [[key, *(metrics["best"][field].get(key, "") for field in OBJECTIVES
                            if field != "step_objective" or measured_steps)] for key in keys]))
    tables.append(("Path KL to the base, sum over steps of KL(method || base) at the method's own states, per cell "
                   "(mean ± standard error)", [weights_header, *labels], _point_table(metrics, keys,
                                                                                     _kl_text("kl_to_base"))))
    # a KL to the oracle at w belongs to the cell sampled at w (the base's one cell has one to its own weights' oracle)
    oracle_keys = [k for k in keys if any((_point_at(m, k, True) or {}).get("kl_to_oracle") for m in methods.values())]
    if oracle_keys:
        tables.append(("Path KL to the oracle retrained at w, sum over steps of KL(method || oracle) at the method's "
                       "own states (mean ± standard error)", [weights_header, *labels],
                       _point_table(metrics, oracle_keys, _kl_text("kl_to_oracle"), own_cell_only=True)))
    if metrics.get("step_optimum"):
        tables.append(("Each adapter against its step optimum: its own reward's gain over the base (paired), its path "
                       "KL, and the beta they imply, gain / (2 KL) (equal to the trained beta at the step optimum of a "
                       "locally linear reward; above it: the adapter stopped short of its optimum)",
                       ["reward", "trained beta", "terminal gain", "step-reward gain (sum over steps)",
                        "path KL to the base", "implied beta"],
                       [[c["reward"], f"{c['beta']:g}", _cell_text(c["terminal_gain"]), _cell_text(c["step_gain"]),
                         _cell_text(c["kl_to_base"]), f"{c['implied_beta']:.3g}"] for c in metrics["step_optimum"]]))
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


def _bold(cell: str) -> str:
    """Markdown's **bold** of a table cell as HTML."""
    return f"<b>{cell[2:-2]}</b>" if cell.startswith("**") and cell.endswith("**") else cell


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
        parts += ["<tr>" + "".join(f"<td>{_bold(escape(c))}</td>" for c in row) + "</tr>" for row in rows]
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


def build_report(folder: str | Path, reference_point: list[float] | None = None, resamples: int = 200) -> Path:
    """Write pareto.png, kl.png, grids/, metrics.json, report.md and report.html into the sweep ``folder``."""
    folder = Path(folder)
    curves, names, config = load_curves(folder)
    if reference_point is not None and len(reference_point) != len(names):
        raise UserError(f"reference point {reference_point} needs one value per reward {names}")
    metrics = compute_metrics(curves, names, reference_point, resamples, config["beta"])
    metrics["step_optimum"] = step_optimum_check(curves, names, config.get("adapter_betas"))
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
             f"({metrics['reference_point_rule']})." + "".join(notes), TRAJECTORY_NOTE,
             STEP_NOTE if any(m["step_objective"] for m in metrics["methods"].values()) else NO_STEP_NOTE]
    if "msdda" in metrics["methods"]:
        intro.append(LEARNED_PRECISION_NOTE if _learns_variances(config.get("adapters") or []) else PRECISION_NOTE)
    tables = _tables(metrics, names)
    shown = _grid_prompts(folder, config)
    grid_caption = (f"Rows: weights w = ({', '.join(names)}). Columns: the first seed of {shown}.")
    plots = {"Pareto plot": "pareto.png", "Reward against path KL to the base": "kl.png"}
    (folder / "report.md").write_text(_markdown(title, intro, tables, plots, grids, grid_caption))
    (folder / "report.html").write_text(_html(title, intro, tables, plots, grids, grid_caption))
    return folder / "report.md"
