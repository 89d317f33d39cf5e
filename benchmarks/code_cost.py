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


def seconds_per_image(run: Callable[[], object], batch: int, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``run`` (after one warm-up call), per image."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / batch


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
        msdda = seconds_per_image(sampler(pipe, "msdda", args.batch, args.steps), args.batch, args.repeats)
        code = seconds_per_image(sampler(pipe, "code", args.batch, args.steps, rewards=rewards,
                                         code_candidates=args.candidates, code_block=args.block),
                                 args.batch, args.repeats)
    print(f"K = {args.adapters} adapters, {args.steps} steps, batch {args.batch}, {args.threads} threads; "
          f"CoDe N = {args.candidates}, block = {args.block}")
    print(f"{'method':>6} {'s/img':>8}")
    print(f"{'msdda':>6} {msdda:>8.4f}")
    print(f"{'code':>6} {code:>8.4f}")
    print(f"\nratio code / msdda = {code / msdda:.1f}")


if __name__ == "__main__":
    main()
