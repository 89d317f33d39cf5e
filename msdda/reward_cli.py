"""``msdda reward serve``: serve a reward over HTTP for ``remote:`` reward specs (msdda.rewards.serve).

It lives outside msdda.rewards, whose import loads torch and every built-in reward, so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import socket

from msdda.errors import UserError
from msdda.utils import check_port, is_loopback

__all__ = ["add_reward_parser", "parse_reward_kwargs"]


def parse_reward_kwargs(text: str | None, flag: str) -> dict | None:
    """A reward's constructor arguments given on the command line (``flag``) as a YAML mapping, e.g. '{strength: 1}'."""
    if text is None:
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{flag} {text!r} is not valid YAML ({error.__class__.__name__}); give a mapping "
                        "such as '{strength: 1.0}'") from error
    if not isinstance(value, dict):
        raise UserError(f"{flag} {text!r} is not a mapping; give one such as '{{strength: 1.0}}'")
    return value


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _serve(args: argparse.Namespace) -> int:
    kwargs = parse_reward_kwargs(args.kwargs, "--kwargs") or {}
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.port is not None:
        check_port(args.host, args.port)
    if not is_loopback(args.host):
        print(f"msdda reward serve: listening on {args.host}, NOT loopback: other machines can send it images to "
              "score, and it has no login", flush=True)
    from msdda.rewards.serve import serve_reward

    serve_reward(args.name, kwargs, args.host, args.port or _free_port(args.host), args.batch_size, args.device)
    return 0


def add_reward_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reward", help="serve a reward over HTTP (remote: reward specs)")
    commands = parser.add_subparsers(dest="reward_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="serve a reward over HTTP, batched",
        description="Serve a registered reward or your own (module:attribute) over HTTP, so that training, evaluate, "
        "sweep, CoDe and the studio score with it from other processes and machines through the reward spec "
        "remote:http://HOST:PORT. It binds to loopback (127.0.0.1) by default; it has no login, so give --host an "
        "address other machines reach only on a network you trust.")
    serve.add_argument("name", help="a registered reward (e.g. world-aesthetic) or 'module:attribute'")
    serve.add_argument("--kwargs", default=None, help="the reward's constructor arguments as a YAML mapping, e.g. "
                       "'{strength: 2.0}' (reported by /health)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    serve.add_argument("--port", type=int, default=None, help="port (default: a free one, printed)")
    serve.add_argument("--batch-size", type=int, default=32, help="most images scored at once; larger requests are "
                       "scored in chunks (default 32)")
    serve.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, "
                       "cuda:N")
    serve.set_defaults(handler=_serve)
