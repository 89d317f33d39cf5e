"""``msdda train``: train one reward adapter from a YAML recipe with dotted overrides."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from msdda.config import load_config
    from msdda.train import TrainConfig, train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=latest")
    config = load_config(TrainConfig, args.config, overrides)
    final = train(config)
    print(f"adapter written to {final}")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train one LoRA per reward with step-level RL",
        description="Train a reward adapter. Under several processes: accelerate launch --config_file "
        "launch/accelerate/<setup>.yaml -m msdda.train --config <recipe> [key.sub=value ...]")
    parser.add_argument("--config", default=None, help="YAML recipe, e.g. configs/train/world_aesthetic.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 train.learning_rate=1e-4")
    parser.set_defaults(handler=_train)
