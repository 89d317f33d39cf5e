"""``msdda report``: the Pareto and reward-against-KL plots, hypervolumes, objectives, path KLs and grids of a
sweep folder."""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from msdda.utils import parse_floats
    from msdda.report.build import build_report

    path = build_report(args.folder, reference_point=parse_floats(args.reference_point, "reference-point"),
                        resamples=args.resamples)
    print(f"report written to {path} (and report.html, pareto.png, kl.png, metrics.json beside it)")
    return 0


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="Pareto plot, hypervolume and weighted objectives of a sweep")
    parser.add_argument("folder", help="a folder written by msdda sweep")
    parser.add_argument("--reference-point", default=None,
                        help="hypervolume reference, one value per reward (default: each reward's lowest cell mean)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples for standard errors")
    parser.set_defaults(handler=_report)
