"""Every command's bad input, as a user would type it: one line on stderr naming the bad value (and the fix),
a non-zero exit, nothing written, and no model loaded.

The CLI runs in this process (``msdda.cli.main``) with every model loader tripped: diffusers' pipeline and model
``from_pretrained`` and transformers' raise :class:`ModelLoaded`, a BaseException no code catches, so a case whose
check comes after a model loads fails loudly. Each case runs in its own folder, compared file by file before and
after.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from msdda.adapters import METADATA_FILE, WEIGHTS_FILE, shipped_adapters
from msdda.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "configs/train/world_aesthetic.yaml")


class ModelLoaded(BaseException):
    """Raised by every model loader during these tests: the input should have been refused before."""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def tripped(*args, **kwargs):
        raise ModelLoaded(f"a model loaded ({args[:1]}) before the bad input was refused")

    for owner in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(tripped))


# ---------------------------------------------------------------------------------------------- inputs on disk
def shipped(folder: Path, name: str = "aesthetic", copy: str | None = None) -> Path:
    """A copy of a shipped reference adapter, to spoil."""
    target = folder / (copy or name)
    shutil.copytree(shipped_adapters()[f"world:{name}"], target)
    return target


def truncated_adapter(folder: Path) -> None:
    """The issue's case: ``truncate -s 5000 bad_adapter/pytorch_lora_weights.safetensors``."""
    adapter = shipped(folder, copy="bad_adapter")
    with open(adapter / WEIGHTS_FILE, "r+b") as weights:
        weights.truncate(5000)


