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


def test_fuse_refuses_a_missing_adapter_and_bad_weights_before_loading_any_model(tmp_path, capsys, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    from msdda.testing import random_world_adapter

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the input was checked")

    adapter = random_world_adapter(tmp_path / "adapter", seed=1)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
    capsys.readouterr()
    cases = {
        ("--adapter", str(tmp_path / "missing")): "is neither a folder nor a Hub repo id",
        ("--adapter", str(tmp_path)): "has no pytorch_lora_weights.safetensors",
        ("--adapter", str(adapter), "--weights", "0.5,0.5"): "has 2 values for 1 adapters",
        ("--adapter", str(adapter), "--weights", "-1"): "weights must be >= 0",
        ("--adapter", str(adapter), "--method", "code"): "give one --reward per adapter",
    }
    for flags, message in cases.items():
        assert main(["fuse", *flags, "--prompt", "a red circle", "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.startswith("msdda: error: ") and message in error and error.count("\n") == 1, error


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch) -> None:
    import pytest

    from msdda import cli
    from msdda.errors import InputNotFound, UserError

    assert issubclass(InputNotFound, FileNotFoundError) and issubclass(UserError, ValueError)

    def buggy(_args):
        raise ValueError("an internal mistake, not the user's")

    parser = cli.build_parser()
    arguments = parser.parse_args(["report", "somewhere"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(arguments, "handler", buggy)
    monkeypatch.setattr(parser, "parse_args", lambda argv: arguments)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["report", "somewhere"])
