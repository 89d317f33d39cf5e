"""Speed of getting to the step optimum: wall time and reward calls until the optimality gauge reads the adapter within
a tolerance of its optimum, the state-replay mode against today's on-policy pathwise recipe, both in this run.

    .venv/bin/python benchmarks/optimum_speed.py [--beta 0.004] [--tolerance 0.1] [--max-epochs 40] [--gauge-every 2]

Both train the world's aesthetic recipe (configs/train/world_aesthetic.yaml: pathwise through the tweedie step reward)
at ``--beta`` with a gauge every ``--gauge-every`` epochs (8 prompts, 2 draws, states from the reference and the
adapter) and stop at the first gauge within ``--tolerance`` (``train.stop_near_optimum``), or after
``--max-epochs``. On-policy is the recipe as it is (a fresh rollout per update, the rollout's own noise). State replay
adds ``train.fresh_noise``, half the states from the reference, ``--inner-epochs`` updates per state, a higher
learning rate with a cosine schedule (the settings below). Wall time is the training epochs' (the gauges are
measurement and not counted); reward calls are the images the reward scores: one per sampled trajectory and one per
trained transition (the tweedie step reward), the gauges' again not counted. Ratios are printed last.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/train/world_aesthetic.yaml"


def _modes(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        "on-policy": [],
        "state replay": ["train.fresh_noise=true", "train.reference_states=0.5", f"train.inner_epochs={args.inner_epochs}",
                         f"train.learning_rate={args.replay_learning_rate}", "train.lr_schedule=cosine"],
    }


def reward_calls(config: TrainConfig, epochs: int) -> int:
    """Images the reward scored in ``epochs`` epochs: every sampled trajectory's final image, and one per trained
    transition (each update's tweedie step reward)."""
    trajectories = config.sampling.batch_size * config.sampling.batches_per_epoch
    return epochs * trajectories * (1 + config.train.inner_epochs * config.trained_steps)


def run(mode: list[str], args: argparse.Namespace) -> dict:
    """Train until the gauge is within the tolerance (or ``--max-epochs``); what it took."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(TrainConfig, RECIPE, [
            f"beta={args.beta}", f"epochs={args.max_epochs}", f"train.gauge_every={args.gauge_every}",
            "train.gauge_prompts=8", f"train.stop_near_optimum={args.tolerance}", "sample_every=0", "log_with=null",
            f"checkpoint.every={args.max_epochs}", f"output_dir={folder}/run", *mode])
        trainer = Trainer(config)
        trainer.run()
        history = trainer.history
    gauged = [h for h in history if "gauge_max_ratio_deviation" in h]
    last = gauged[-1] if gauged else {}
    return {"epochs": len(history), "seconds": sum(h["epoch_seconds"] for h in history),
            "reward_calls": reward_calls(config, len(history)),
            "reached": last.get("gauge_max_ratio_deviation") is not None
            and last["gauge_max_ratio_deviation"] <= args.tolerance,
            "deviations": [(h["epoch"], h["gauge_max_ratio_deviation"], h["gauge_implied_beta"]) for h in gauged]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beta", type=float, default=0.004)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--gauge-every", type=int, default=2)
    parser.add_argument("--inner-epochs", type=int, default=4)
    parser.add_argument("--replay-learning-rate", type=float, default=1e-2)
    args = parser.parse_args()
    results = {name: run(mode, args) for name, mode in _modes(args).items()}
    for name, result in results.items():
        verdict = "reached" if result["reached"] else "did not reach"
        print(f"{name}: {verdict} the tolerance {args.tolerance} after {result['epochs']} epochs, "
              f"{result['seconds']:.0f} s of training, {result['reward_calls']} reward calls; gauges (epoch, worst "
              f"|ratio - 1|, implied beta): {result['deviations']}")
    replay, policy = results["state replay"], results["on-policy"]
    reached = [name for name, result in results.items() if result["reached"]]
    verdict = {0: "neither reached the tolerance", 2: "both reached the tolerance"}.get(
        len(reached), f"only {reached[0] if reached else ''} reached the tolerance")
    print(f"state replay / on-policy: wall time {replay['seconds'] / policy['seconds']:.2f}x, reward calls "
          f"{replay['reward_calls'] / policy['reward_calls']:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
