"""The embedded world's pipeline: stock diffusers classes, offline round-trip, the shipped weights, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from msdda.world import ASSETS, FLOW, world_path
from msdda.world.models import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)


def _sample(pipeline, seed: int = 0) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(["a red circle on the left", "a blue square at the top"], num_inference_steps=4,
                    guidance_scale=3.0, eta=1.0, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def test_untrained_world_pipeline_round_trips_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    pipeline = StableDiffusionPipeline(vae=build_vae(), text_encoder=build_text_encoder(len(tokenizer)),
                                       tokenizer=tokenizer, unet=build_unet(), scheduler=build_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")), "weights must be safetensors only"
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    torch.testing.assert_close(_sample(reloaded), _sample(pipeline))


def test_shipped_world_loads_offline_and_samples(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = StableDiffusionPipeline.from_pretrained(world_path(), local_files_only=True)
    images = _sample(pipeline)
    assert images.shape == (2, 3, 32, 32) and bool(images.isfinite().all())
    torch.testing.assert_close(_sample(pipeline), images)  # same seed, same pixels


def test_shipped_world_is_small_and_records_how_it_was_made() -> None:
    # the flow world's transformer (assets/flow) is a sibling world with its own budget (tests/test_world_flow.py)
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file() and FLOW not in f.parents)
    assert size < 20 * 2**20, f"the shipped world is {size / 2**20:.1f} MiB; the budget is 20 MiB"
    record = json.loads((ASSETS / "pretraining.json").read_text())
    assert {"command", "config", "wall_seconds", "classifier_test_accuracy"} <= set(record)


def _msdda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msdda.cli", *args], capture_output=True, text=True)


def test_cli_world_path_and_sample(tmp_path) -> None:
    assert _msdda("world", "path").stdout.strip() == str(world_path())
    out = tmp_path / "grid.png"
    result = _msdda("world", "sample", "--prompt", "a green triangle in the center", "--n", "4", "--steps", "4",
                    "--out", str(out))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(out).size == (4 * 32 * 4, 32 * 4)


@pytest.mark.parametrize("prompt", ["", "a zebra"])
def test_cli_refuses_prompts_outside_the_grammar_before_any_work(tmp_path, prompt: str) -> None:
    result = _msdda("world", "sample", "--prompt", prompt, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "grammar" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_pretraining_is_reproducible_from_its_seed_in_one_run_or_two(tmp_path) -> None:
    """A run with the layout phase and a run without it continued by ``--from`` give bit-identical worlds."""
    from safetensors.torch import load_file

    from msdda.world.pretrain import PretrainConfig, continue_layout, pretrain_world

    config = PretrainConfig(num_images=1000, classifier_steps=20, vae_steps=10, unet_steps=20, layout_steps=5)
    first = pretrain_world(tmp_path / "a", config)
    without_layout = pretrain_world(tmp_path / "b", dataclasses.replace(config, layout_steps=0))
    second = continue_layout(without_layout, tmp_path / "c", layout_steps=5)
    for part in ("pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/vae/diffusion_pytorch_model.safetensors",
                 "pipeline/text_encoder/model.safetensors", "classifier/model.safetensors"):
        a, b = load_file(first / part), load_file(second / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for config_file in sorted((first / "pipeline").rglob("*.json")):  # the same configs: no load paths added
        assert (second / config_file.relative_to(first)).read_text() == config_file.read_text(), config_file.name
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(without_layout / unet), load_file(second / unet)
    assert not all(torch.equal(before[k], after[k]) for k in after)  # the layout phase ran
    record = json.loads((second / "pretraining.json").read_text())
    assert record["config"]["layout_steps"] == 5 and record["continued_from"]["config"]["layout_steps"] == 0
    first_record = json.loads((first / "pretraining.json").read_text())
    assert record["classifier_test_accuracy"] == first_record["classifier_test_accuracy"]
    StableDiffusionPipeline.from_pretrained(second / "pipeline", local_files_only=True)


def test_cli_pretrain_from_refuses_bad_input_before_any_work(tmp_path) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    cases = [(["--from", str(tmp_path / "none"), "--layout-steps", "5"], "no pretraining.json"),
             (["--from", str(earlier), "--layout-steps", "5", "--seed", "1"], "leave out --seed")]
    for arguments, message in cases:
        result = _msdda("world", "pretrain", "--out", str(tmp_path / "out"), *arguments)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    (earlier / "pretraining.json").write_text(json.dumps({"config": {"seed": 0, "layout_steps": 600}}))
    result = _msdda("world", "pretrain", "--out", str(tmp_path / "out"), "--from", str(earlier), "--layout-steps", "5")
    assert result.returncode != 0 and "already had 600 layout steps" in result.stderr, result.stderr
    (earlier / "pretraining.json").write_text(json.dumps({"config": {"seed": 0}}))
    result = _msdda("world", "pretrain", "--out", str(tmp_path / "out"), "--from", str(earlier))
    assert result.returncode != 0 and "layout_steps must be 1 or more" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