def adapter_without_lora(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    adapter = shipped(folder)
    save_file({"unet.conv_in.weight": torch.zeros(2)}, adapter / WEIGHTS_FILE)


def malformed_metadata(folder: Path) -> None:
    adapter = shipped(folder)
    (adapter / METADATA_FILE).write_text('{"reward_name": "x",\n  "beta" 0.1}')


def flow_adapter(folder: Path) -> None:
    adapter = shipped(folder, "thirds")
    metadata = json.loads((adapter / METADATA_FILE).read_text())
    metadata.update(pipeline_class="StableDiffusion3Pipeline", base_model="world-flow")
    (adapter / METADATA_FILE).write_text(json.dumps(metadata))


def file(name: str, text: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return write


def earlier_fuse(folder: Path) -> None:
    (folder / "o").mkdir()
    for name in ("p000_s0000.png", "grid.png", "settings.json"):
        (folder / "o" / name).write_text("")


def finished_without_checkpoints(folder: Path) -> None:
    (folder / "run").mkdir()


def another_run(folder: Path) -> None:
    file("run/run_config.yaml", "epochs: 1\n")(folder)


def nothing(folder: Path) -> None:
    pass


FUSE = ["fuse", "--prompt", "a blue square in the center", "--out", "out"]
TRAIN = ["train", "--config", RECIPE, "output_dir=run"]
CASES = [
    # fuse: the cases
    ("fuse-truncated-adapter", truncated_adapter,
     ["fuse", "--adapter", "world:aesthetic", "--adapter", "bad_adapter", "--weights", "0.3,0.7", "--prompt", "x",
      "--seeds", "0-1", "--out", "o"], ["bad_adapter", "truncated or corrupted"]),
    ("fuse-yaml-syntax", file("bad.yaml", "seeds: 0-1\nweights: [1.0\nout: x\n"),
     ["fuse", "--config", "bad.yaml"], ["bad.yaml, line 3, column 4", "line 2, column 10"]),
    ("fuse-missing-prompts-file", nothing, ["fuse", "--adapter", "world:aesthetic", "--prompts-file", "nope.txt"],
     ["'nope.txt' does not exist"]),
    ("fuse-out-holds-another-run", earlier_fuse,
     ["fuse", "--adapter", "world:aesthetic", "--prompt", "x", "--seeds", "0", "--out", "o"], ["'o'", "--overwrite"]),
    ("fuse-flow-adapter-without-base", flow_adapter, [*FUSE, "--adapter", "thirds"], ["--base world-flow"]),
    # fuse: what else a user tries
    ("fuse-adapter-without-lora", adapter_without_lora, [*FUSE, "--adapter", "aesthetic"], ["no LoRA weights"]),
    ("fuse-adapter-metadata-not-json", malformed_metadata, [*FUSE, "--adapter", "aesthetic"],
     ["msdda_adapter.json, line 2, column 10"]),
    ("fuse-unknown-shipped-adapter", nothing, [*FUSE, "--adapter", "world:aesthetics"], ["'world:aesthetics'"]),
    ("fuse-missing-adapter", nothing, [*FUSE, "--adapter", "runs/nope/final"], ["'runs/nope/final'"]),
    ("fuse-weights-count", nothing, [*FUSE, "--adapter", "world:aesthetic", "--weights", "0.3,0.7"],
     ["[0.3, 0.7]", "one weight per adapter"]),
    ("fuse-weights-not-numbers", nothing, [*FUSE, "--adapter", "world:aesthetic", "--weights", "0.3;0.7"],
     ["'0.3;0.7'"]),
    ("fuse-negative-weight", nothing, [*FUSE, "--adapter", "world:aesthetic", "--weights", "-1"], ["-1"]),
    ("fuse-seeds", nothing, [*FUSE, "--adapter", "world:aesthetic", "--seeds", "0..3"], ["'0..3'"]),
    ("fuse-steps-not-integer", nothing, [*FUSE, "--adapter", "world:aesthetic", "--steps", "ten"], ["'ten'"]),
    ("fuse-unknown-method", nothing, [*FUSE, "--adapter", "world:aesthetic", "--method", "mean"], ["'mean'"]),
    ("fuse-mistyped-flag", nothing, [*FUSE, "--adpater", "world:aesthetic"], ["--adpater"]),
    ("fuse-no-prompt", nothing, ["fuse", "--adapter", "world:aesthetic"], ["--prompt"]),
    ("fuse-no-adapter", nothing, FUSE, ["--adapter"]),
    ("fuse-config-missing", nothing, ["fuse", "--config", "fuse.yml"], ["fuse.yml"]),
    ("fuse-config-unknown-key", file("fuse.yaml", "adapter: [world:aesthetic]\n"), ["fuse", "--config", "fuse.yaml"],
     ["unknown config key adapter"]),
    ("fuse-bad-device", nothing, [*FUSE, "--adapter", "world:aesthetic", "--device", "gpu0"], ["'gpu0'"]),
    ("fuse-code-without-rewards", nothing, [*FUSE, "--adapter", "world:aesthetic", "--method", "code"], ["--reward"]),
    ("fuse-out-is-a-file", file("out", "x"), [*FUSE, "--adapter", "world:aesthetic"], ["'out' is a file"]),
    # train
    ("train-yaml-syntax", file("bad.yaml", "epochs: 2\nreward:\n  name: [world-aesthetic\n"),
     ["train", "--config", "bad.yaml"], ["bad.yaml, line 4"]),
    ("train-unknown-key", nothing, [*TRAIN, "epoch=2"], ["epoch"]),
    ("train-wrong-type", nothing, [*TRAIN, "epochs=two"], ["'two'"]),
    ("train-override-not-yaml", nothing, [*TRAIN, "lora.target_modules=[to_q"], ["lora.target_modules=[to_q"]),
    ("train-override-without-value", nothing, [*TRAIN, "epochs"], ["'epochs'"]),
    ("train-missing-prompts-file", nothing, [*TRAIN, "prompts=nope.txt"], ["'nope.txt'"]),
    ("train-config-missing", nothing, ["train", "--config", "configs/train/world_aesthetc.yaml"],
     ["world_aesthetc.yaml"]),
    ("train-output-dir-holds-another-run", another_run, TRAIN, ["run", "resume=latest"]),
    ("train-resume-without-checkpoint", finished_without_checkpoints, [*TRAIN, "--resume"], ["run", "checkpoint"]),
    ("train-unknown-reward", nothing, [*TRAIN, "reward.name=aesthetics"], ["'aesthetics'"]),
    ("train-unknown-scheduler", nothing, [*TRAIN, "sampling.scheduler=euler"], ["'euler'"]),
    ("train-mistyped-flag", nothing, ["train", "--resume-from", "run"], ["--resume-from"]),
    # evaluate
    ("evaluate-missing-adapter", nothing, ["evaluate", "runs/nope/final"], ["'runs/nope/final'"]),
    ("evaluate-truncated-adapter", truncated_adapter, ["evaluate", "bad_adapter"], ["bad_adapter", "truncated"]),
    ("evaluate-missing-prompts", nothing, ["evaluate", "world:aesthetic", "--prompts", "nope.txt"], ["'nope.txt'"]),
    ("evaluate-no-prompts", nothing, ["evaluate", "world:aesthetic", "--num-prompts", "0"], ["--num-prompts", "0"]),
    ("evaluate-seeds", nothing, ["evaluate", "world:aesthetic", "--seeds", "a-b"], ["'a-b'"]),
    ("evaluate-unknown-reward", nothing, ["evaluate", "world:aesthetic", "--reward", "aesthetic"], ["'aesthetic'"]),
    ("evaluate-reward-module-missing", nothing, ["evaluate", "world:aesthetic", "--reward", "my_rewards:Warmth"],
     ["my_rewards:Warmth"]),
    ("evaluate-reward-kwargs-not-mapping", nothing, ["evaluate", "world:aesthetic", "--reward-kwargs", "[1]"],
     ["'[1]'"]),
    ("evaluate-bad-device", nothing, ["evaluate", "world:aesthetic", "--device", "gpu0"], ["'gpu0'"]),
    # sweep
    ("sweep-yaml-syntax", file("sweep.yaml", "methods: [msdda, soup\n"), ["sweep", "--config", "sweep.yaml"],
     ["sweep.yaml, line 2"]),
    ("sweep-unknown-method", nothing, ["sweep", "--config", str(ROOT / "configs/sweep/world.yaml"),
                                       "methods=[msdda,mean]", "output_dir=sweep"], ["mean"]),
    ("sweep-missing-prompts", nothing, ["sweep", "--config", str(ROOT / "configs/sweep/world.yaml"),
                                        "prompts=nope.txt", "output_dir=sweep"], ["'nope.txt'"]),
    ("sweep-seeds", nothing, ["sweep", "--config", str(ROOT / "configs/sweep/world.yaml"), "seeds=0..3",
                              "output_dir=sweep"], ["'0..3'"]),
    ("sweep-missing-adapter", nothing, ["sweep", "adapters=[runs/nope/final]", "output_dir=sweep"], ["'runs/nope/final'"]),
    ("sweep-config-missing", nothing, ["sweep", "--config", "configs/sweep/wrld.yaml"], ["wrld.yaml"]),
    # report
    ("report-missing-folder", nothing, ["report", "runs/sweep_nope"], ["runs/sweep_nope"]),
    ("report-not-a-sweep", file("notes/a.txt", "x"), ["report", "notes"], ["notes"]),
    ("report-reference-point", nothing, ["report", "runs/sweep_nope", "--reference-point", "0.1,x"], ["'0.1,x'"]),
    # studio
    ("studio-truncated-adapter", truncated_adapter, ["studio", "--adapter", "bad_adapter"], ["bad_adapter"]),
    ("studio-port", nothing, ["studio", "--port", "70000"], ["70000"]),
    ("studio-rewards-count", nothing, ["studio", "--reward", "world-aesthetic"], ["1 --reward", "3 adapters"]),
    ("studio-missing-sweep", nothing, ["studio", "--sweep", "runs/sweep_nope"], ["runs/sweep_nope"]),
    ("studio-bad-device", nothing, ["studio", "--device", "gpu0"], ["'gpu0'"]),
    # push
    ("push-truncated-adapter", truncated_adapter, ["push", "bad_adapter", "user/warmth"], ["bad_adapter", "truncated"]),
    ("push-not-an-adapter", file("notes/a.txt", "x"), ["push", "notes", "user/warmth"], ["notes"]),
    # world
    ("world-pretrain-out-not-empty", file("w/x.txt", "x"), ["world", "pretrain", "--out", "w"], ["w", "--overwrite"]),
    ("world-pretrain-negative-steps", nothing, ["world", "pretrain", "--out", "w", "--layout-steps", "-1"], ["-1"]),
    ("world-sample-outside-grammar", nothing, ["world", "sample", "--prompt", "a pink hexagon", "--out", "g.png"],
     ["pink"]),
    ("world-sample-no-images", nothing, ["world", "sample", "--prompt", "a red circle on the left", "--n", "0",
                                         "--out", "g.png"], ["--n", "0"]),
    ("world-sample-no-prompt", nothing, ["world", "sample", "--out", "g.png"], ["--prompt"]),
    ("world-unknown-command", nothing, ["world", "smaple"], ["'smaple'"]),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup, argv, named", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_it_before_any_model_loads(setup, argv, named, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MSDDA_CACHE", str(tmp_path / ".cache"))
    setup(tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    error = capsys.readouterr().err
    assert code not in (0, None), f"exit {code}; stderr: {error}"
    assert error.count("\n") == 1 and error.startswith("msdda"), f"not one line:\n{error}"
    for value in named:
        assert value in error, f"{value!r} not named in: {error}"
    assert _files(tmp_path) == before, "the command wrote files though its input was refused"


def test_every_command_has_cases() -> None:
    commands = {case[2][0] for case in CASES}
    assert commands >= {"fuse", "train", "evaluate", "sweep", "report", "studio", "world", "push"}
