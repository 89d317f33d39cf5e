"""Time per image of CoDe at its papers' settings (N = 20 candidates, blocks of 5) against MSDDA.

    python benchmarks/code_cost.py [--steps 20] [--batch 4] [--adapters 2] [--repeats 3]

On the embedded world with random-weight adapters (msdda.testing.random_world_adapter), same prompt, seed and
step count, both measured in this run; prints the ratio last. CoDe samples N continuations of the base model
for every block of steps and scores each block's clean estimate with the rewards (the world's aesthetic and
consistency rewards, cycled over the adapters); MSDDA runs one batched forward of the K adapters per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from msdda.fuse import MSDDAPipeline
from msdda.rewards import load_reward
from msdda.testing import random_world_adapter

PROMPT = "a red circle on the left"
REWARDS = ("world-aesthetic", "world-consistency")


def paired_seconds_per_image(runs: dict[str, Callable[[], object]], batch: int, repeats: int) -> dict[str, float]:
    """The median wall time per image of each run, timed in turn within every repeat (after one warm-up call
    each), so that load from other processes on a shared machine falls on every run alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) / batch for name, values in times.items()}


def sampler(pipe: MSDDAPipeline, method: str, batch: int, steps: int, **options) -> Callable[[], object]:
    """One call of the pipeline at equal weights with ``method``, from seed 0."""
    weights = [1.0 / len(pipe.adapters)] * len(pipe.adapters)
    return lambda: pipe([PROMPT] * batch, weights=weights, method=method, num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(0), output_type="pt", **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=20, help="CoDe's N (its papers use 20)")
    parser.add_argument("--block", type=int, default=5, help="CoDe's block length in steps (its papers use 5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rewards = [load_reward(REWARDS[i % len(REWARDS)]) for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as folder:
        adapters = [str(random_world_adapter(Path(folder) / f"a{i}", seed=i, num_inference_steps=args.steps))
                    for i in range(args.adapters)]
        pipe = MSDDAPipeline.from_pretrained("world", adapters=adapters)
        pipe.set_progress_bar_config(disable=True)
        seconds = paired_seconds_per_image(
            {"msdda": sampler(pipe, "msdda", args.batch, args.steps),
             "code": sampler(pipe, "code", args.batch, args.steps, rewards=rewards, code_candidates=args.candidates,
                             code_block=args.block)}, args.batch, args.repeats)
    print(f"K = {args.adapters} adapters, {args.steps} steps, batch {args.batch}, {args.threads} threads; "
          f"CoDe N = {args.candidates}, block = {args.block}")
    print(f"{'method':>6} {'s/img':>8}")
    for method, value in seconds.items():
        print(f"{method:>6} {value:>8.4f}")
    print(f"\nratio code / msdda = {seconds['code'] / seconds['msdda']:.1f}")


if __name__ == "__main__":
    main()
