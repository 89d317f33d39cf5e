"""Every example config in configs/ loads into its dataclass and passes its own validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from msdda.config import load_config
from msdda.fuse.config import FuseConfig
from msdda.sweep.config import SweepConfig
from msdda.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_train_recipes_validate(path: Path, tmp_path: Path) -> None:
    prompts = [] if path.stem.startswith("world") else ["prompts=configs/prompts/animals.txt"]  # no Hub here
    config = load_config(TrainConfig, path, prompts)
    config.validate()
    assert config.sampling.eta > 0 and config.reward.name


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_configs_validate(path: Path) -> None:
    load_config(SweepConfig, path).validate()


@pytest.mark.parametrize("path", sorted((CONFIGS / "fuse").glob("*.yaml")), ids=lambda p: p.stem)
def test_fuse_configs_load(path: Path) -> None:
    config = load_config(FuseConfig, path)
    assert len(config.adapters) == 2 and len(config.weights) == 2
