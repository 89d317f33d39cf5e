"""msdda sweep and msdda report on the embedded world with random adapters: tables, costs, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from msdda.cli import main
from msdda.config import load_config
from msdda.report.build import build_report
from msdda.sweep.config import SweepConfig
from msdda.sweep.run import Sweep, plan_cells
from msdda.testing import random_world_adapter

STEPS = 4
REWARDS = ["world-aesthetic", "world-consistency"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep_adapters")
    return [random_world_adapter(root / name, seed, num_inference_steps=STEPS) for name, seed in
            (("a", 1), ("b", 2), ("oracle", 3))]


def _config(adapters, output_dir, *overrides) -> SweepConfig:
    return load_config(SweepConfig, None, [
        f"adapters=[{adapters[0]},{adapters[1]}]", f"rewards={REWARDS}", "weights=3",
        "prompts=[a red circle on the left, a blue square at the top]", "seeds='0'", "batch_size=2",
        "code_candidates=2", "code_block=2", f"output_dir={output_dir}", f"oracles={{'0.5,0.5': {adapters[2]}}}",
        *overrides])


@pytest.fixture(scope="module")
def sweep_folder(adapters, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    Sweep(_config(adapters, folder)).run()
    return folder


def test_sweep_writes_one_row_per_image_and_cell(sweep_folder: Path) -> None:
    table = pd.read_csv(sweep_folder / "results.csv")
    # msdda, soup, output-average, diffusion-blend, code at 3 weights; single at 2 corners; base; 1 oracle
    assert len(table) == (5 * 3 + 2 + 1 + 1) * 2
    assert set(table.method) == {"msdda", "soup", "output-average", "diffusion-blend", "code", "single", "base",
                                 "oracle"}
    assert {"w:world-aesthetic", "w:world-consistency", "prompt", "seed", *REWARDS} <= set(table.columns)
    assert pd.read_parquet(sweep_folder / "results.parquet").equals(table)
    summary = pd.read_csv(sweep_folder / "summary.csv")
    assert len(summary) == 5 * 3 + 2 + 1 + 1 and {"world-aesthetic_mean", "world-aesthetic_sem", "samples"} <= set(summary)


def test_paired_cells_agree_and_costs_are_counted(sweep_folder: Path) -> None:
    table = pd.read_csv(sweep_folder / "results.csv")

    def cell(method, first_weight):
        return table[(table.method == method) & (table["w:world-aesthetic"] == first_weight)].reset_index(drop=True)

    # weights (1, 0) are the first adapter's own sampling, with the same noise: identical rewards
    pd.testing.assert_frame_equal(cell("msdda", 1.0)[REWARDS], cell("single", 1.0)[REWARDS])
    # one batched forward per step: 2 rows (guidance) per entering adapter, 4 steps
    assert cell("msdda", 0.5).unet_rows_per_image[0] == 2 * 2 * STEPS
    assert cell("msdda", 1.0).unet_rows_per_image[0] == 2 * STEPS
    assert cell("soup", 0.5).unet_rows_per_image[0] == 2 * STEPS
    assert (cell("msdda", 0.5).reward_images_per_image == 0).all()
    assert (cell("code", 0.5).reward_images_per_image > 0).all()


def test_an_interrupted_sweep_redoes_only_missing_cells(adapters, sweep_folder: Path) -> None:
    cells = sweep_folder / "cells"
    lost = cells / "soup_0.5-0.5.csv"
    before = pd.read_csv(lost)
    lost.unlink()
    times = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.csv")}
    Sweep(_config(adapters, sweep_folder)).run()
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.csv") if p.name in times} == times
    pd.testing.assert_frame_equal(pd.read_csv(lost)[REWARDS], before[REWARDS])


def test_a_sweep_folder_refuses_other_sample_settings(adapters, sweep_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"holds a sweep with other \['seeds'\]"):
        Sweep(_config(adapters, sweep_folder, "seeds=0-1"))


def test_bad_sweep_configs_are_refused(adapters, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        _config(adapters, tmp_path, "methods=[msdda,average]").validate()
    with pytest.raises(ValueError, match="has 3 weights for 2 adapters"):
        _config(adapters, tmp_path, "weights=[[0.2,0.3,0.5]]").validate()
    with pytest.raises(ValueError, match="non-negative"):
        _config(adapters, tmp_path, "weights=[[-0.2,1.2]]").validate()
    assert len(plan_cells(_config(adapters, tmp_path, "weights=11", "methods=[msdda]", "oracles={}"), 2)) == 11


def test_report_writes_plot_tables_and_metrics(sweep_folder: Path) -> None:
    report = build_report(sweep_folder, resamples=20)
    text = report.read_text()
    assert "Hypervolume" in text and "pareto.png" in text and "Weighted objective" in text
    metrics = json.loads((sweep_folder / "metrics.json").read_text())
    assert {"msdda", "soup", "code", "base", "oracle", "single: world-aesthetic"} <= set(metrics["methods"])
    msdda = metrics["methods"]["msdda"]
    assert msdda["hypervolume"] >= 0 and set(msdda["weighted_objective"]) == {"0.5,0.5"}
    assert set(metrics["methods"]["base"]["weighted_objective"]) == {"0.25,0.75", "0.5,0.5", "0.75,0.25"}
    assert (sweep_folder / "pareto.png").stat().st_size > 10_000
    assert (sweep_folder / "grids" / "msdda.png").is_file() and (sweep_folder / "report.html").is_file()


def test_report_cli_names_a_missing_sweep(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "run msdda sweep" in capsys.readouterr().err
