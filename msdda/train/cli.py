"""``msdda train``: train one reward adapter from a YAML recipe with dotted overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from msdda.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from msdda.config import load_config
    from msdda.train import TrainConfig, train
    from msdda.train.checkpoint import finished_run

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=latest")
    config = load_config(TrainConfig, args.config, overrides)
    finished = finished_run(Path(config.output_dir), config.resume, config.epochs)
    if finished is not None:
        final, trained = finished
        print(f"nothing left to train: {config.output_dir} has trained {trained} of epochs={config.epochs}, and its "
              f"adapter {final} is left as it is; to train on, resume with a larger epochs=")
        return 0
    final = train(config)
    if PartialState().is_main_process:  # one line, however many processes were launched
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


def _evaluate(args: argparse.Namespace) -> int:
    from msdda.prompts import check_prompts_spec
    from msdda.reward_cli import parse_reward_kwargs
    from msdda.shards import launch_state
    from msdda.train.evaluate import evaluate_adapter
    from msdda.train.gauge import gauge_lines
    from msdda.utils import parse_seeds

    check_prompts_spec(args.prompts, "--prompts")
    if args.num_prompts < 1:
        raise UserError(f"--num-prompts must be 1 or more, got {args.num_prompts}")
    report = evaluate_adapter(args.adapter, rewards=args.reward, prompts=args.prompts, num_prompts=args.num_prompts,
                              seeds=parse_seeds(args.seeds), out=args.out, device=args.device,
                              reward_kwargs=parse_reward_kwargs(args.reward_kwargs, "--reward-kwargs"),
                              gauge_prompts=args.gauge_prompts, gauge_beta=args.gauge_beta)
    if not launch_state().is_main_process:  # the main process reports, once
        return 0
    print(f"{report['samples']} paired samples ({report['prompts']} prompts x seeds {args.seeds}) of the adapter's "
          f"{report['weights']} weights; "
          f"KL to the base per trajectory {report['kl_to_base']['mean']:.3f} ± {report['kl_to_base']['std']:.3f}")
    for name, values in report["rewards"].items():
        used = report["reward_kwargs"][name]
        print(f"  {name} scored with kwargs {used['kwargs']} ({used['from']})")
        print(f"  {name}: base {values['base_mean']:.4f} ± {values['base_std']:.4f} -> adapter "
              f"{values['adapter_mean']:.4f} ± {values['adapter_std']:.4f} (paired difference "
              f"{values['paired_difference']:+.4f} ± {values['paired_difference_sem']:.4f} s.e.)")
    if "optimality" in report:
        print(gauge_lines(report["optimality"]))
    if args.out:
        print(f"wrote evaluation.json and before_after.png to {args.out}")
    return 0


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="an adapter against its base: rewards before/after and its KL",
        description="Evaluate an adapter against its base on paired samples. Under accelerate launch -m msdda.cli "
        "evaluate ... the processes share the samples, with the result of one process.")
    parser.add_argument("adapter", help="an adapter folder (or Hub id) written by msdda train")
    parser.add_argument("--reward", action="append", default=None,
                        help="a reward to score: a registered name or 'module:attribute' (repeatable; default: "
                        "the one the adapter was trained on, scored with the constructor arguments it recorded)")
    parser.add_argument("--reward-kwargs", default=None,
                        help="constructor arguments for the adapter's own reward, over the ones it recorded, as a YAML "
                        "mapping, e.g. '{strength: 1.0}' (default: the recorded ones)")
    parser.add_argument("--prompts", default="world", help="'world' or a text file with one prompt per line")
    parser.add_argument("--num-prompts", type=int, default=32, help="prompts used, evenly spaced (default 32)")
    parser.add_argument("--seeds", default="0-3", help="seeds per prompt, e.g. 0-3")
    parser.add_argument("--out", default=None, help="folder for evaluation.json and before_after.png")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--gauge-prompts", type=int, default=16,
                        help="prompts whose held-out states the optimality gauge of the trained reward reads, when it is "
                        "scored (default 16; 0: no gauge)")
    parser.add_argument("--gauge-beta", type=float, default=None,
                        help="the KL weight to gauge the adapter's step optimum at (default: its trained beta)")
    parser.set_defaults(handler=_evaluate)


def _calibrate(args: argparse.Namespace) -> int:
    from msdda.prompts import check_prompts_spec
    from msdda.reward_cli import parse_reward_kwargs
    from msdda.train.calibrate import calibrate_adapter
    from msdda.train.gauge import gauge_lines

    check_prompts_spec(args.prompts, "--prompts")

    def progress(round_index: int, report: dict) -> None:
        worst = report["max_scale_deviation"]
        print(f"round {round_index}: the worst step's best multiple is off 1 by "
              f"{'an unmeasured amount' if worst is None else f'{worst:.2f}'}", flush=True)

    report = calibrate_adapter(args.adapter, args.out, beta=args.beta,
                               reward_kwargs=parse_reward_kwargs(args.reward_kwargs, "--reward-kwargs"),
                               prompts=args.prompts,
                               num_prompts=args.num_prompts, draws=args.draws, rounds=args.rounds,
                               largest=args.largest, device=args.device, progress=progress)
    print(gauge_lines(report))
    print(f"calibrated adapter written to {args.out}")
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit an adapter's per-step scales to its step optimum (by the optimality gauge)",
        description="Fit a factor per denoising step for an adapter's LoRA so that every step sits at the step optimum "
        "the adapter's own direction allows, for the reward it was trained on; steps where its shift is all cost (the "
        "last ones) get a factor near 0. Writes a copy of the adapter with the factors in its metadata: msdda applies them wherever "
        "it samples the adapter (fuse, evaluate, sweep, studio), and its model card says how to with stock diffusers.")
    parser.add_argument("adapter", help="an adapter folder (or Hub id) written by msdda train")
    parser.add_argument("--out", required=True, help="folder for the calibrated adapter (not the adapter's own)")
    parser.add_argument("--beta", type=float, default=None,
                        help="the KL weight to fit the step optimum at (default: the trained one); recorded as the "
                        "calibrated adapter's beta, which fusion weights it by")
    parser.add_argument("--reward-kwargs", default=None,
                        help="constructor arguments for the adapter's reward over the recorded ones, as a YAML mapping")
    parser.add_argument("--prompts", default="world", help="'world' or a text file with one prompt per line")
    parser.add_argument("--num-prompts", type=int, default=16,
                        help="prompts whose held-out states the gauge reads, evenly spaced (default 16)")
    parser.add_argument("--draws", type=int, default=4, help="draws per state of the reward's gradient (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of gauge and refit (default 3)")
    parser.add_argument("--largest", type=float, default=4.0, help="the largest factor allowed (default 4)")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")
    parser.set_defaults(handler=_calibrate)
