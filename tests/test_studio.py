"""msdda studio's logic without a browser: a render is the pipeline's own samples, scores and KLs; bad input is
a UserError with a message; a sweep's plot maps clicks to cells; the CLI refuses bad arguments before loading."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from msdda.cli import main
from msdda.config import load_config
from msdda.errors import UserError
from msdda.fuse import MSDDAPipeline
from msdda.rewards import load_reward
from msdda.studio.core import Studio, format_kl
from msdda.testing import random_world_adapter
from msdda.world.data import PromptError

STEPS = 2
PROMPT = "a blue square at the top"
REWARDS = ["world-aesthetic", "world-consistency"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("studio_adapters")
    return [random_world_adapter(root / "a", 1, num_inference_steps=STEPS),
            random_world_adapter(root / "b", 2, num_inference_steps=STEPS),
            random_world_adapter(root / "c", 3, beta=0.04, num_inference_steps=STEPS)]


@pytest.fixture(scope="module")
def studio(adapters) -> Studio:
    return Studio.load("world", [str(a) for a in adapters[:2]], rewards=REWARDS, device="cpu")


def test_a_render_is_the_pipelines_samples_with_their_scores_and_kls(studio: Studio) -> None:
    shown = studio.render([0.3, 0.7], "msdda", steps=STEPS, guidance=3.0, seed=5, prompt=PROMPT)
    output = studio.pipeline([PROMPT] * 4, weights=[0.3, 0.7], num_inference_steps=STEPS, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(5), output_type="pt", return_kl=True)
    expected = studio.pipeline.image_processor.postprocess(output.images, output_type="pil",
                                                           do_denormalize=[False] * 4)
    assert len(shown.samples) == 4
    for index, sample in enumerate(shown.samples):
        assert np.array_equal(np.asarray(sample.image), np.asarray(expected[index]))
        assert sample.kl_to_base == pytest.approx(float(output.kl_to_base[index]), rel=1e-6)
        assert sample.kl_to_base > 0
    for reward_name in REWARDS:
        scores = load_reward(reward_name)(output.images, [PROMPT] * 4)
        assert [s.scores[reward_name] for s in shown.samples] == pytest.approx(scores.tolist(), rel=1e-5)
    moved = studio.render([0.9, 0.1], "msdda", steps=STEPS, guidance=3.0, seed=5, prompt=PROMPT)
    assert not np.array_equal(np.asarray(moved.samples[0].image), np.asarray(shown.samples[0].image))
    table = shown.table().splitlines()
    assert table[0] == "|  | #1 | #2 | #3 | #4 |" and table[2].startswith("| world-aesthetic | ")
    assert table[-1] == "| path KL to base | " + " | ".join(f"{s.kl_to_base:.4g}" for s in shown.samples) + " |"


def test_the_base_has_no_kl_to_itself_and_code_none_at_all(studio: Studio) -> None:
    base = studio.render([0.5, 0.5], "base", steps=STEPS, prompt=PROMPT)
    assert all(sample.kl_to_base == 0 for sample in base.samples)
    code = studio.render([0.5, 0.5], "code", steps=STEPS, prompt=PROMPT, code_candidates=2, code_block=2)
    assert all(math.isnan(sample.kl_to_base) for sample in code.samples)
    assert code.table().endswith("| path KL to base | n/a | n/a | n/a | n/a |") and format_kl(0.25) == "0.25"


@pytest.mark.parametrize("change, message", [
    (dict(weights=[0.0, 0.0]), "all zero"),
    (dict(weights=[0.5]), "1 weights for 2 adapters"),
    (dict(weights=[-0.5, 1.0]), ">= 0"),
    (dict(method="blend"), "not one of"),
    (dict(beta=0.0), "beta must be > 0 .* the adapters' are \\[0.01, 0.01\\]"),
    (dict(steps=0), "steps must be"),
    (dict(guidance=-1.0), "guidance must be"),
    (dict(prompt="  "), "prompt is empty"),
    (dict(prompt="a dog in the park"), "world's grammar"),
])
def test_bad_input_is_a_user_error_that_names_it(studio: Studio, change: dict, message: str) -> None:
    settings = dict(weights=[0.5, 0.5], method="msdda", steps=STEPS, prompt=PROMPT) | change
    with pytest.raises(UserError, match=message):
        studio.render(**settings)
    with pytest.raises(PromptError):
        studio.render([0.5, 0.5], steps=STEPS, prompt="a pink circle on the left")


@pytest.mark.parametrize("method", ["msdda", "code"])
def test_a_render_with_its_kls_deferred_shows_the_same_grid_and_then_the_same_kls(studio: Studio,
                                                                                 method: str) -> None:
    settings = dict(steps=STEPS, guidance=3.0, seed=5, prompt=PROMPT, code_candidates=2, code_block=2)
    whole = studio.render([0.3, 0.7], method, **settings)
    quick = studio.render([0.3, 0.7], method, defer_kl=True, **settings)
    assert [np.asarray(s.image).tolist() for s in quick.samples] == [np.asarray(s.image).tolist()
                                                                     for s in whole.samples]
    assert [s.scores for s in quick.samples] == [s.scores for s in whole.samples]
    if method == "code":  # no Gaussian kernel: nothing to measure, the NaNs come at once
        assert not quick.kl_pending and all(math.isnan(s.kl_to_base) for s in quick.samples)
        return
    assert quick.kl_pending and [s.kl_to_base for s in quick.samples] == [None] * 4
    assert "| path KL to base | … | … | … | … |" in quick.table()
    measured = quick.with_kl()
    assert not measured.kl_pending and measured.kl_seconds > 0
    assert [s.kl_to_base for s in measured.samples] == [s.kl_to_base for s in whole.samples]


def test_unequal_betas_without_a_beta_fuse_at_the_weights_mean_of_the_betas(adapters) -> None:
    equal = MSDDAPipeline.from_pretrained("world", adapters=[str(adapters[0])])
    unequal = Studio.load("world", [str(adapters[0]), str(adapters[2])], rewards=REWARDS, device="cpu")
    weights = [0.25, 0.75]
    implied = unequal.render(weights, steps=STEPS, prompt=PROMPT)  # betas 0.01 and 0.04, no beta given
    given = unequal.render(weights, beta=0.25 * 0.01 + 0.75 * 0.04, steps=STEPS, prompt=PROMPT)
    assert [s.image.tobytes() for s in implied.samples] == [s.image.tobytes() for s in given.samples]
    with pytest.raises(UserError, match="one reward per adapter"):
        Studio(equal, [])


def test_a_sweeps_plot_maps_clicks_to_its_cells(adapters, tmp_path) -> None:
    from msdda.studio.sweep import SweepView
    from msdda.sweep.config import SweepConfig
    from msdda.sweep.run import Sweep

    folder = tmp_path / "sweep"
    Sweep(load_config(SweepConfig, None, [
        f"adapters=[{adapters[0]},{adapters[1]}]", f"rewards={REWARDS}", "weights=3", "methods=[msdda, base]",
        f"prompts=[{PROMPT}]", "seeds='0'", "batch_size=1", "grid_prompts=1", f"output_dir={folder}"])).run()
    view = SweepView(folder, tmp_path / "pareto.png")
    assert [cell.name for cell in view.cells] == ["msdda at w = 0,1", "msdda at w = 0.5,0.5", "msdda at w = 1,0",
                                                 "base at w = 0.5,0.5"]
    from PIL import Image

    width, height = Image.open(view.plot).size
    for cell in view.cells:
        assert 0 < cell.pixel[0] < width and 0 < cell.pixel[1] < height and cell.strip.is_file()
    middle = view.cells[1]
    assert view.nearest(middle.pixel[0] + 3, middle.pixel[1] - 3) in (middle, view.cells[3])  # base may lie close
    assert view.nearest(-500, -500) is None
    assert view.cell(middle.name) is middle and "mean world-aesthetic" in view.describe(middle)
    with pytest.raises(UserError, match="no cell"):
        view.cell("soup at w = 1,0")


def test_the_cli_refuses_bad_arguments_before_loading_a_model(adapters, tmp_path, capsys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(MSDDAPipeline, "from_pretrained", refuse)
    good = str(adapters[0])
    cases = [
        (["--adapter", str(tmp_path / "missing")], "neither a folder nor a Hub repo id"),
        (["--adapter", "world:nonesuch"], "no reference adapter 'world:nonesuch' ships with msdda"),
        (["--adapter", good, "--sweep", str(tmp_path)], "holds no manifest.json"),
        (["--adapter", good, "--reward", "world-aesthetic", "--reward", "world-thirds"], "2 --reward for 1"),
        (["--adapter", good, "--betas", "x"], "comma-separated numbers"),
        (["--adapter", good, "--port", "70000"], "is not a port"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--adapter", good, "--device", "cuda"], "asks for a GPU"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases.append((["--adapter", good, "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"))
        for extra, message in cases:
            assert main(["studio", *extra]) == 2
            assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["studio", "--help"])
    assert "loopback (127.0.0.1) only" in capsys.readouterr().out
