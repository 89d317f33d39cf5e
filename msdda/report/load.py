"""Loading a sweep for its report: each method's cells as a :class:`Curve` (weights, per-sample rewards, path KLs,
step rewards, costs, image strips), read from the sweep's manifest and results table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from msdda.errors import UserError
from msdda.fuse.methods import get_method
from msdda.report.metrics import standard_error
from msdda.sweep.grid import weight_key
from msdda.sweep.run import COSTS, KL_TO_BASE, KL_TO_ORACLE, load_manifest, step_column, weight_column

__all__ = ["ORACLE", "Curve", "load_curves", "grid_weights", "grid_prompts", "learns_variances"]


ORACLE = "oracle"
"""The sweep's cells of adapters retrained on the weighted reward: not a fusion method, one adapter per weight."""


def learns_variances(adapters: list[str]) -> bool:
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
        for key in COSTS:  # a sweep's tables from before a cost was counted (reward gradients) have none of it
            curve.costs[key] = curve.costs.get(key, 0.0) + (float(cell[key].iloc[0]) if key in cell else 0.0)
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


def grid_prompts(folder: Path, config: dict) -> list[str]:
    """The prompts the cells' image strips show, in order (the sweep's first prompts at its first seed)."""
    import pandas as pd

    table = pd.read_csv(folder / load_manifest(folder)["results"], usecols=["method", "prompt", "seed"])
    first = table[(table.method == table.method.iloc[0]) & (table.seed == table.seed.iloc[0])]
    return list(first.prompt.iloc[: int(config.get("grid_prompts", 4))])
