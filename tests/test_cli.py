"""The installed `msdda` console command."""

from __future__ import annotations

import subprocess
import sys

import msdda


def test_version_flag_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "msdda.cli", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"msdda {msdda.__version__}"
