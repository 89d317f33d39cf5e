"""The CLI answers at once: ``--help`` of every command and argument errors import no torch, diffusers or other
heavy library, because each command imports them only when it runs (benchmarks/cli_latency.py times the gain).
Checked structurally, on the modules a fresh interpreter holds after answering, not by a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "PIL", "datasets", "gradio", "tqdm")
"""Libraries a command may import when it runs, never to parse its arguments."""
ANSWERED_AT_ONCE = [
    ["--help"], ["--version"], [],
    *([command, "--help"] for command in ("train", "evaluate", "fuse", "sweep", "report", "push", "studio", "world",
                                          "reward")),
    ["reward", "serve", "--help"], ["reward"], ["reward", "serve"], ["reward", "serve", "x", "--port", "http"],
    *(["world", command, "--help"] for command in ("pretrain", "sample", "evaluate", "path")),
    ["fuse", "--adpater", "world:aesthetic"], ["fuse", "--method", "mean"], ["fuse", "--steps", "ten"],
    ["train", "--resume-from", "x"], ["evaluate"], ["report"], ["studio", "--port", "http"], ["world"], ["world", "sample"],
    ["sweeep"],
]
"""Every subcommand's help, and the argument errors argparse answers: a mistyped flag, a value of the wrong type,
a missing argument, a mistyped command."""
PROBE = """
import contextlib, io, json, sys
from msdda.cli import main
heavy = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
    if loaded:
        heavy[" ".join(argv)] = loaded
print(json.dumps(heavy))
"""


def test_help_and_argument_errors_import_no_heavy_library() -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(ANSWERED_AT_ONCE), json.dumps(HEAVY)],
                            capture_output=True, text=True, env=environment, check=True, cwd=ROOT)
    assert json.loads(result.stdout) == {}, f"these answers imported heavy libraries: {result.stdout}"


def test_the_probe_sees_a_heavy_import() -> None:
    """The check above can fail: importing the fusion registry, which a running command does, loads torch."""
    probe = "import sys, msdda.fuse.methods; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "True"
