"""``msdda world``: pretrain the embedded world, sample from it, and print where it is installed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msdda.errors import UserError


def _pretrain(args: argparse.Namespace) -> int:
    from msdda.world.pretrain import PretrainConfig, continue_layout, pretrain_world

    if args.layout_steps < 0:
        raise UserError(f"--layout-steps must be 0 or more, got {args.layout_steps}")
    if args.learned_variance_steps < 0:
        raise UserError(f"--learned-variance-steps must be 0 or more, got {args.learned_variance_steps}")
    if args.flow_steps < 0:
        raise UserError(f"--flow-steps must be 0 or more, got {args.flow_steps}")
    for flag, steps in (("--learned-variance-steps", args.learned_variance_steps), ("--flow-steps", args.flow_steps)):
        if steps and (args.layout_steps or not args.from_world):
            raise UserError(f"{flag} continues a finished world: give --from WORLD (the shipped one is "
                            "msdda/world/assets) and leave out --layout-steps")
    if args.threads is not None and (not args.flow_steps or args.threads < 1):
        raise UserError(f"--threads {args.threads}: give a number >= 1, with --flow-steps")
    if args.learned_variance_steps and args.flow_steps:
        raise UserError("--learned-variance-steps and --flow-steps make two different worlds: give one")
    output = Path(args.out)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UserError(f"{output} is not empty; choose another --out or pass --overwrite")
    if args.from_world and args.seed is not None:
        raise UserError("--from continues with the seed of the world it names; leave out --seed")
    if args.learned_variance_steps:
        from msdda.world.learned_variance import continue_learned_variance

        continue_learned_variance(args.from_world, output, args.learned_variance_steps)
        print(f"learned-variance world written to {output} (pipeline/, pretraining.json); sample it with a DDPM "
              "scheduler")
        return 0
    if args.flow_steps:
        from msdda.world.flow import pretrain_flow_world

        pretrain_flow_world(args.from_world, output, args.flow_steps, threads=args.threads)
        print(f"flow world written to {output} (pipeline/, classifier/, pretraining.json); sample it with the flow "
              "scheduler")
        return 0
    if args.from_world:
        continue_layout(args.from_world, output, args.layout_steps)
    else:
        pretrain_world(output, PretrainConfig(seed=args.seed or 0, layout_steps=args.layout_steps))
    print(f"world written to {output} (pipeline/, classifier/, pretraining.json)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from msdda.world.sampling import sample_grid

    path = sample_grid(args.prompt, num_images=args.n, seed=args.seed, out=args.out, base=args.base,
                       num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta)
    print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from msdda.world.evaluate import evaluate_world

    report = evaluate_world(base=args.base, seed=args.seed, grid=args.grid, num_inference_steps=args.steps)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _path(args: argparse.Namespace) -> int:
    from msdda.world import world_path

    print(world_path())
    return 0


def add_world_parser(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the embedded default world: pretrain, sample, path")
    commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    pretrain = commands.add_parser("pretrain", help="train the world from scratch (minutes on a CPU; docs/world.md)")
    pretrain.add_argument("--out", required=True, help="folder to write pipeline/, classifier/ and pretraining.json")
    pretrain.add_argument("--seed", type=int, default=None, help="default 0")
    pretrain.add_argument("--from", dest="from_world", default=None,
                          help="a world pretrained without the layout phase: run only --layout-steps on it (its "
                               "seed and settings; same weights as a full run with those steps, in about 3 min)")
    pretrain.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    pretrain.add_argument("--layout-steps", type=int, default=0,
                          help="steps of the layout phase (x0 error at high noise), after which samples follow the "
                               "position words; 0 (default) makes the shipped world")
    pretrain.add_argument("--learned-variance-steps", type=int, default=0,
                          help="with --from: continue that world into one whose UNet also predicts its step "
                               "variance (learned_range; base 'world-lv' is the shipped one), training only the "
                               "variance channels this many steps on the 10-step schedule's variational bound")
    pretrain.add_argument("--flow-steps", type=int, default=0,
                          help="with --from: the flow world (base 'world-flow' is the shipped one), a tiny SD3 "
                               "transformer trained this many rectified-flow steps around that world's VAE, text "
                               "encoder and tokenizer")
    pretrain.add_argument("--threads", type=int, default=None,
                          help="with --flow-steps: torch's CPU threads (default: the continued world's, 2)")
    pretrain.set_defaults(handler=_pretrain)

    sample = commands.add_parser("sample", help="write a grid of samples for one prompt")
    sample.add_argument("--prompt", required=True, help='e.g. "a red circle on the left"')
    sample.add_argument("--n", type=int, default=16, help="number of images")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="PNG file for the grid")
    sample.add_argument("--base", default=None,
                        help="pipeline folder, 'world-lv' or 'world-flow' (default: the shipped world)")
    sample.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    sample.add_argument("--guidance-scale", type=float, default=3.0)
    sample.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1 = fully stochastic)")
    sample.set_defaults(handler=_sample)

    evaluate = commands.add_parser("evaluate", help="measure sample accuracy and the conflict of the two rewards")
    evaluate.add_argument("--base", default=None,
                          help="pipeline folder, 'world-lv' or 'world-flow' (default: the shipped world)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default=None, help="JSON file for the report")
    evaluate.add_argument("--grid", default=None, help="PNG file for a grid of samples (rows: prompts)")
    evaluate.add_argument("--steps", type=int, default=20, help="num_inference_steps (the world recipes sample 10)")
    evaluate.set_defaults(handler=_evaluate)

    path = commands.add_parser("path", help="print the folder of the shipped pipeline (use as --base)")
    path.set_defaults(handler=_path)
