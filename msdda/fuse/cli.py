"""``msdda fuse``: sample K reward adapters fused with MSDDA (or a baseline); PNGs, a grid and settings.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msdda.errors import UserError
from msdda.fuse.config import BUILTIN_METHODS, FuseConfig
from msdda.prompts import check_prompts_spec, load_prompts
from msdda.utils import parse_floats, parse_seeds


def _config_from_args(args: argparse.Namespace) -> FuseConfig:
    from msdda.config import load_config

    overrides: dict = {}
    for flag, key, convert in (("base", "base", None), ("adapter", "adapters", None),
                               ("weights", "weights", lambda v: parse_floats(v, "weights")),
                               ("betas", "betas", lambda v: parse_floats(v, "betas")), ("beta", "beta", None),
                               ("method", "method", None), ("reward", "rewards", None), ("seeds", "seeds", None),
                               ("steps", "num_inference_steps", None), ("guidance_scale", "guidance_scale", None),
                               ("eta", "eta", None), ("rgg_scale", "rgg_scale", None), ("out", "out", None),
                               ("device", "device", None)):
        value = getattr(args, flag)
        if value not in (None, []):
            overrides[key] = convert(value) if convert else value
    if args.prompts_file:
        check_prompts_spec(args.prompts_file, "--prompts-file")
    if args.prompt or args.prompts_file:
        overrides["prompts"] = list(args.prompt) + (load_prompts(args.prompts_file) if args.prompts_file else [])
    config = load_config(FuseConfig, args.config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    config.validate()
    return config


FUSE_OUTPUTS = ("settings.json", "grid.png", "p[0-9][0-9][0-9]_s[0-9][0-9][0-9][0-9].png")
"""What ``msdda fuse`` writes into its --out folder (globs)."""


def _clear_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out folder that holds files, so that no earlier run's images stay beside this run's under a
    settings.json that does not describe them; with --overwrite, remove what an earlier ``msdda fuse`` wrote there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder")
    held = sorted(child.name for child in out.iterdir())
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise UserError(f"--out {str(out)!r} already holds files ({shown}); give a new --out, or pass --overwrite to "
                        "replace an earlier fuse's images and settings.json there")
    for pattern in FUSE_OUTPUTS:
        for stale in out.glob(pattern):
            stale.unlink()


def _fuse(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from msdda.config import config_to_dict
    from msdda.diffusion import resolve_device
    from msdda.fuse.pipeline import MSDDAPipeline
    from msdda.rewards import load_reward
    from msdda.utils import image_grid

    config = _config_from_args(args)
    seeds, prompts = parse_seeds(config.seeds), load_prompts(config.prompts, config.num_prompts)
    out = Path(config.out)
    _clear_out(out, args.overwrite)
    device = resolve_device(config.device)
    pipeline = MSDDAPipeline.from_pretrained(config.base, adapters=config.adapters, betas=config.betas).to(device)
    pipeline.set_progress_bar_config(disable=True)
    rewards = [load_reward(name).to(device) for name in config.rewards] if config.rewards else None
    out.mkdir(parents=True, exist_ok=True)
    images, files = [], []
    call = dict(weights=config.weights, method=config.method, beta=config.beta,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale, eta=config.eta,
                rgg_scale=config.rgg_scale, rewards=rewards)
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
    parser = subparsers.add_parser(
        "fuse", help="sample K reward adapters fused with MSDDA (or a baseline)",
        description="Sample reward adapters fused at sampling time with MSDDA (the exact step-optimal kernel of the "
        "weighted reward) or a baseline, on the base they were trained on: one PNG per prompt and seed, grid.png and "
        "settings.json in --out. Example: msdda fuse --adapter world:aesthetic --adapter world:thirds --weights "
        "0.3,0.7 --prompt 'a red circle' --seeds 0-3 --out runs/fused")
    parser.add_argument("--config", default=None, help="YAML of FuseConfig keys, e.g. configs/fuse/world.yaml; flags "
                        "given on the command line override it")
    parser.add_argument("--base", default=None, help="base pipeline folder or Hub id the adapters were trained on "
                        "(default 'world', the embedded one; 'world-flow' and 'world-lv' are its twins)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder, Hub id or world:<name> (a "
                        "reference adapter shipped with the world: world:aesthetic, world:consistency, world:thirds); "
                        "repeat")
    parser.add_argument("--weights", default=None, help="one weight per adapter, e.g. 0.3,0.7")
    parser.add_argument("--betas", default=None, help="adapters' KL weights when their metadata lacks them")
    parser.add_argument("--beta", type=float, default=None, help="KL weight of the fused objective")
    parser.add_argument("--method", default=None, choices=BUILTIN_METHODS, help="default msdda")
    parser.add_argument("--reward", action="append", default=[], help="rewards for --method code or rgg (one per "
                        "adapter; differentiable ones for rgg)")
    parser.add_argument("--rgg-scale", default=None, help="--method rgg's step scale: 'optimal' (default: "
                        "s_t^2 / beta, the first-order step optimum) or a number > 0")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument("--prompts-file", default=None, help="text file (one prompt per line) or table")
    parser.add_argument("--seeds", default=None, help="'0-15' or '1,4,9' (default 0-7)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the adapters')")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the adapters')")
    parser.add_argument("--device", default=None, help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta, the step noise: 1 fully stochastic, "
                        "0 deterministic (default: the adapters'; flow adapters take none: their step noise is the noise level they "
                        "record)")
    parser.add_argument("--out", default=None, help="folder for the PNGs, grid.png and settings.json (default "
                        "runs/fuse); refused when it holds files, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the images and settings.json an earlier "
                        "fuse wrote in --out")
    parser.set_defaults(handler=_fuse)
