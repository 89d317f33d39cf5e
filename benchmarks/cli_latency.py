"""Seconds until ``msdda`` answers ``--help``, each subcommand's ``--help`` and an argument error, against the same
commands at a baseline commit (default a084e45, before the CLI imported torch and diffusers lazily).

    python benchmarks/cli_latency.py [--baseline a084e45] [--repeats 3]

The baseline is checked out into a temporary ``git worktree`` and run with the same interpreter, each command a
fresh process (what a user waits for); this tree is the one the script sits in. Prints the median seconds per
command for both, and the ratio of their totals last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [["--help"], *([c, "--help"] for c in ("train", "evaluate", "fuse", "sweep", "report", "studio", "world")),
            ["fuse", "--adpater", "x"], ["train", "--resume-from", "x"]]
"""The top-level help, every stage's help, a mistyped flag of fuse and of train."""


def seconds(tree: Path, argv: list[str], repeats: int) -> float:
    """Median wall seconds of ``python -m msdda.cli argv`` importing msdda from ``tree``."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "msdda.cli", *argv], cwd=tree, env=environment,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="a084e45", help="commit to compare against (default a084e45)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msdda-cli-baseline-") as scratch:
        baseline = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            totals = {"baseline": 0.0, "this tree": 0.0}
            print(f"{'command':32s} {'baseline s':>11s} {'this tree s':>12s}")
            for argv in COMMANDS:
                before, after = seconds(baseline, argv, args.repeats), seconds(ROOT, argv, args.repeats)
                totals["baseline"] += before
                totals["this tree"] += after
                print(f"{' '.join(argv):32s} {before:11.2f} {after:12.2f}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=True)
    print(f"totals {totals['baseline']:.2f} s at {args.baseline}, "
          f"{totals['this tree']:.2f} s here")
    print(f"speed-up of the CLI's answers ({args.baseline} / this tree): {totals['baseline'] / totals['this tree']:.1f}x")


if __name__ == "__main__":
    main()
