"""The three-reward job on the embedded world: launch/world3.sh trains three adapters at three betas and
oracles that match the sweep's objective, configs/sweep/world3.yaml covers the simplex and beyond, and the
world's evaluation selects by each of the three rewards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msdda.config import load_config
from msdda.sweep.config import SweepConfig
from msdda.sweep.grid import weight_key
from msdda.train import TrainConfig
from msdda.utils import parse_seeds
from msdda.world.evaluate import _selection
from tests.launch_scripts import budget, commands_of, train_config

ROOT = Path(__file__).resolve().parents[1]


def test_world3_trains_three_betas_and_oracles_on_the_sweeps_objective(tmp_path: Path) -> None:
    commands = commands_of("launch/world3.sh", tmp_path)
    assert [c[0] for c in commands] == ["train"] * 6 + ["sweep", "report"]
    singles = [train_config(c) for c in commands[:3]]
    oracles = [train_config(c) for c in commands[3:6]]
    assert [c.reward.name for c in singles] == ["world-aesthetic", "world-consistency", "world-thirds"]
    assert [c.beta for c in singles] == [0.001, 0.0005, 0.002]  # the recipes' own betas, no overrides
    # the demo trains the aesthetic and thirds adapters into the same folders, so world3 after the demo reuses them
    (tmp_path / "demo").mkdir()
    demo = [train_config(c) for c in commands_of("launch/demo.sh", tmp_path / "demo")[:2]]
    assert [(c.output_dir, c.beta, budget(c)) for c in demo] == [(c.output_dir, c.beta, budget(c))
                                                                   for c in (singles[0], singles[2])]
    start = commands[6].index("--config") + 1
    sweep = load_config(SweepConfig, ROOT / commands[6][start], commands[6][start + 1:])
    sweep.validate()
    assert sweep.adapters == [f"{c.output_dir}/final" for c in singles]
    assert sweep.rewards == [c.reward.name for c in singles]
    interior = {weight_key(v) for v in sweep.weights if min(v) > 0 and abs(sum(v) - 1) < 1e-9}
    assert len(interior) >= 10
    assert {weight_key(v) for v in sweep.weights} >= {"1,1,1", "0.2,0.2,0.2"}
    assert {weight_key(SweepConfig.parse_weight_key(k)) for k in sweep.oracles} <= interior
    for oracle, (key, folder) in zip(oracles, sweep.oracles.items()):
        assert oracle.beta == sweep.beta and folder == f"{oracle.output_dir}/final"
        assert oracle.reward.kwargs == {"rewards": sweep.rewards, "weights": list(SweepConfig.parse_weight_key(key))}
    # one estimator, step reward and budget for every adapter and oracle (#19: oracles trained as the adapters)
    assert len({budget(c) for c in singles + oracles}) == 1
    assert commands[7] == ["report", sweep.output_dir]



def test_world3_calibrated_fuses_the_calibrated_adapters_against_the_calibrated_oracles(tmp_path: Path) -> None:
    """--calibrated: each adapter and oracle, once trained, is calibrated at its own beta, and the sweep (with rgg
    among its methods, without CoDe, half the samples) fuses the calibrated copies against the calibrated oracles in a
    folder of its own."""
    commands = commands_of("launch/world3.sh", tmp_path, "--calibrated")
    assert [c[0] for c in commands] == ["train"] * 6 + ["calibrate"] * 6 + ["sweep", "report"]
    trained = [train_config(c).output_dir for c in commands[:6]]
    calibrations = commands[6:12]
    assert [(c[1], c[c.index("--out") + 1]) for c in calibrations] == [(f"{folder}/final", f"{folder}/calibrated")
                                                                       for folder in trained]
    assert all("--beta" not in c for c in calibrations)  # each at the beta it was trained at
    start = commands[12].index("--config") + 1
    sweep = load_config(SweepConfig, ROOT / commands[12][start], commands[12][start + 1:])
    sweep.validate()
    assert sweep.adapters == [f"{folder}/calibrated" for folder in trained[:3]]
    assert sorted(sweep.oracles.values()) == sorted(f"{folder}/calibrated" for folder in trained[3:])
    uncalibrated = load_config(SweepConfig, ROOT / commands[12][start])
    assert set(sweep.methods) == set(uncalibrated.methods) - {"code"} | {"rgg"}  # the Gaussian methods, rgg among them
    assert len(parse_seeds(sweep.seeds)) * sweep.num_prompts == 64
    assert sweep.output_dir.endswith("sweep_world3_calibrated") and commands[13] == ["report", sweep.output_dir]

def test_world_evaluation_selects_the_best_of_each_prompts_samples_by_each_reward() -> None:
    scores = {"a": np.array([[1.0, 0.0], [0.0, 2.0]]), "b": np.array([[0.0, 3.0], [1.0, 0.0]])}
    assert _selection(scores) == {"by_a": {"a": 1.5, "b": 0.0}, "by_b": {"a": 0.0, "b": 2.0},
                                  "random": {"a": 0.75, "b": 1.0}}
