#!/usr/bin/env bash
# The whole job on the embedded world, 10.2 minutes on 2 CPU cores of the machine it last ran on (yardstick 268 ms,
# printed first; a machine whose yardstick is k times that takes about k times as long): train the aesthetic and
# rule-of-thirds adapters, sweep the main fusion methods over the weights (16 prompts x 1 seed per cell), write the
# report with the Pareto plot.
# Re-running continues where a stopped run ended (training resumes from its checkpoints; finished sweep cells
# are kept).   Usage: bash launch/demo.sh [output folder, default runs]
# It writes where the recipes and the example configs put things by default, so every next command finds
# them: runs/world_aesthetic/final and runs/world_thirds/final (configs/train/world_*.yaml, the adapters
# configs/fuse/world.yaml and configs/sweep/world.yaml name), and the sweep with its report in runs/sweep_world.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs}"

source launch/train_adapter.sh

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3

"$python" benchmarks/yardstick.py  # this machine's speed, to read the wall times below against
start=$(date +%s)
stage() { echo "demo: $1 after $(( $(date +%s) - start )) s"; }
train_adapter "$out/world_aesthetic" configs/train/world_aesthetic.yaml
stage "aesthetic adapter trained"
train_adapter "$out/world_thirds" configs/train/world_thirds.yaml
stage "thirds adapter trained"
"$msdda" sweep --config configs/sweep/world.yaml "output_dir=$out/sweep_world" \
    "adapters=[$out/world_aesthetic/final,$out/world_thirds/final]"
stage "sweep done"
"$msdda" report "$out/sweep_world"
echo "demo: done in $(( $(date +%s) - start )) s; the report is $out/sweep_world/report.md (and report.html)"
