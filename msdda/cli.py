"""The ``msdda`` command line: one subcommand per stage (train, fuse, sweep, world, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from msdda import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msdda",
        description="Align text-to-image diffusion models with several rewards: train one LoRA per reward, "
        "fuse them at sampling time with MSDDA.",
    )
    parser.add_argument("--version", action="version", version=f"msdda {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
