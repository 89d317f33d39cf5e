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
