"""An epoch's sampling with its rewards scored at once against scored in a background thread while the next batch
samples (``reward.score_while_sampling``), with a deliberately slow reward.

    python benchmarks/score_while_sampling.py [--batches 4] [--batch-size 8] [--steps 10] [--delay auto] [--repeats 2]

The reward is the world's aesthetic one plus a wait of ``--delay`` seconds per call (``auto``: as long as one
batch's sampling, measured first), standing in for a reward server's answer or a judge on another GPU: time the
sampler's thread does not need. Both modes sample the same trajectories (tests/test_score_while_sampling.py checks
they are equal bit for bit); only ``Trainer.sample`` is timed, the update is the same in both. Prints the sampling
seconds per epoch of each mode, then their ratio last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from msdda.config import load_config
from msdda.rewards import register_reward
from msdda.rewards.world import WorldAesthetic
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DELAY = {"seconds": 0.0}
"""The slow reward's wait per call, set from --delay before any trainer loads it."""


@register_reward("slow-aesthetic")
class SlowAesthetic(WorldAesthetic):
    """world-aesthetic after a wait that holds no CPU (as waiting for a reward server does)."""

    name = "slow-aesthetic"

    def score(self, images, prompts):
        time.sleep(DELAY["seconds"])
        return super().score(images, prompts)


def trainer(output_dir: Path, args: argparse.Namespace, overlap: bool) -> Trainer:
    return Trainer(load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml", [
        "reward.name=slow-aesthetic", "reward.step_reward=terminal", "train.estimator=policy-gradient",
        f"sampling.batch_size={args.batch_size}", f"sampling.batches_per_epoch={args.batches}",
        f"sampling.num_inference_steps={args.steps}", f"train.batch_size={args.batch_size}", "log_with=null",
        "sample_every=0", "train.gauge_prompts=0", f"reward.score_while_sampling={str(overlap).lower()}",
        f"output_dir={output_dir}"]))


def sampling_seconds(run: Trainer, repeats: int) -> float:
    """The median time of ``Trainer.sample`` over ``repeats`` epochs, after one warm-up epoch."""
    run.sample(0)
    times = []
    for epoch in range(1, repeats + 1):
        started = time.perf_counter()
        run.sample(epoch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="sampling batches per epoch (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="trajectories per sampling batch (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, the recipe's)")
    parser.add_argument("--delay", default="auto", help="the reward's wait per call in seconds (default auto: one "
                        "batch's sampling time)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        at_once, overlapped = (trainer(Path(scratch) / name, args, overlap)
                               for name, overlap in (("at_once", False), ("overlapped", True)))
        sampling_only = sampling_seconds(at_once, args.repeats) / args.batches
        DELAY["seconds"] = sampling_only if args.delay == "auto" else float(args.delay)
        print(f"sampling alone: {sampling_only:.3f} s per batch; the reward waits {DELAY['seconds']:.3f} s per call; "
              f"{args.batches} batches per epoch")
        scored_at_once = sampling_seconds(at_once, args.repeats)
        scored_while_sampling = sampling_seconds(overlapped, args.repeats)
    print(f"an epoch's sampling, rewards scored at once:        {scored_at_once:.2f} s")
    print(f"an epoch's sampling, rewards scored while sampling: {scored_while_sampling:.2f} s")
    print(f"speed-up (at once / while sampling): {scored_at_once / scored_while_sampling:.2f}x")


if __name__ == "__main__":
    main()
