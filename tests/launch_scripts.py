"""Run a launch script with a stand-in msdda that only records the commands it would run, in a copy of launch/
under a temporary folder: the scripts write relative to the folder above their own, so the copy's runs/ (empty)
is the one they look in, and what a user's runs/ holds (the demo's adapters, which the scripts skip retraining)
does not change what the tests see."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from msdda.config import load_config
from msdda.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "commands_of", "train_config", "budget"]


def commands_of(script: str, tmp_path: Path, *arguments: str) -> list[list[str]]:
    """The msdda commands ``script`` (a path under launch/) runs with ``arguments`` from a checkout whose runs/ is
    empty, with no yardstick."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "launch", checkout / "launch")
    log = tmp_path / "commands.txt"
    fake = tmp_path / "msdda"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\t" "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(checkout / script), *arguments], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "MSDDA": str(fake), "PYTHON": "/bin/true"})
    assert result.returncode == 0, result.stderr
    assert not (checkout / "runs").exists(), "the stand-in msdda writes nothing"
    return [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]


def train_config(command: list[str]) -> TrainConfig:
    """The config a recorded ``msdda train`` command would run (without --resume)."""
    start = command.index("--config") + 1
    return load_config(TrainConfig, ROOT / command[start], [a for a in command[start + 1:] if a != "--resume"])


def budget(config: TrainConfig) -> tuple:
    """What the recipes' shared rule fixes: estimator, step reward and training budget."""
    return (config.train.estimator, config.reward.step_reward, config.epochs, config.sampling.batch_size,
            config.sampling.batches_per_epoch, config.train.learning_rate, config.train.batch_size)
