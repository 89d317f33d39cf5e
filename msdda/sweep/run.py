"""Run a weight sweep: every method at every weight on the same prompts and seeds, scored by every reward.

Each (method, weights) cell samples all prompts x seeds and writes its rows to ``cells/<cell>.csv`` atomically
(temp file, then rename), so an interrupted sweep resumes without redoing finished cells. Under ``accelerate
launch`` the processes share the cells not yet done (msdda.shards), each cell sampled as one process samples it, and
the main process writes the tables once every cell is in. Every cell draws
the same initial noise for the same (prompt, seed), so methods are compared on paired samples.

Every sample also carries its path KL along its own trajectory: to the base (``kl_to_base``) and, where an
oracle adapter was retrained at the cell's weights, to that oracle (``kl_to_oracle``); NaN where a method has
no Gaussian kernel (CoDe) or there is no oracle. The oracles are loaded into the sweep's pipeline as comparison
adapters, never fused. The summary adds the trajectory-level objective sum_i w_i r_i - beta KL per cell.

Where every adapter was trained with the ``tweedie`` step reward, each sample also carries its step rewards
summed over the trajectory (``step:<reward>``: r_i of the base's x0 estimate at every state x_{T-1} ... x_1,
and of x_0), and the summary the step-level objective sum_i w_i sum_t r_i,t - beta KL, the one MSDDA's kernel
is exact for.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from msdda.config import config_to_dict
from msdda.diffusion import denoiser_of, images_to_pil
from msdda.errors import InputNotFound, UserError
from msdda.fuse.methods import get_method
from msdda.shards import launch_device, launch_state, own_share
from msdda.sweep.config import SweepConfig
from msdda.sweep.grid import simplex_grid, weight_key

__all__ = ["Cell", "plan_cells", "run_sweep", "SAMPLE_SETTINGS", "weight_column", "load_manifest", "MANIFEST",
           "KL_TO_BASE", "KL_TO_ORACLE", "OBJECTIVE", "REGULARISED", "STEP_OBJECTIVE", "COSTS", "step_column"]

CONFIG_FILE = "sweep.yaml"
RESULTS = "results"
SUMMARY = "summary.csv"
MANIFEST = "manifest.json"
"""What a sweep folder holds, for readers (the report): its rewards, tables and each cell's files."""
SAMPLE_SETTINGS = ("base", "adapters", "betas", "beta", "rewards", "prompts", "num_prompts", "seeds",
                   "num_inference_steps", "guidance_scale", "eta", "batch_size", "code_candidates", "code_block",
                   "rgg_scale")
"""Settings that decide the samples: a sweep folder can only be resumed with the same ones (a setting its saved
config predates counts as its default)."""
KL_TO_BASE, KL_TO_ORACLE = "kl_to_base", "kl_to_oracle"
"""Per-sample path KLs, sum over steps of KL(method's kernel || other kernel) at the method's own x_t."""
OBJECTIVE, REGULARISED = "objective", "regularised_objective"
"""Per-sample sum_i w_i r_i at the cell's weights, and that minus beta * kl_to_base (the trajectory-level
objective: terminal rewards minus path KL)."""
STEP_OBJECTIVE = "step_objective"
"""Per-sample sum_i w_i sum_t r_i,t - beta * kl_to_base, with the ``tweedie`` step rewards r_i,t (the
step-level objective; NaN where the adapters were not trained with that step reward, or for CoDe)."""
COSTS = ("seconds_per_image", "unet_rows_per_image", "reward_images_per_image", "reward_gradient_images_per_image",
         "kl_seconds_per_image", "kl_unet_rows_per_image")
"""Per-image costs: the method's own (UNet rows include the forwards a reward gradient runs back through; reward
calls, and those of them differentiated), then the KL measurement's (extra forwards), kept apart."""


def weight_column(reward: str) -> str:
    return f"w:{reward}"


