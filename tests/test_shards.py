"""Sweeps and evaluations under ``accelerate launch`` on 2 CPU processes: the processes share the cells (the sample
batches), resume from the cell files, and give one process's results bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from msdda.cli import main
from msdda.sweep.run import COSTS
from msdda.testing import random_world_adapter

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
STEPS = 3


def _two_processes(*arguments: str) -> None:
    """``msdda`` on 2 CPU processes of one intra-op thread each, as the one-process runs here compute (a reduction
    over more threads sums in another order)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch/accelerate/cpu_2proc.yaml"), "--num_cpu_threads_per_process", "1", "-m",
               "msdda.cli", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=CPU_ONLY, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_a_sweep_and_an_evaluation_on_two_processes_give_one_process_s_results_bit_for_bit(tmp_path,
                                                                                            one_thread) -> None:
    adapters = [random_world_adapter(tmp_path / name, seed, num_inference_steps=STEPS) for name, seed in
                (("a", 1), ("b", 2))]
    sweep = [f"adapters=[{adapters[0]},{adapters[1]}]", "rewards=[world-aesthetic,world-thirds]", "weights=3",
             "methods=[msdda,code,base]", "prompts=[a red circle on the left, a blue square at the top]",
             "seeds='0'", "batch_size=2", "code_candidates=2", "code_block=2", f"num_inference_steps={STEPS}"]
    assert main(["sweep", *sweep, f"output_dir={tmp_path / 'one'}"]) == 0
    one = pd.read_csv(tmp_path / "one/results.csv").drop(columns=list(COSTS))
    # two processes share the cells, one of which a first run left done: they resume from it and do the rest
    (tmp_path / "two/cells").mkdir(parents=True)
    shutil.copy(tmp_path / "one/cells/base_0.5-0.5.csv", tmp_path / "two/cells/base_0.5-0.5.csv")
    done = (tmp_path / "two/cells/base_0.5-0.5.csv").stat().st_mtime_ns
    _two_processes("sweep", *sweep, f"output_dir={tmp_path / 'two'}")
    assert (tmp_path / "two/cells/base_0.5-0.5.csv").stat().st_mtime_ns == done
    two = pd.read_csv(tmp_path / "two/results.csv").drop(columns=list(COSTS))
    pd.testing.assert_frame_equal(one, two, check_exact=True)

    evaluate = [str(adapters[0]), "--reward", "world-aesthetic", "--reward", "world-thirds", "--num-prompts", "2",
                "--seeds", "0-2", "--gauge-prompts", "0"]
    assert main(["evaluate", *evaluate, "--out", str(tmp_path / "eval_one")]) == 0
    _two_processes("evaluate", *evaluate, "--out", str(tmp_path / "eval_two"))
    report_one, report_two = (json.loads((tmp_path / folder / "evaluation.json").read_text())
                              for folder in ("eval_one", "eval_two"))
    assert report_one == report_two and report_one["samples"] == 6
