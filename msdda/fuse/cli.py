"""``msdda fuse``: sample K reward adapters fused with MSDDA (or a baseline); PNGs, a grid and settings.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_seeds(text: str) -> list[int]:
    """'0-15' -> 0..15; '1,4,9' -> [1, 4, 9]."""
    seeds: list[int] = []
    for part in text.split(","):
        start, separator, end = part.strip().partition("-")
        try:
            seeds.extend(range(int(start), int(end) + 1) if separator else [int(start)])
        except ValueError as error:
            raise ValueError(f"--seeds {text!r} must look like '0-15' or '1,4,9'") from error
    if not seeds:
        raise ValueError("--seeds names no seed")
    return seeds


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--{what} {text!r} must be comma-separated numbers, e.g. 0.3,0.7") from error


def _fuse(args: argparse.Namespace) -> int:
    import torch

    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward
    from msdda.world.sampling import image_grid

    weights, betas = parse_floats(args.weights, "weights"), parse_floats(args.betas, "betas")
    seeds = parse_seeds(args.seeds)
    prompts = args.prompt or []
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (or --prompts-file)")
    pipeline = MSDDAPipeline.from_pretrained(args.base, adapters=args.adapter, betas=betas)
    pipeline.set_progress_bar_config(disable=True)
    rewards = [load_reward(name) for name in args.reward] if args.reward else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, files = [], []
    call = dict(weights=weights, method=args.method, beta=args.beta, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, eta=args.eta, rewards=rewards)
    for prompt_index, prompt in enumerate(prompts):
        for seed in seeds:
            image = pipeline(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]
            name = f"p{prompt_index:03d}_s{seed:04d}.png"
            image.save(out / name)
            images.append(image)
            files.append({"file": name, "prompt": prompt, "seed": seed})
    image_grid(images, columns=len(seeds)).save(out / "grid.png")
    settings = {
        "base": args.base, "adapters": args.adapter, "betas": pipeline.betas, "weights": weights,
        "method": args.method, "beta": args.beta,
        "num_inference_steps": args.steps or pipeline._default("num_inference_steps", 50),
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else pipeline._default("guidance_scale", 7.5),
        "eta": args.eta if args.eta is not None else pipeline._default("eta", 1.0),
        "scheduler": type(pipeline.scheduler).__name__, "rewards": args.reward, "images": files,
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(images)} images, grid.png and settings.json to {out}")
    return 0


def add_fuse_parser(subparsers: argparse._SubParsersAction) -> None:
    from msdda.fuse.sampler import METHODS

    parser = subparsers.add_parser("fuse", help="sample K reward adapters fused with MSDDA (or a baseline)")
    parser.add_argument("--base", default="world", help="base pipeline folder or Hub id ('world': the embedded one)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder or Hub id (repeat)")
    parser.add_argument("--weights", default=None, help="one weight per adapter, e.g. 0.3,0.7")
    parser.add_argument("--betas", default=None, help="adapters' KL weights when their metadata lacks them")
    parser.add_argument("--beta", type=float, default=None, help="KL weight of the fused objective")
    parser.add_argument("--method", default="msdda", choices=METHODS)
    parser.add_argument("--reward", action="append", default=[], help="rewards for --method code (one per adapter)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    parser.add_argument("--seeds", default="0-7", help="'0-15' or '1,4,9'")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the adapters')")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--out", required=True, help="folder for the PNGs, grid.png and settings.json")
    parser.set_defaults(handler=_fuse)