def step_column(reward: str) -> str:
    """The column of a reward's step rewards summed over a sample's trajectory."""
    return f"step:{reward}"


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a method at a weight vector (``oracle``: its own adapter, sampled alone)."""

    method: str
    weights: tuple[float, ...]
    adapter: str | None = None

    @property
    def stem(self) -> str:
        return f"{self.method}_{weight_key(self.weights).replace(',', '-')}"

    @property
    def rows_file(self) -> str:
        return f"cells/{self.stem}.csv"

    @property
    def images_file(self) -> str:
        return f"cells/{self.stem}.png"


def plan_cells(config: SweepConfig, count: int) -> list[Cell]:
    """The sweep's cells: every method at the weights it samples (the grid; ``single`` each corner; ``base``
    once), then the oracles."""
    grid = simplex_grid(count, config.weights) if isinstance(config.weights, int) else \
        [tuple(float(w) for w in vector) for vector in config.weights]
    cells = [Cell(method, weights) for method in config.methods
             for weights in get_method(method).cell_weights(grid, count)]
    cells.extend(Cell("oracle", SweepConfig.parse_weight_key(key), folder) for key, folder in config.oracles.items())
    return cells


@contextmanager
def _counting(modules: list[torch.nn.Module], counter: dict, key: str, differentiated_only: bool = False):
    """Count the batch rows that go through ``modules`` (UNet evaluations, images scored); ``differentiated_only``:
    only the calls that ask for a gradient (``grad=True``, rewards)."""
    def hook(_module, args, kwargs):
        if differentiated_only and not kwargs.get("grad", False):
            return
        first = args[0] if args else next(iter(kwargs.values()))
        counter[key] += int(first.shape[0])

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Sweep:
    """Loads the adapters and rewards once, checks the folder, then runs the cells that are not done yet."""

    def __init__(self, config: SweepConfig) -> None:
        from msdda.utils import parse_seeds
        from msdda.fuse.pipeline import MSDDAPipeline
        from msdda.rewards import load_reward

        config.validate()
        self.config = config
        self.folder = Path(config.output_dir)
        self._check_folder()
        self.prompts, self.seeds = config.load_prompts(), parse_seeds(config.seeds)
        self.state = launch_state()
        self.device = launch_device(config.device, self.state)
        self.pipeline = MSDDAPipeline.from_pretrained(config.base, adapters=config.adapters,
                                                      betas=config.betas).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.beta = config.objective_beta(self.pipeline.betas)
        oracles = {f"oracle_{index}": (key, folder) for index, (key, folder) in enumerate(config.oracles.items())}
        self.oracle_names = {weight_key(SweepConfig.parse_weight_key(key)): name for name, (key, _) in oracles.items()}
        """Weight key -> the comparison adapter retrained there, loaded to measure KLs against (never fused)."""
        self.pipeline.load_comparison_adapters({name: folder for name, (_, folder) in oracles.items()})
        rewards = ([load_reward(name) for name in config.rewards] if config.rewards
                   else [self._trained_reward(adapter) for adapter in self.pipeline.adapters])
        self.rewards = [reward.to(self.device) for reward in rewards]
        self.reward_names = [reward.name for reward in self.rewards]
        for method in config.methods:  # e.g. rgg with a reward that has no gradient: refused before any cell
            get_method(method).check_rewards(self.rewards)
        self.cells = plan_cells(config, len(config.adapters))
        self.step_level = all(adapter.metadata is not None and adapter.metadata.step_reward == "tweedie"
                              for adapter in self.pipeline.adapters)
        """Whether the step-level objective is measured: the adapters' step reward is the reference's x0 estimate."""

    @staticmethod
    def _trained_reward(adapter):
        if adapter.metadata is None:
            raise UserError(f"adapter {adapter.source} has no msdda metadata naming its reward; give rewards: "
                             "[one per adapter] in the sweep config")
        return adapter.metadata.trained_reward()

    def _check_folder(self) -> None:
        saved = self.folder / CONFIG_FILE
        if not saved.is_file():
            return
        previous = yaml.safe_load(saved.read_text()) or {}
        current, defaults = config_to_dict(self.config), config_to_dict(SweepConfig())
        changed = [key for key in SAMPLE_SETTINGS if previous.get(key, defaults[key]) != current.get(key)]
        if changed:
            raise UserError(f"output_dir {self.folder} holds a sweep with other {changed} "
                             f"(was {[previous.get(k) for k in changed]}); resume it with the same settings or choose "
                             "another output_dir")

    # ---------------------------------------------------------------------------------------------- cells
    def _cell_pipeline(self, cell: Cell):
        if cell.method != "oracle":
            return self.pipeline, cell.method, list(cell.weights)
        from msdda.fuse.pipeline import MSDDAPipeline

        oracle = MSDDAPipeline.from_pretrained(self.config.base, adapters=[cell.adapter]).to(self.device)
        oracle.set_progress_bar_config(disable=True)
        return oracle, "single", [1.0]

    def _oracle_at(self, cell: Cell) -> str | None:
        """The comparison adapter retrained at the cell's weights, if the sweep has one (not for the oracle)."""
        return None if cell.method == "oracle" else self.oracle_names.get(weight_key(cell.weights))

    def _run_cell(self, cell: Cell, progress: tqdm) -> tuple[list[dict], list]:
        config = self.config
        pipeline, method, weights = self._cell_pipeline(cell)
        oracle = self._oracle_at(cell)
        counts = dict.fromkeys(COSTS, 0.0)
        rows, strip = [], []
        call = dict(weights=weights, method=method, beta=config.beta, num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale, eta=config.eta, code_candidates=config.code_candidates,
                    code_block=config.code_block, rgg_scale=config.rgg_scale,
                    rewards=self.rewards if get_method(method).needs_rewards else None,
                    output_type="pt", return_kl=True, kl_to=[oracle] if oracle else [],
                    return_reference_x0=self.step_level)
        for seed in self.seeds:
            for start in range(0, len(self.prompts), config.batch_size):
                prompts = self.prompts[start:start + config.batch_size]
                started = time.perf_counter()
                with _counting([denoiser_of(pipeline)], counts, "unet_rows_per_image"), \
                        _counting(self.rewards, counts, "reward_images_per_image"), \
                        _counting(self.rewards, counts, "reward_gradient_images_per_image", differentiated_only=True):
                    output = pipeline(prompts, generator=torch.Generator().manual_seed(seed), **call)
                if self.device.type == "cuda":  # the GPU may still be computing the images
                    torch.cuda.synchronize(self.device)
                measured = output.path_kl
                counts["seconds_per_image"] += time.perf_counter() - started - measured.seconds
                counts["unet_rows_per_image"] -= measured.unet_rows
                counts["kl_seconds_per_image"] += measured.seconds
                counts["kl_unet_rows_per_image"] += measured.unet_rows
                images = output.images
                scores = [reward(images, prompts).tolist() for reward in self.rewards]
                step_sums = self._step_reward_sums(pipeline, measured.reference_x0, images, prompts)
                to_oracle = measured.totals[oracle].tolist() if oracle else [float("nan")] * len(prompts)
                for index, prompt in enumerate(prompts):
                    row = {"method": cell.method, **{weight_column(n): w for n, w in zip(self.reward_names, cell.weights)},
                           "prompt": prompt, "seed": seed, **{n: s[index] for n, s in zip(self.reward_names, scores)},
                           KL_TO_BASE: float(output.kl_to_base[index]), KL_TO_ORACLE: to_oracle[index],
                           **{step_column(n): s[index] for n, s in zip(self.reward_names, step_sums)}}
                    rows.append(row)
                if seed == self.seeds[0]:
                    strip.extend(images[: max(0, config.grid_prompts - len(strip))])
                progress.update(len(prompts))
        for row in rows:
            row.update({key: value / len(rows) for key, value in counts.items()})
        return rows, strip

    def _step_reward_sums(self, pipeline, reference_x0: list[torch.Tensor], images: torch.Tensor,
                          prompts: list[str]) -> list[list[float]]:
        """Per reward, each sample's ``tweedie`` step rewards summed over its trajectory: r of the base's x0
        estimate at x_{T-1} ... x_1 (the states the steps reach; the estimate at x_T scores no step) and of the
        final image. NaN without the estimates (adapters trained otherwise, or a method with no Gaussian kernel)."""
        from msdda.diffusion import decode_latents

        if not reference_x0:
            return [[float("nan")] * len(prompts) for _ in self.rewards]
        reached = [decode_latents(pipeline, x0) for x0 in reference_x0[1:]] + [images]
        return [torch.stack([reward(image, prompts).double() for image in reached]).sum(0).tolist()
                for reward in self.rewards]

    def _write_cell(self, cell: Cell, rows: list[dict], strip: list) -> None:
        from msdda.utils import image_grid

        folder = self.folder / "cells"
        folder.mkdir(parents=True, exist_ok=True)
        if strip:
            pil = images_to_pil(self.pipeline, torch.stack(list(strip)))
            image_grid(pil, columns=len(pil)).save(self.folder / cell.images_file)
        _atomic_csv(self.folder / cell.rows_file, rows)

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> Path:
        """Run the cells not yet done (this process's share of them), then write the tidy table and the summary;
        returns the folder."""
        state, main = self.state, self.state.is_main_process
        state.wait_for_everyone()  # every process has checked the folder (in __init__) before it changes
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        per_cell = len(self.prompts) * len(self.seeds)
        before_kl = [cell for cell in self.cells if _written_before_kl(self.folder / cell.rows_file)]
        if before_kl and main:
            warnings.warn(f"{len(before_kl)} cells of {self.folder} were written before KL accounting (no "
                          f"{KL_TO_BASE} column): sampling them again ({', '.join(c.stem for c in before_kl)})",
                          stacklevel=2)
        todo = [cell for cell in self.cells if not (self.folder / cell.rows_file).is_file() or cell in before_kl]
        state.wait_for_everyone()  # every process has read the same cell files
        mine = own_share(todo, state)
        progress = tqdm(total=len(mine) * per_cell, unit="img", disable=not main,
                        desc="sweep" if state.num_processes == 1 else f"sweep (process 0 of {state.num_processes})")
        for cell in mine:
            progress.set_postfix_str(f"{cell.method} {weight_key(cell.weights)}")
            rows, strip = self._run_cell(cell, progress)
            self._write_cell(cell, rows, strip)
        progress.close()
        state.wait_for_everyone()
        if main:
            write_tables(self.folder, self.cells, self.reward_names, self.beta)
            _write_manifest(self.folder, self.cells, self.reward_names, self.beta, self.pipeline.betas)
        state.wait_for_everyone()
        return self.folder


