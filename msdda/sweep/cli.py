"""``msdda sweep``: every method over a weight grid on the same prompts and seeds, scored by every reward."""

from __future__ import annotations

import argparse


def _sweep(args: argparse.Namespace) -> int:
    from msdda.config import load_config
    from msdda.shards import launch_state
    from msdda.sweep.config import SweepConfig
    from msdda.sweep.run import run_sweep

    folder = run_sweep(load_config(SweepConfig, args.config, list(args.overrides)))
    if launch_state().is_main_process:  # one line, however many processes were launched
        print(f"sweep written to {folder} (results.csv, results.parquet, summary.csv); next: msdda report {folder}")
    return 0


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="sample every method over a weight grid and score every reward (resumable)",
        description="Run a weight sweep. Re-running the same command continues an interrupted sweep without "
        "redoing finished cells. Under accelerate launch -m msdda.cli sweep ... the processes share the cells.")
    parser.add_argument("--config", default=None, help="YAML, e.g. configs/sweep/world.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=0-3 methods=[msdda,soup]")
    parser.set_defaults(handler=_sweep)
