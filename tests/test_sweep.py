"""msdda sweep and msdda report on the embedded world with random adapters: tables, costs, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from msdda.cli import main
from msdda.config import load_config
from msdda.errors import UserError
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
    # msdda, soup, output-average, diffusion-blend, code, rgg at 3 weights; single at 2 corners; base; 1 oracle
    assert len(table) == (6 * 3 + 2 + 1 + 1) * 2
    assert set(table.method) == {"msdda", "soup", "output-average", "diffusion-blend", "code", "rgg", "single",
                                 "base", "oracle"}
    assert {"w:world-aesthetic", "w:world-consistency", "prompt", "seed", *REWARDS} <= set(table.columns)
    assert pd.read_parquet(sweep_folder / "results.parquet").equals(table)
    summary = pd.read_csv(sweep_folder / "summary.csv")
    assert len(summary) == 6 * 3 + 2 + 1 + 1 and {"world-aesthetic_mean", "world-aesthetic_sem", "samples"} <= set(summary)


def test_every_sample_carries_its_path_kls_and_every_cell_its_regularised_objective(sweep_folder: Path) -> None:
    table = pd.read_csv(sweep_folder / "results.csv")
    gaussian = table[table.method != "code"]
    assert table[table.method == "code"].kl_to_base.isna().all()  # no Gaussian kernel: no KL
    assert (table[table.method == "base"].kl_to_base == 0).all()
    assert (gaussian[gaussian.method != "base"].kl_to_base > 0).all()
    # the oracle is at (0.5, 0.5): every Gaussian method there is measured against it, nothing elsewhere
    at_oracle = (table["w:world-aesthetic"] == 0.5) & ~table.method.isin(["code", "oracle"])
    assert (table[at_oracle].kl_to_oracle > 0).all() and table[~at_oracle].kl_to_oracle.isna().all()
    summary = pd.read_csv(sweep_folder / "summary.csv")
    assert (summary.beta == 0.01).all()  # the adapters' common beta
    objective = 0.5 * table[REWARDS[0]] + 0.5 * table[REWARDS[1]] - 0.01 * table.kl_to_base
    msdda = summary[(summary.method == "msdda") & (summary["w:world-aesthetic"] == 0.5)].iloc[0]
    assert msdda.regularised_objective_mean == pytest.approx(objective[(table.method == "msdda") & at_oracle].mean())
    assert msdda.kl_to_base_sem > 0 and np.isfinite(msdda.kl_to_oracle_mean)
    # measuring costs its own forwards, counted apart (base and oracle, 2 rows each with guidance, every step: the
    # world's DDIM has no deterministic last step)
    assert msdda.unet_rows_per_image == 2 * 2 * STEPS and msdda.kl_unet_rows_per_image == 2 * 2 * STEPS


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
    assert (cell("code", 0.5).reward_images_per_image > 0).all() and (cell("code", 0.5).reward_gradient_images_per_image
                                                                      == 0).all()
    # rgg: the base at x_t and, with its backward, at the base's mean (none after the last step), 2 rows each; every
    # reward called with its gradient once per step
    assert cell("rgg", 0.5).unet_rows_per_image[0] == 2 * 2 * (STEPS - 1) + 2
    assert cell("rgg", 0.5).reward_gradient_images_per_image[0] == cell("rgg", 0.5).reward_images_per_image[0] \
        == len(REWARDS) * STEPS
    assert (cell("rgg", 0.5).kl_unet_rows_per_image == 2 * STEPS).all()  # the oracle's; the base's is rgg's own


def test_an_interrupted_sweep_redoes_only_missing_cells(adapters, sweep_folder: Path) -> None:
    cells = sweep_folder / "cells"
    lost = cells / "soup_0.5-0.5.csv"
    before = pd.read_csv(lost)
    lost.unlink()
    times = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.csv")}
    Sweep(_config(adapters, sweep_folder)).run()
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.csv") if p.name in times} == times
    pd.testing.assert_frame_equal(pd.read_csv(lost)[REWARDS], before[REWARDS])


def test_cells_written_before_kl_accounting_are_sampled_again(adapters, sweep_folder: Path) -> None:
    old = sweep_folder / "cells" / "msdda_0.5-0.5.csv"
    before = pd.read_csv(old)
    before.drop(columns=["kl_to_base", "kl_to_oracle"]).to_csv(old, index=False)
    with pytest.warns(UserWarning, match=r"1 cells .* before KL accounting .*msdda_0.5-0.5"):
        Sweep(_config(adapters, sweep_folder)).run()
    pd.testing.assert_frame_equal(pd.read_csv(old)[[*REWARDS, "kl_to_base", "kl_to_oracle"]],
                                  before[[*REWARDS, "kl_to_base", "kl_to_oracle"]])


def test_a_sweep_from_before_rgg_resumes_and_counts_no_reward_gradients_for_its_cells(adapters,
                                                                                     sweep_folder: Path) -> None:
    saved = sweep_folder / "sweep.yaml"
    settings = yaml.safe_load(saved.read_text())
    del settings["rgg_scale"]  # the setting's default, as it was sampled
    saved.write_text(yaml.safe_dump(settings))
    old = sweep_folder / "cells" / "msdda_0.5-0.5.csv"
    pd.read_csv(old).drop(columns=["reward_gradient_images_per_image"]).to_csv(old, index=False)
    Sweep(_config(adapters, sweep_folder)).run()
    table = pd.read_csv(sweep_folder / "results.csv")
    assert (table[table.method == "msdda"].reward_gradient_images_per_image == 0).all()


def test_rgg_in_a_sweep_refuses_a_reward_without_gradients_before_sampling(adapters, tmp_path) -> None:
    with pytest.raises(UserError, match=r"method 'rgg' .*\['jpeg-compressibility'\] are not differentiable"):
        Sweep(_config(adapters, tmp_path, "rewards=[world-aesthetic, jpeg-compressibility]"))
    assert not (tmp_path / "cells").exists()


def test_unequal_betas_need_the_objectives_beta(adapters, tmp_path) -> None:
    config = _config(adapters, tmp_path)
    with pytest.raises(UserError, match=r"betas differ \(\[0.01, 0.04\]\).*set beta:"):
        config.objective_beta([0.01, 0.04])
    assert _config(adapters, tmp_path, "beta=0.02").objective_beta([0.01, 0.04]) == 0.02
    with pytest.raises(UserError, match="beta=-1.0"):
        _config(adapters, tmp_path, "beta=-1.0").validate()


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
    grid = {"1,0", "0.5,0.5", "0,1"}  # the sweep's weights=3
    assert msdda["hypervolume"] >= 0 and set(msdda["weighted_objective"]) == grid
    assert set(metrics["methods"]["base"]["weighted_objective"]) == grid
    assert set(metrics["methods"]["oracle"]["weighted_objective"]) == {"0.5,0.5"}
    assert (sweep_folder / "pareto.png").stat().st_size > 10_000
    assert (sweep_folder / "grids" / "msdda.png").is_file() and (sweep_folder / "report.html").is_file()
    assert (sweep_folder / "kl.png").stat().st_size > 10_000 and "kl.png" in text
    assert "Trajectory-level objective" in text and "Path KL to the oracle" in text and "what a user sees" in text
    assert "no Gaussian kernel" in text  # CoDe's KL cells
    assert set(msdda["regularised_objective"]) == grid
    assert not metrics["methods"]["code"]["regularised_objective"]
    assert next(p for p in msdda["points"] if p["weights"] == [0.5, 0.5])["kl_to_oracle"]["mean"] > 0
    # the step-level objective: the random adapters record the tweedie step reward
    assert "Step-level objective" in text and set(msdda["step_objective"]) == grid
    assert not metrics["methods"]["code"]["step_objective"]
    table = pd.read_csv(sweep_folder / "results.csv")
    cell = table[(table.method == "soup") & (table["w:world-aesthetic"] == 0.5)]
    expected = (0.5 * cell["step:world-aesthetic"] + 0.5 * cell["step:world-consistency"] - metrics["beta"]
                * cell["kl_to_base"])
    assert np.isclose(metrics["methods"]["soup"]["step_objective"]["0.5,0.5"]["mean"], expected.mean())
    # paired differences: MSDDA minus soup is the mean of per-sample differences
    ours = table[(table.method == "msdda") & (table["w:world-aesthetic"] == 0.5)]
    difference = (ours["regularised_objective"].to_numpy() - cell["regularised_objective"].to_numpy()).mean()
    assert np.isclose(metrics["methods"]["soup"]["msdda_minus"]["0.5,0.5"]["regularised_objective"]["mean"],
                      difference)
    # each adapter against its step optimum: the implied beta is its terminal gain over the base / (2 KL), the sum
    # of its step gains (the tweedie values' rises over each step)
    check = {c["reward"]: c for c in metrics["step_optimum"]}
    single = table[(table.method == "single") & (table["w:world-aesthetic"] == 1.0)]
    base = table[table.method == "base"]
    gain = single["world-aesthetic"].to_numpy() - base["world-aesthetic"].to_numpy()
    assert set(check) == set(REWARDS) and check["world-aesthetic"]["beta"] == 0.01
    assert np.isclose(check["world-aesthetic"]["implied_beta"], gain.mean() / (2 * single["kl_to_base"].mean()))
    assert "implied beta" in text
    best = metrics["best"]["regularised_objective"]["0.5,0.5"]
    assert f"**{metrics['methods'][best]['regularised_objective']['0.5,0.5']['mean']:.4g}" in text


def test_report_refuses_a_sweep_from_before_kl_accounting(sweep_folder: Path, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in ("manifest.json", "sweep.yaml"):
        (old / name).write_text((sweep_folder / name).read_text())
    pd.read_csv(sweep_folder / "results.csv").drop(columns=["kl_to_base"]).to_csv(old / "results.csv", index=False)
    with pytest.raises(UserError, match=r"before KL accounting .*run msdda sweep with output_dir="):
        build_report(old)


def test_report_cli_names_a_missing_sweep(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "run msdda sweep" in capsys.readouterr().err