def _written_before_kl(rows_file: Path) -> bool:
    """A cell file from a sweep without KL accounting: its header has no kl_to_base column."""
    if not rows_file.is_file():
        return False
    with rows_file.open(newline="") as handle:
        return KL_TO_BASE not in next(csv.reader(handle), [])


def _write_manifest(folder: Path, cells: list[Cell], reward_names: list[str], beta: float,
                    adapter_betas: list[float]) -> None:
    manifest = {
        "rewards": reward_names, "beta": beta, "adapter_betas": adapter_betas, "config": CONFIG_FILE,
        "results": f"{RESULTS}.csv", "summary": SUMMARY,
        "cells": [{"method": cell.method, "weights": list(cell.weights), "adapter": cell.adapter,
                   "rows": cell.rows_file,
                   "images": cell.images_file if (folder / cell.images_file).is_file() else None}
                  for cell in cells],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_manifest(folder: str | Path) -> dict:
    """A finished sweep's manifest; a folder without one is refused with the command that writes it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputNotFound(f"{folder} holds no {MANIFEST}: run msdda sweep with output_dir={folder} (a finished "
                                "sweep's cells are kept, so this only rewrites its tables and manifest)")
    return json.loads(path.read_text())


def _atomic_csv(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_tables(folder: Path, cells: list[Cell], reward_names: list[str], beta: float):
    """results.csv / results.parquet (one row per image, with its objective and regularised objective at the
    cell's weights) and summary.csv (mean and standard error per cell). The regularised objective's standard
    error is that of the per-sample differences r - beta KL: each sample's reward paired with its own KL."""
    import pandas as pd

    table = pd.concat([pd.read_csv(folder / cell.rows_file) for cell in cells], ignore_index=True)
    for name in COSTS:  # cells written before a cost was counted (reward gradients) took none of it
        table[name] = table[name].fillna(0.0) if name in table else 0.0
    weight_columns = [weight_column(n) for n in reward_names]
    table[OBJECTIVE] = (table[weight_columns].to_numpy() * table[reward_names].to_numpy()).sum(axis=1)
    table[REGULARISED] = table[OBJECTIVE] - beta * table[KL_TO_BASE]
    step_columns = [step_column(n) for n in reward_names]
    for name in step_columns:
        if name not in table:  # a cell written before step rewards were measured
            table[name] = float("nan")
    table[STEP_OBJECTIVE] = ((table[weight_columns].to_numpy() * table[step_columns].to_numpy()).sum(axis=1)
                             - beta * table[KL_TO_BASE])
    table.to_csv(folder / f"{RESULTS}.csv", index=False)
    table.to_parquet(folder / f"{RESULTS}.parquet", index=False)
    grouped = table.groupby(["method", *weight_columns], sort=False)
    summary = grouped[[*reward_names, KL_TO_BASE, KL_TO_ORACLE, OBJECTIVE, REGULARISED, STEP_OBJECTIVE]].agg(
        ["mean", "sem"])
    summary.columns = [f"{name}_{stat}" for name, stat in summary.columns]
    summary = summary.join(grouped[list(COSTS)].first()).join(grouped.size().rename("samples")).reset_index()
    summary.insert(len(weight_columns) + 1, "beta", beta)
    summary.to_csv(folder / SUMMARY, index=False)
    return table, summary


def run_sweep(config: SweepConfig) -> Path:
    return Sweep(config).run()
