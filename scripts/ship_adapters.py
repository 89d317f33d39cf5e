"""Copy the world recipes' trained adapters into the package as its reference adapters (``world:<name>``).

    python scripts/ship_adapters.py [--runs runs] [aesthetic consistency thirds]

Each ``<runs>/world_<name>`` must be a finished run of ``configs/train/world_<name>.yaml`` with no override but
its output folder (checked against the run's saved config), so that what ships is what the recipe trains. Its
``final/`` folder (LoRA weights, msdda_adapter.json, model card) goes to ``msdda/world/assets/adapters/<name>``
with ``provenance.json``: the command, seed, training wall time (the sum of the epochs' times) and the conditions
it was measured in, the commit that trained it, torch version, threads and CPU capability (the vector
instructions torch dispatches to, which change the order of floating-point sums), and the weights' SHA-256, which
the tests check and a retraining test compares against. Run it on the machine that trained the adapters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import torch
import yaml

from msdda.adapters import WEIGHTS_FILE
from msdda.config import config_to_dict, load_config
from msdda.train import TrainConfig
from msdda.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "msdda" / "world" / "assets" / "adapters"
PROVENANCE = "provenance.json"


def _recipe_unchanged(recipe: Path, run: Path) -> None:
    """Refuse a run whose saved config differs from the recipe in anything but its output folder (and whether
    it was resumed, which does not change what it trains)."""
    expected = config_to_dict(load_config(TrainConfig, recipe))
    saved = yaml.safe_load((run / "run_config.yaml").read_text())
    changed = sorted(key for key in expected
                     if key not in ("output_dir", "resume") and expected[key] != saved.get(key))
    if changed:
        raise SystemExit(f"{run} was not trained by {recipe} as shipped: {changed} differ")


def ship(name: str, runs: Path, conditions: str) -> dict:
    run, recipe = runs / f"world_{name}", ROOT / "configs" / "train" / f"world_{name}.yaml"
    final = run / "final"
    if not (final / WEIGHTS_FILE).is_file():
        raise SystemExit(f"{final} holds no finished adapter: run msdda train --config {recipe.relative_to(ROOT)}")
    _recipe_unchanged(recipe, run)
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    config = load_config(TrainConfig, recipe)
    if state["epoch"] != config.epochs:
        raise SystemExit(f"{run}'s last checkpoint is epoch {state['epoch']}, not the recipe's {config.epochs}")
    target = SHIPPED / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(final, target)
    # the checkout that trained it: the repository holding the runs folder
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=runs.resolve().parent, capture_output=True,
                            text=True).stdout.strip()
    provenance = {
        "name": f"world:{name}",
        "recipe": str(recipe.relative_to(ROOT)),
        "command": f"msdda train --config {recipe.relative_to(ROOT)}",
        "seed": config.seed,
        "epochs": config.epochs,
        "training_seconds": round(sum(entry["epoch_seconds"] for entry in state["history"]), 1),
        "conditions": conditions,
        "commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "weights_sha256": hashlib.sha256((target / WEIGHTS_FILE).read_bytes()).hexdigest(),
    }
    (target / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=["aesthetic", "consistency", "thirds"])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="the folder the recipes trained into")
    parser.add_argument("--conditions", default="2 CPU cores", help="the machine and its load while training")
    args = parser.parse_args()
    for name in args.names:
        provenance = ship(name, args.runs, args.conditions)
        print(f"shipped world:{name} ({provenance['training_seconds']:.0f} s of training, "
              f"sha256 {provenance['weights_sha256'][:12]}…)")


if __name__ == "__main__":
    main()
