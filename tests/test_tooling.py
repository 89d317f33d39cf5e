"""The command line's first lines, and the packaging and CI wiring."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.launch_scripts import commands_of

ROOT = Path(__file__).resolve().parents[1]


def test_a_command_prints_its_own_error_and_no_torchvision_warning(tmp_path) -> None:
    """diffusers imports CLIPImageProcessor and SiglipImageProcessor, which transformers 5 without torchvision
    answered with two warnings ahead of everything msdda printed."""
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: two\n")
    result = subprocess.run([sys.executable, "-m", "msdda.cli", "train", "--config", str(config)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("msdda: error: epochs must be an integer, got 'two'"), result.stderr
    assert "torchvision" not in result.stderr


def test_the_filter_drops_only_the_two_fallback_warnings_diffusers_causes() -> None:
    import msdda

    quiet = msdda._DiffusersImageProcessorFallback()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, __file__, 1, message, None, None)

    fallback = ("`{0}` requires torchvision (not installed); falling back to `{0}Pil` for backward compatibility. "
                "Install torchvision to use the default backend, or import `{0}Pil` directly to silence this warning.")
    assert not quiet.filter(record(fallback.format("CLIPImageProcessor")))
    assert not quiet.filter(record(fallback.format("SiglipImageProcessor")))
    assert quiet.filter(record(fallback.format("ViTImageProcessor")))
    assert quiet.filter(record("Could not import module 'CLIPModel'."))


def test_the_fast_tier_leaves_out_the_slow_deepspeed_and_browser_tiers_and_ci_runs_the_last_two() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow and not deepspeed and not browser'" in options["addopts"]
    assert {marker.split(":")[0] for marker in options["markers"]} == {"slow", "deepspeed", "browser"}
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/install.sh" in ci and "pytest -q -m deepspeed" in ci and "pytest -q -m browser" in ci
    # the README's two commands in the order a new user runs them: the demo fills runs/, then the tests run
    assert ci.index("bash scripts/install.sh") < ci.index("bash launch/demo.sh") < ci.index("pytest -q")


def test_the_demo_writes_where_the_recipes_and_the_world_configs_look(tmp_path) -> None:
    """The natural next command after the demo (msdda fuse/sweep --config configs/.../world.yaml, or a recipe's
    own output folder) finds the demo's adapters."""
    from msdda.config import load_config
    from msdda.fuse.cli import FuseConfig
    from msdda.sweep.config import SweepConfig
    from msdda.train import TrainConfig

    commands = commands_of("launch/demo.sh", tmp_path)
    assert [c[0] for c in commands] == ["train", "train", "sweep", "report"]
    adapters = []
    for command in commands[:2]:
        recipe = load_config(TrainConfig, ROOT / command[command.index("--config") + 1])
        assert f"output_dir={recipe.output_dir}" in command
        adapters.append(f"{recipe.output_dir}/final")
    sweep = load_config(SweepConfig, ROOT / "configs/sweep/world.yaml")
    assert [str(a) for a in load_config(FuseConfig, ROOT / "configs/fuse/world.yaml").adapters] == adapters
    assert [str(a) for a in sweep.adapters] == adapters
    assert f"adapters=[{','.join(adapters)}]" in commands[2] and f"output_dir={sweep.output_dir}" in commands[2]
    assert commands[3] == ["report", str(sweep.output_dir)]


def test_deepspeed_says_nothing_about_using_the_cpu_after_msdda_is_imported() -> None:
    """Accelerate imports DeepSpeed (installed by scripts/install.sh) on every run; on a CPU machine DeepSpeed
    then warned that it uses the CPU, ahead of every training run's output."""
    import pytest
    import torch

    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU here and has nothing to say about the CPU")
    probe = "from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)"
    plain = subprocess.run([sys.executable, "-c", f"import deepspeed; {probe}"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert "Setting accelerator to CPU" in plain.stdout + plain.stderr  # the notice this test is about exists
    quiet = subprocess.run([sys.executable, "-c", f"import msdda, deepspeed; {probe}"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert quiet.stdout.strip() == "cpu" and "Setting accelerator" not in quiet.stderr, quiet.stdout + quiet.stderr
