"""``msdda fuse``: sample K reward adapters fused with MSDDA (or a baseline); PNGs, a grid and settings.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from msdda.config import config_to_dict
from msdda.fuse.config import FuseConfig
from msdda.prompts import load_prompts
from msdda.utils import parse_floats, parse_seeds


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
    config.validate()
    return config


def _fuse(args: argparse.Namespace) -> int:
    import torch

    from msdda.diffusion import resolve_device
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward
    from msdda.utils import image_grid

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
        "num_inference_steps": config.num_inference_steps or pipeline.recorded("num_inference_steps", 50),
        "guidance_scale": config.guidance_scale if config.guidance_scale is not None
        else pipeline.recorded("guidance_scale", 7.5),
        "eta": config.eta if config.eta is not None else pipeline.recorded("eta", 1.0),
        "scheduler": type(pipeline.scheduler).__name__, "images": files,
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(images)} images, grid.png and settings.json to {out}")
    return 0


def add_fuse_parser(subparsers: argparse._SubParsersAction) -> None:
    from msdda.fuse.methods import method_names

    parser = subparsers.add_parser("fuse", help="sample K reward adapters fused with MSDDA (or a baseline)")
    parser.add_argument("--config", default=None, help="YAML of FuseConfig keys, e.g. configs/fuse/world.yaml; flags "
                        "given on the command line override it")
    parser.add_argument("--base", default=None, help="base pipeline folder or Hub id ('world': the embedded one)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder or Hub id (repeat)")
    parser.add_argument("--weights", default=None, help="one weight per adapter, e.g. 0.3,0.7")
    parser.add_argument("--betas", default=None, help="adapters' KL weights when their metadata lacks them")
    parser.add_argument("--beta", type=float, default=None, help="KL weight of the fused objective")
    parser.add_argument("--method", default=None, choices=method_names(), help="default msdda")
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
