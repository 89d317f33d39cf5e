"""A sweep's numbers, from its curves (msdda.report.load): hypervolumes, per-cell rewards and KLs, the weighted and
regularised objectives at every grid weight, MSDDA minus every other method (paired by prompt and seed), the best
method per weight, each adapter's distance from its step optimum, and which methods' samples coincided."""

from __future__ import annotations

import numpy as np

from msdda.fuse.methods import get_method, method_names
from msdda.report.load import Curve, grid_weights
from msdda.report.metrics import bootstrap_standard_error, hypervolume, standard_error, weighted_objective
from msdda.sweep.grid import weight_key

__all__ = ["OBJECTIVES", "compute_metrics", "step_optimum_check", "coincidences", "cell_at", "mean_sem"]


def cell_at(curve: Curve, weights: tuple[float, ...]) -> int | None:
    """The index of the curve's cell whose samples stand for ``weights`` (its only one when it does not sweep)."""
    if not curve.sweeps_weights:
        return 0
    return next((i for i, cell_weights in enumerate(curve.weights) if np.allclose(cell_weights, weights)), None)


def mean_sem(values: np.ndarray) -> dict[str, float]:
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
            index = cell_at(curve, weights)
            if index is None:
                continue
            values = _objectives(curve, index, weights, beta)
            per_sample[curve.label][weight_key(weights)] = values
            for name, samples in values.items():
                entry[name][weight_key(weights)] = mean_sem(samples)
        points = []
        for w, m, e, kl, to_oracle in zip(curve.weights, curve.means(), curve.errors(), curve.kl, curve.kl_to_oracle):
            point = {"weights": list(w), "mean": m.tolist(), "sem": e.tolist(),
                     "kl_to_base": mean_sem(kl) if curve.gaussian else None}
            if curve.gaussian and np.isfinite(to_oracle).all():
                point["kl_to_oracle"] = mean_sem(to_oracle)
            points.append(point)
        entry["points"] = points
        metrics["methods"][curve.label] = entry
    if "msdda" in per_sample:
        ours = per_sample["msdda"]
        for label, theirs in per_sample.items():
            metrics["methods"][label]["msdda_minus"] = {
                key: {name: mean_sem(ours[key][name] - values[name]) for name in OBJECTIVES
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
    w_i beta_i / beta assume every alpha_i = 1.

    A step's gain is its reward's rise over that one step from the state it starts at. The tweedie step rewards
    are the values of the states a path reaches, so over a path those rises add up to the terminal reward's gain
    (where the tweedie value is the reference's expected reward), and that is the gain used. The step rewards
    summed along the path are kept as ``step_gain``: they count each early shift again at every later step, about
    as many times as steps follow it. Being an aggregate over steps, this check cannot tell a step that stopped
    short from one that went too far; the optimality gauge (msdda.train.gauge) checks each step."""
    by_label = {c.label: c for c in curves}
    base = by_label.get("base")
    if base is None or adapter_betas is None or not np.isfinite(base.step_rewards[0]).all():
        return []
    checks = []
    for index, name in enumerate(names):
        single = by_label.get(f"single: {name}")
        if single is None:
            continue
        gain = single.rewards[0][:, index] - base.rewards[0][:, index]
        kl = single.kl[0]
        checks.append({"reward": name, "beta": adapter_betas[index],
                       "step_gain": mean_sem(single.step_rewards[0][:, index] - base.step_rewards[0][:, index]),
                       "kl_to_base": mean_sem(kl), "implied_beta": float(gain.mean() / (2 * kl.mean())),
                       "terminal_gain": mean_sem(gain)})
    return checks


def coincidences(curves: list[Curve]) -> list[str]:
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
