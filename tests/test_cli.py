"""The installed `msdda` console command."""

from __future__ import annotations

import subprocess
import sys

import msdda
from msdda.cli import main


def test_version_flag_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "msdda.cli", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"msdda {msdda.__version__}"


def test_push_refuses_non_adapters_and_says_why_an_upload_failed(tmp_path, capsys, offline) -> None:
    from msdda.testing import random_world_adapter

    assert main(["push", str(tmp_path), "user/adapter"]) == 2
    assert "push the final/ folder" in capsys.readouterr().err
    adapter = random_world_adapter(tmp_path / "adapter", seed=1)
    assert main(["push", str(adapter), "user/adapter", "--token", "hf_invalid"]) == 2
    assert "could not push" in capsys.readouterr().err


def test_sampling_commands_take_a_device_and_refuse_a_bad_one(tmp_path, capsys) -> None:
    """fuse, sweep and evaluate default to the GPU when there is one; a bad name stops with the fix."""
    import pytest
    import torch

    from msdda.diffusion import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for a GPU but torch sees none"):
            resolve_device("cuda")
    from msdda.testing import random_world_adapter

    adapter = random_world_adapter(tmp_path / "adapter", seed=1)
    assert main(["fuse", "--adapter", str(adapter), "--prompt", "a red circle", "--seeds", "0", "--steps", "2",
                 "--device", "gpu0", "--out", str(tmp_path / "fused")]) == 2
    assert "'gpu0' is not a device" in capsys.readouterr().err
    assert main(["fuse", "--adapter", str(adapter), "--prompt", "a red circle", "--seeds", "0", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "fused")]) == 0
    assert (tmp_path / "fused" / "grid.png").is_file()
