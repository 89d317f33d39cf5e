"""Trained transitions per second: msdda's trainer (KL on and off) against trl 0.23.1's DDPOTrainer.

    bash scripts/setup_bench_env.sh          # once: trl 0.23.1 in its own virtualenv, .venv-bench
    .venv/bin/python benchmarks/train_throughput.py [--epochs 4] [--steps 10]

Same tiny pipeline (the embedded world), prompt set, reward (world-aesthetic), batch (trajectories per epoch),
step count, eta, guidance and LoRA (rank 4 on to_q/to_k/to_v/to_out.0), 2 CPU threads, on the device Accelerate
picks for both (the GPU when there is one), all measured in this run. A transition is one denoising step of one trajectory that is sampled, scored and trained on. The first
epoch of each is a warm-up and is not counted. Prints the ratios last.
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


def ours(beta: float, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml", [
            f"beta={beta}", f"epochs={args.epochs}", f"sampling.num_inference_steps={args.steps}",
            f"sampling.batch_size={args.batch}", f"sampling.batches_per_epoch={args.batches}",
            f"train.batch_size={args.batch}", f"sampling.guidance_scale={args.guidance}", "sample_every=0",
            # DDPO's update and trl's LoRA, whatever the world recipe uses
            "train.estimator=policy-gradient", "reward.step_reward=terminal", "train.learning_rate=3e-4",
            "lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
            "log_with=null", f"checkpoint.every={10 * args.epochs}", f"output_dir={folder}/run"])
        trainer = Trainer(config)
        trainer.run()
        return [h["epoch_seconds"] for h in trainer.history]


def trl(args: argparse.Namespace, prompts: list[str]) -> list[float]:
    python = Path(args.trl_python)
    if not python.exists():
        raise SystemExit(f"no {python}: run `bash scripts/setup_bench_env.sh` first (trl 0.23.1 in its own venv), "
                         "or pass --trl-python for a Python that has trl 0.23.1")
    result = subprocess.run(
        [str(python), str(ROOT / "benchmarks/_ddpo_trl.py"), "--pipeline", str(world_path()), "--steps",
         str(args.steps), "--batch", str(args.batch), "--batches", str(args.batches), "--epochs", str(args.epochs),
         "--guidance", str(args.guidance), "--prompts", json.dumps(prompts), "--msdda-src", str(ROOT)],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"trl's DDPOTrainer failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-bench/bin/python"),
                        help="a Python with trl 0.23.1 (default: the benchmark virtualenv)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    prompts = [prompt_for(a) for a in training_combinations()]
    transitions = args.batch * args.batches * args.steps
    rates = {}
    for name, run in (("trl DDPOTrainer", lambda: trl(args, prompts)), ("msdda, KL on (beta=0.01)", lambda: ours(0.01, args)),
                      ("msdda, KL off (beta=0)", lambda: ours(0.0, args))):
        seconds = run()[1:]  # the first epoch warms up
        rates[name] = transitions / statistics.median(seconds)
        print(f"{name:>26}: {statistics.median(seconds):6.2f} s/epoch, {rates[name]:7.1f} transitions/s "
              f"(epochs {', '.join(f'{s:.2f}' for s in seconds)})")
    baseline = rates["trl DDPOTrainer"]
    print(f"\nratio KL on  / trl: {rates['msdda, KL on (beta=0.01)'] / baseline:.2f}x")
    print(f"ratio KL off / trl: {rates['msdda, KL off (beta=0)'] / baseline:.2f}x")


if __name__ == "__main__":
    main()
