"""Trained transitions per second: msdda's trainer (KL on and off) against trl 0.23.1's DDPOTrainer.

    bash scripts/setup_bench_env.sh          # once: trl 0.23.1 in its own virtualenv, .venv-bench
    .venv/bin/python benchmarks/train_throughput.py [--epochs 6] [--steps 10]

Same tiny pipeline (the embedded world), prompt set, reward (world-aesthetic), batch (trajectories per epoch),
gradient steps per epoch (one, by default: train batch 16 with 2 accumulation steps), step count, eta, guidance
and LoRA (rank 4 on to_q/to_k/to_v/to_out.0), 2 CPU threads, on the device Accelerate picks for both (the GPU
when there is one), all measured in this run. A transition is one denoising step of one trajectory that is
sampled, scored and trained on. msdda runs with its update pass (a second forward per trained step, as DDPO)
and with ``train.single_pass`` (training on the sampling forward's graph), each with the KL on and off, and single
pass with the KL on and ``train.compile`` (the sampling pass's forwards compiled). The first epoch of each
is a warm-up and is not counted (it holds torch.compile's compiling); rates are the median over the others. In
msdda's single pass the second epoch is slower too, while the process's heap grows to the graph's peak (page
faults), which the median over five epochs sets aside. trl runs twice: as it is (the baseline of every ratio) and
with its UNet in channels_last, the layout msdda loads, to show what that layout alone is worth, and a third
time with that UNet also through torch.compile (trl has no option for it; the benchmark does it the way
diffusers documents, ``pipe.unet = torch.compile(pipe.unet)``), the fair baseline for ``train.compile``. Prints
the ratios last, against trl as it is and against the compiled trl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer
from msdda.world import world_path
from msdda.world.data import prompt_for, training_combinations

ROOT = Path(__file__).resolve().parents[1]


def ours(beta: float, single_pass: bool, args: argparse.Namespace, compiled: bool = False) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml", [
            f"beta={beta}", f"epochs={args.epochs}", f"sampling.num_inference_steps={args.steps}",
            f"sampling.batch_size={args.batch}", f"sampling.batches_per_epoch={args.batches}",
            f"train.batch_size={args.batch}", f"train.gradient_accumulation_steps={args.accumulation}",
            f"train.single_pass={str(single_pass).lower()}", f"train.compile={str(compiled).lower()}",
            f"sampling.guidance_scale={args.guidance}", "sample_every=0",
            # DDPO's update and trl's LoRA, whatever the world recipe uses
            "train.estimator=policy-gradient", "reward.step_reward=terminal", "train.learning_rate=3e-4",
            "lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
            "log_with=null", f"checkpoint.every={10 * args.epochs}", f"output_dir={folder}/run"])
        trainer = Trainer(config)
        trainer.run()
        return [h["epoch_seconds"] for h in trainer.history]


def trl(args: argparse.Namespace, prompts: list[str], channels_last: bool = False,
        compiled: bool = False) -> list[float]:
    python = Path(args.trl_python)
    if not python.exists():
        raise SystemExit(f"no {python}: run `bash scripts/setup_bench_env.sh` first (trl 0.23.1 in its own venv), "
                         "or pass --trl-python for a Python that has trl 0.23.1")
    result = subprocess.run(
        [str(python), str(ROOT / "benchmarks/_ddpo_trl.py"), "--pipeline", str(world_path()), "--steps",
         str(args.steps), "--batch", str(args.batch), "--batches", str(args.batches), "--epochs", str(args.epochs),
         "--accumulation", str(args.accumulation),
         "--guidance", str(args.guidance), "--prompts", json.dumps(prompts), "--msdda-src", str(ROOT),
         *(["--channels-last"] if channels_last else []), *(["--compile"] if compiled else [])],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"trl's DDPOTrainer failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps (train batches "
                        "per gradient step); single_pass needs batch * accumulation = batch * batches")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-bench/bin/python"),
                        help="a Python with trl 0.23.1 (default: the benchmark virtualenv)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    prompts = [prompt_for(a) for a in training_combinations()]
    transitions = args.batch * args.batches * args.steps
    runs = {"trl DDPOTrainer": lambda: trl(args, prompts),
            # msdda loads its UNet in channels_last; this row shows what that layout alone would give trl
            "trl, UNet in channels_last": lambda: trl(args, prompts, channels_last=True),
            # what train.compile does for msdda, done to trl's UNet by hand (trl has no such option)
            "trl, UNet channels_last + compiled": lambda: trl(args, prompts, channels_last=True, compiled=True)}
    for single_pass in (False, True):
        for beta in (0.01, 0.0):
            name = f"msdda, KL {'on ' if beta else 'off'}, {'single pass' if single_pass else 'update pass'}"
            runs[name] = lambda beta=beta, single_pass=single_pass: ours(beta, single_pass, args)
    runs["msdda, KL on, single pass, compiled"] = lambda: ours(0.01, True, args, compiled=True)
    rates = {}
    for name, run in runs.items():
        seconds = run()[1:]  # the first epoch warms up
        rates[name] = transitions / statistics.median(seconds)
        print(f"{name:>30}: {statistics.median(seconds):6.2f} s/epoch, {rates[name]:7.1f} transitions/s "
              f"(epochs {', '.join(f'{s:.2f}' for s in seconds)})")
    baseline = rates.pop("trl DDPOTrainer")
    print()
    for name, rate in rates.items():
        print(f"ratio {name} / trl: {rate / baseline:.2f}x")
    compiled = rates["trl, UNet channels_last + compiled"]
    print(f"ratio msdda, KL on, single pass, compiled / trl compiled: "
          f"{rates['msdda, KL on, single pass, compiled'] / compiled:.2f}x")


if __name__ == "__main__":
    main()
