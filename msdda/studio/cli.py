"""``msdda studio``: a local web page to move adapter weights and see the fused samples at once."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from msdda.errors import UserError
from msdda.utils import check_port, is_loopback

DEFAULT_ADAPTERS = ["world:aesthetic", "world:consistency", "world:thirds"]
"""The reference adapters shipped with the embedded world."""
LOOPBACK_NOTE = ("it binds to loopback (127.0.0.1) only, so only this machine can open the page; it has no login, "
                 "so a --host that other machines reach lets anyone there sample with your adapters")


def _check_args(args: argparse.Namespace) -> list[float] | None:
    """Everything the arguments can get wrong, before any model loads; returns the parsed betas."""
    from msdda.diffusion import resolve_device
    from msdda.fuse.pipeline import read_adapters
    from msdda.sweep.run import load_manifest
    from msdda.utils import parse_floats

    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise UserError("msdda studio needs the studio extra: pip install 'msdda[studio]' (bash scripts/install.sh "
                        "installs it)") from error
    adapters = args.adapter or DEFAULT_ADAPTERS
    betas = parse_floats(args.betas, "betas")
    read_adapters(adapters, betas)
    if args.reward and len(args.reward) != len(adapters):
        raise UserError(f"got {len(args.reward)} --reward for {len(adapters)} adapters; give one per adapter or none")
    if args.sweep is not None:
        load_manifest(args.sweep)
    if args.port is not None:
        check_port(args.host, args.port)
    resolve_device(args.device)
    return betas


def _studio(args: argparse.Namespace) -> int:
    betas = _check_args(args)
    from msdda.studio.app import build_app, serve
    from msdda.studio.core import Studio
    from msdda.studio.sweep import SweepView

    studio = Studio.load(args.base, args.adapter or DEFAULT_ADAPTERS, betas=betas, rewards=args.reward or None,
                         device=args.device)
    with tempfile.TemporaryDirectory(prefix="msdda-studio-") as scratch:
        sweep = SweepView(args.sweep, Path(scratch) / "pareto.png") if args.sweep is not None else None
        app = build_app(studio, sweep)
        url = serve(app, args.host, args.port)
        where = "loopback only: only this machine can open it" if is_loopback(args.host) else \
            f"on {args.host}, NOT loopback: other machines can open it, and it has no login"
        print(f"msdda studio: {url} ({where}); Ctrl+C stops it", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return 0


def add_studio_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "studio", help="a local web page: move adapter weights, see fused samples at once",
        description=f"Serve a web page (Gradio) that samples the adapters fused at the weights its sliders set. By "
                    f"default {LOOPBACK_NOTE}.")
    parser.add_argument("--base", default="world", help="base pipeline folder or Hub id (default 'world', the "
                        "embedded one)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder, Hub id or world:<name> "
                        f"(repeat; default: the shipped reference adapters {', '.join(DEFAULT_ADAPTERS)})")
    parser.add_argument("--betas", default=None, help="adapters' KL weights when their metadata lacks them")
    parser.add_argument("--reward", action="append", default=[], help="reward to score each adapter's samples with "
                        "(repeat, one per adapter; default: the reward each adapter was trained on)")
    parser.add_argument("--sweep", default=None, help="a folder `msdda sweep` wrote: show its Pareto plot and each "
                        "cell's samples")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only; "
                        "the page has no login)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, "
                        "cuda:N")
    parser.set_defaults(handler=_studio)
