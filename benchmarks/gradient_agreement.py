"""How much signal is in one update? Cosines between step-objective gradients from independent trajectory sets.

For each estimator, sample ``--repeats`` independent sets of ``--trajectories`` trajectories on the embedded
world with a fresh adapter, compute the gradient of the step objective (beta 0) over all their steps with the
trainer's own code, and print the pairwise cosines. Near 0: updates are noise; near 1: every batch agrees.

    .venv/bin/python benchmarks/gradient_agreement.py [--reward world-aesthetic] [--trajectories 64]
        [--estimator "pathwise, tweedie" ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile

import numpy as np
import torch

from msdda.config import load_config
from msdda.train.config import TrainConfig
from msdda.train.trainer import Trainer
from msdda.train.updates import transitions

ESTIMATORS = {
    "policy-gradient, terminal": ["reward.step_reward=terminal", "train.estimator=policy-gradient"],
    "policy-gradient, tweedie + state baseline": ["reward.step_reward=tweedie", "train.estimator=policy-gradient"],
    "pathwise, tweedie": ["reward.step_reward=tweedie", "train.estimator=pathwise"],
    "pathwise, rollout": ["reward.step_reward=rollout", "train.estimator=pathwise"],
}


def gradients(overrides: list[str], repeats: int) -> list[torch.Tensor]:
    folder = tempfile.mkdtemp()
    try:
        trainer = Trainer(load_config(TrainConfig, None, [*overrides, f"output_dir={folder}/run"]))
        steps, results = trainer.config.sampling.num_inference_steps, []
        for repeat in range(repeats):
            trajectories = trainer.sample(repeat)  # an independent seed per repeat
            advantages, rows = trainer.advantages(trajectories), torch.arange(len(trajectories.prompts))
            trainer.unwrapped.zero_grad()
            for step in range(steps):
                terms = trainer.step_loss(transitions(trajectories, advantages, rows, step))
                (terms.loss / steps).backward()
            results.append(torch.cat([p.grad.flatten() for p in trainer.policy.lora_parameters]).clone())
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="world-aesthetic")
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimator", action="append", choices=list(ESTIMATORS),
                        help="measure only this estimator (repeatable; default: all)")
    parser.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. lora.rank=8")
    args = parser.parse_args()
    common = [f"reward.name={args.reward}", "beta=0", "log_with=null", "sampling.num_inference_steps=10",
              f"sampling.batch_size={args.trajectories}", "sampling.batches_per_epoch=1",
              f"train.batch_size={args.trajectories}", "lora.rank=4", "lora.alpha=4",
              "lora.target_modules=[to_q,to_k,to_v,to_out.0]", *args.overrides]
    print(f"{args.reward}: cosines between gradients from {args.repeats} independent sets of {args.trajectories} "
          "trajectories (10 steps)")
    for label in args.estimator or ESTIMATORS:
        grads = gradients([*common, *ESTIMATORS[label]], args.repeats)
        cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
        print(f"  {label:45s} {' '.join(f'{c:+.3f}' for c in cosines)}   mean {np.mean(cosines):+.3f}")


if __name__ == "__main__":
    main()
