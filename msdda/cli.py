"""The ``msdda`` command line: one subcommand per stage (train, fuse, sweep, world, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from msdda import __version__
from msdda.errors import UserError
from msdda.fuse.cli import add_fuse_parser
from msdda.push import add_push_parser
from msdda.report.cli import add_report_parser
from msdda.reward_cli import add_reward_parser
from msdda.studio.cli import add_studio_parser
from msdda.sweep.cli import add_sweep_parser
from msdda.train.cli import add_calibrate_parser, add_evaluate_parser, add_train_parser
from msdda.world.cli import add_world_parser


class OneLineErrors(argparse.ArgumentParser):
    """argparse's parser whose errors (a mistyped flag, a value of the wrong type, a missing argument) are one
    line, as every other bad input is: the message and where the usage is, instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="msdda",
        description="Align text-to-image diffusion models with several rewards: train one LoRA per reward, "
        "fuse them at sampling time with MSDDA.",
    )
    parser.add_argument("--version", action="version", version=f"msdda {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_fuse_parser(subparsers)
    add_sweep_parser(subparsers)
    add_report_parser(subparsers)
    add_push_parser(subparsers)
    add_world_parser(subparsers)
    add_studio_parser(subparsers)
    add_reward_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except UserError as error:  # bad input, named by the message with its fix: one line; a bug keeps its traceback
        print(f"msdda: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
