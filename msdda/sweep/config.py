"""The sweep config: which adapters, methods, weights, prompts and seeds; loaded from YAML with overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from msdda.errors import UserError
from msdda.fuse.config import SamplingConfig
from msdda.fuse.methods import method_names
from msdda.fuse.methods.rgg import check_rgg_scale
from msdda.prompts import check_prompts_spec, load_prompts

__all__ = ["SweepConfig"]


@dataclass
class SweepConfig(SamplingConfig):
    """Every method at every weight vector on the same prompts and seeds (``msdda sweep``)."""

    num_prompts: int | None = 16
    """Use this many prompts, evenly spaced through the list (None: all)."""
    rewards: list[str] | None = None
    """The rewards to score, one per adapter (default: the reward each adapter was trained on)."""
    methods: list[str] = field(default_factory=method_names)
    """Fusion methods to sample (default: every registered one)."""
    weights: int | list[list[float]] = 11
    """Points per edge of the simplex grid (11: 0, 0.1, ..., 1 for K = 2), or explicit weight vectors."""
    oracles: dict[str, str] = field(default_factory=dict)
    """Adapters trained on the weighted reward: {'0.25,0.75': folder, ...}, sampled alone as method 'oracle'."""
    batch_size: int = 16
    """Prompts per sampling call."""
    code_candidates: int = 8
    code_block: int = 5
    grid_prompts: int = 4
    """Images kept per cell for the report's grids (the first prompts, first seed)."""
    output_dir: str = "runs/sweep"

    def validate(self) -> None:
        """Refuse bad settings before any sampling; each message names the key and the fix."""
        from msdda.utils import parse_seeds

        if len(self.adapters) < 1:
            raise UserError("adapters is empty: give the K reward adapters to sweep (folders or Hub ids)")
        unknown = [m for m in self.methods if m not in method_names() and m != "oracle"]
        if unknown:
            raise UserError(f"methods {unknown} are unknown; choose from {method_names()}")
        if "oracle" in self.methods:
            raise UserError("'oracle' is not a method to list: give the oracle adapters under oracles: {weights: folder}")
        if isinstance(self.weights, int):
            if self.weights < 2:
                raise UserError(f"weights={self.weights}: a grid needs at least 2 points per edge")
        else:
            for vector in self.weights:
                self._check_weights(vector, "weights")
        for key in self.oracles:
            self._check_weights(self.parse_weight_key(key), f"oracles[{key!r}]")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"beta={self.beta}: the fused objective's KL weight must be a finite number > 0")
        if self.rewards is not None and len(self.rewards) != len(self.adapters):
            raise UserError(f"rewards names {len(self.rewards)} rewards for {len(self.adapters)} adapters; give one "
                             "per adapter, or leave it out to use the rewards the adapters were trained on")
        check_prompts_spec(self.prompts)
        parse_seeds(self.seeds)
        check_rgg_scale(self.rgg_scale)
        for name, value in (("batch_size", self.batch_size), ("code_candidates", self.code_candidates),
                            ("code_block", self.code_block)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")

    def _check_weights(self, vector: list[float] | tuple[float, ...], where: str) -> None:
        if len(vector) != len(self.adapters):
            raise UserError(f"{where}: {list(vector)} has {len(vector)} weights for {len(self.adapters)} adapters")
        if any(not math.isfinite(w) or w < 0 for w in vector) or not sum(vector) > 0:
            raise UserError(f"{where}: {list(vector)} must be non-negative numbers, not all zero")

    @staticmethod
    def parse_weight_key(key: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in str(key).split(","))
        except ValueError as error:
            raise UserError(f"oracle weights {key!r} must be comma-separated numbers like '0.25,0.75'") from error

    def objective_beta(self, adapter_betas: list[float]) -> float:
        """The KL weight of the objective the sweep scores: ``beta`` if given, else the adapters' common beta."""
        if self.beta is not None:
            return float(self.beta)
        if max(adapter_betas) != min(adapter_betas):
            raise UserError(f"the adapters' betas differ ({adapter_betas}), so the regularised objective "
                            "sum_i w_i r_i - beta KL has no default beta; set beta: <the fused objective's KL weight> "
                            "in the sweep config (beta=... on the command line)")
        return float(adapter_betas[0])

    def load_prompts(self) -> list[str]:
        return load_prompts(self.prompts, self.num_prompts)
