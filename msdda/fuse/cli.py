"""``msdda fuse``: sample K reward adapters fused with MSDDA (or a baseline); PNGs, a grid and settings.json."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from msdda.config import config_to_dict
from msdda.prompts import load_prompts


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


@dataclass
class FuseConfig:
    """What ``msdda fuse`` samples; a YAML file (``--config``) holds these keys, and flags override them."""

    base: str = "world"
    adapters: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    betas: list[float] | None = None
    beta: float | None = None
    method: str = "msdda"
    rewards: list[str] = field(default_factory=list)
    """Rewards for method 'code' (one per adapter)."""
    prompts: list[str] | str = field(default_factory=list)
    """A list, a text/table file, or 'hub:<dataset>' (see msdda.prompts)."""
    num_prompts: int | None = None
    seeds: str = "0-7"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    out: str = "runs/fuse"
    device: str = "auto"
    """Where to sample: auto (the GPU when there is one), cpu, cuda or cuda:N."""


def _config_from_args(args: argparse.Namespace) -> FuseConfig:
    from msdda.config import load_config

    overrides: dict = {}
    for flag, key, convert in (("base", "base", None), ("adapter", "adapters", None),
                               ("weights", "weights", lambda v: parse_floats(v, "weights")),
                               ("betas", "betas", lambda v: parse_floats(v, "betas")), ("beta", "beta", None),
                               ("method", "method", None), ("reward", "rewards", None), ("seeds", "seeds", None),
                               ("steps", "num_inference_steps", None), ("guidance_scale", "guidance_scale", None),
                               ("eta", "eta", None), ("out", "out", None), ("device", "device", None)):
        value = getattr(args, flag)
        if value not in (None, []):
            overrides[key] = convert(value) if convert else value
    if args.prompt or args.prompts_file:
        overrides["prompts"] = list(args.prompt) + (load_prompts(args.prompts_file) if args.prompts_file else [])
    config = load_config(FuseConfig, args.config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    if not config.prompts:
        raise ValueError("give at least one --prompt (or --prompts-file, or prompts: in --config)")
    if not config.adapters and config.method != "base":
        raise ValueError("give the adapters to fuse: --adapter A --adapter B (or adapters: in --config)")
    return config


def _fuse(args: argparse.Namespace) -> int:
    import torch

    from msdda.diffusion import resolve_device
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward
    from msdda.world.sampling import image_grid

    config = _config_from_args(args)
    seeds, prompts = parse_seeds(config.seeds), load_prompts(config.prompts, config.num_prompts)
    device = resolve_device(config.device)
    pipeline = MSDDAPipeline.from_pretrained(config.base, adapters=config.adapters, betas=config.betas).to(device)
    pipeline.set_progress_bar_config(disable=True)
    rewards = [load_reward(name).to(device) for name in config.rewards] if config.rewards else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    images, files = [], []
    call = dict(weights=config.weights, method=config.method, beta=config.beta,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale, eta=config.eta,
                rewards=rewards)
    for prompt_index, prompt in enumerate(tqdm(prompts, desc="prompts", disable=len(prompts) < 2)):
        for seed in seeds:
            image = pipeline(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]
            name = f"p{prompt_index:03d}_s{seed:04d}.png"
            image.save(out / name)
            images.append(image)
            files.append({"file": name, "prompt": prompt, "seed": seed})
    image_grid(images, columns=len(seeds)).save(out / "grid.png")
    settings = {
        **config_to_dict(config), "prompts": prompts, "betas": pipeline.betas,
        "num_inference_steps": config.num_inference_steps or pipeline._default("num_inference_steps", 50),
        "guidance_scale": config.guidance_scale if config.guidance_scale is not None
        else pipeline._default("guidance_scale", 7.5),
        "eta": config.eta if config.eta is not None else pipeline._default("eta", 1.0),
        "scheduler": type(pipeline.scheduler).__name__, "images": files,
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(images)} images, grid.png and settings.json to {out}")
    return 0


def add_fuse_parser(subparsers: argparse._SubParsersAction) -> None:
    from msdda.fuse.sampler import METHODS

    parser = subparsers.add_parser("fuse", help="sample K reward adapters fused with MSDDA (or a baseline)")
    parser.add_argument("--config", default=None, help="YAML of FuseConfig keys, e.g. configs/fuse/world.yaml; flags "
                        "given on the command line override it")
    parser.add_argument("--base", default=None, help="base pipeline folder or Hub id ('world': the embedded one)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder or Hub id (repeat)")
    parser.add_argument("--weights", default=None, help="one weight per adapter, e.g. 0.3,0.7")
    parser.add_argument("--betas", default=None, help="adapters' KL weights when their metadata lacks them")
    parser.add_argument("--beta", type=float, default=None, help="KL weight of the fused objective")
    parser.add_argument("--method", default=None, choices=METHODS, help="default msdda")
    parser.add_argument("--reward", action="append", default=[], help="rewards for --method code (one per adapter)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument("--prompts-file", default=None, help="text file (one prompt per line) or table")
    parser.add_argument("--seeds", default=None, help="'0-15' or '1,4,9' (default 0-7)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the adapters')")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--device", default=None, help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--out", default=None, help="folder for the PNGs, grid.png and settings.json")
    parser.set_defaults(handler=_fuse)
