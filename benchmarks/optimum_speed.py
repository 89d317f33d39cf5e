"""Speed of getting to the step optimum: wall time and reward calls until the optimality gauge reads the adapter within
a tolerance of its optimum, in one run, for today's on-policy recipe and for the modes meant to get there faster.

    .venv/bin/python benchmarks/optimum_speed.py [--beta 0.001] [--tolerance 0.1] [--epochs 10] [--gauge-every 2]
        [--rounds 3] [--reused-epochs 3] [--reused-inner-epochs 6] [--proximal-weight 1]
        [--modes on-policy,per-step-scales,reused-gradients]

Every mode trains the world's aesthetic recipe (configs/train/world_aesthetic.yaml: pathwise through the tweedie step
reward) at ``--beta``, and the gauge reads it on the same held-out states (8 prompts, ``--draws`` draws, states from
the reference and from the adapter). The criterion is the one a LoRA can meet, the scale condition: every step that
carries KL and whose best multiple the gauge resolves within ``--tolerance`` of it (``max_scale_deviation``); the
pooled scale beta's distance from beta is printed beside it.

- on-policy: the recipe as it is, gauged every ``--gauge-every`` epochs up to ``--epochs``; it reaches the tolerance
  at the first gauge within it. Its gauges are measurement: neither their time nor their reward calls count.
- per-step-scales: the recipe for ``--epochs``, then up to ``--rounds`` rounds of per-step scale fitting
  (``train.step_scale_rounds``, as ``msdda calibrate``); the fit's gauges are its work, so their time and reward calls
  count.
- state-replay: ``train.fresh_noise``, half the states from the reference, ``--inner-epochs`` updates per state, a
  higher learning rate with a cosine schedule, gauged as on-policy.
- reused-gradients: ``train.reuse_reward_gradients`` for ``--reused-epochs`` epochs of ``--reused-inner-epochs``
  updates per transition (``--proximal-weight``), gauged after every epoch; the reward is called once per transition
  and epoch.

Reward calls are the images the reward scores: one per sampled trajectory and one per trained transition (the tweedie
step reward), and for a fitting gauge one per drawn action with its gradient. Ratios against on-policy are printed last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from msdda.adapters import load_adapter_metadata
from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/train/world_aesthetic.yaml"
GAUGE_PROMPTS = 8


def _modes(args: argparse.Namespace) -> dict[str, list[str]]:
    gauged = [f"train.gauge_every={args.gauge_every}"]
    return {
        "on-policy": gauged,
        "per-step-scales": [f"train.step_scale_rounds={args.rounds}"],
        "state-replay": [*gauged, "train.fresh_noise=true", "train.reference_states=0.5",
                         f"train.inner_epochs={args.inner_epochs}", f"train.learning_rate={args.replay_learning_rate}",
                         "train.lr_schedule=cosine"],
        "reused-gradients": ["train.gauge_every=1", "train.reuse_reward_gradients=true",
                             f"epochs={args.reused_epochs}", f"train.inner_epochs={args.reused_inner_epochs}",
                             f"train.proximal_weight={args.proximal_weight}"],
    }


def training_reward_calls(config: TrainConfig, epochs: int) -> int:
    """Images the reward scored in ``epochs`` epochs of training: every sampled trajectory's final image, and one per
    trained transition (each update's tweedie step reward), or with reused gradients one per transition and epoch."""
    trajectories = config.sampling.batch_size * config.sampling.batches_per_epoch
    if config.train.reuse_reward_gradients:
        return epochs * trajectories * (1 + config.sampling.num_inference_steps)
    return epochs * trajectories * (1 + config.train.inner_epochs * config.trained_steps)


def gauge_reward_calls(config: TrainConfig) -> int:
    """Images one gauge scores with their gradient: per prompt, a state from each source at every step, ``draws``
    actions each."""
    return GAUGE_PROMPTS * 2 * config.sampling.num_inference_steps * config.train.gauge_draws


def _within(worst: float | None, tolerance: float) -> bool:
    """Whether a gauge's worst step (its ``max_scale_deviation``; None: unresolved) is within ``tolerance``."""
    return worst is not None and worst <= tolerance


def _amount(value: float | None) -> str:
    return "unresolved" if value is None else f"{value:.2f}"


def _pooled(scale_beta: float | None, beta: float) -> str:
    return "none" if scale_beta is None else f"{scale_beta / beta - 1:+.2f}"


def run(name: str, mode: list[str], args: argparse.Namespace) -> dict:
    """Train one mode; what it took to reach the tolerance (or all it took, where it did not)."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(TrainConfig, RECIPE, [
            f"beta={args.beta}", f"epochs={args.epochs}", f"train.gauge_prompts={GAUGE_PROMPTS}",
            f"train.gauge_draws={args.draws}", "sample_every=0", "log_with=null", f"checkpoint.every={args.epochs}",
            f"output_dir={folder}/run", *mode])
        trainer = Trainer(config)
        started = time.perf_counter()
        final = trainer.run()
        seconds = time.perf_counter() - started
        history = trainer.history
        gauge = load_adapter_metadata(final).optimality
    if name == "per-step-scales":  # the recipe's epochs, then the fit: its gauges are the work
        worst = gauge.get("max_scale_deviation")
        return {"epochs": len(history), "seconds": seconds, "reward_calls": training_reward_calls(config, len(history))
                + (args.rounds + 1) * gauge_reward_calls(config), "reached": _within(worst, args.tolerance),
                "gauges": [("fitted", _amount(worst), _pooled(gauge.get("scale_beta"), args.beta))]}
    gauged = [h for h in history if "gauge_max_scale_deviation" in h]
    first = next((h for h in gauged if _within(h["gauge_max_scale_deviation"], args.tolerance)), None)
    epochs = first["epoch"] if first is not None else len(history)  # the history counts epochs from 1
    return {"epochs": epochs, "seconds": sum(h["epoch_seconds"] for h in history[:epochs]),
            "reward_calls": training_reward_calls(config, epochs), "reached": first is not None,
            "gauges": [(h["epoch"], _amount(h["gauge_max_scale_deviation"]),
                        _pooled(h["gauge_scale_beta"], args.beta)) for h in gauged]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beta", type=float, default=0.001, help="the KL weight (default: the recipe's, 0.001)")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10, help="the recipe's epochs (default 10, the recipe's)")
    parser.add_argument("--gauge-every", type=int, default=2)
    parser.add_argument("--draws", type=int, default=4, help="gauge draws per state (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="per-step-scales: fitting rounds (default 3)")
    parser.add_argument("--inner-epochs", type=int, default=4, help="state-replay: updates per state")
    parser.add_argument("--replay-learning-rate", type=float, default=1e-2)
    parser.add_argument("--reused-epochs", type=int, default=3, help="reused-gradients: epochs (default 3)")
    parser.add_argument("--reused-inner-epochs", type=int, default=6,
                        help="reused-gradients: updates per transition and epoch (default 6)")
    parser.add_argument("--proximal-weight", type=float, default=1.0,
                        help="reused-gradients: train.proximal_weight (default 1)")
    parser.add_argument("--modes", default="on-policy,per-step-scales,reused-gradients",
                        help="comma-separated, of on-policy, per-step-scales, state-replay, reused-gradients (on-policy "
                             "is the baseline)")
    args = parser.parse_args()
    known = _modes(args)
    names = args.modes.split(",")
    unknown = sorted(set(names) - set(known))
    if unknown or "on-policy" not in names:
        parser.error(f"--modes must include on-policy and name only {sorted(known)}; got {args.modes!r}")
    results = {name: run(name, known[name], args) for name in names}
    for name, result in results.items():
        verdict = "reached" if result["reached"] else "did not reach"
        print(f"{name}: {verdict} the tolerance {args.tolerance} after {result['epochs']} epochs, "
              f"{result['seconds']:.0f} s, {result['reward_calls']} reward calls; gauges (epoch, worst step's "
              f"|scale beta / beta - 1|, pooled scale beta / beta - 1): {result['gauges']}")
    policy = results["on-policy"]
    for name, result in results.items():
        if name != "on-policy":
            print(f"{name} / on-policy: wall time {result['seconds'] / policy['seconds']:.2f}x, reward calls "
                  f"{result['reward_calls'] / policy['reward_calls']:.2f}x")


if __name__ == "__main__":
    main()
