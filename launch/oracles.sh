#!/usr/bin/env bash
# After launch/demo.sh: train the retrained oracles (one adapter on w * aesthetic + (1 - w) * thirds for
# w = 0.25, 0.5, 0.75; the sweep's fused beta 0.001, the recipes' estimator, step reward and budget), add
# them to the demo's sweep (only their cells are sampled; finished cells are kept) and rewrite the report.
# About 10 min on 2 CPU cores (three runs of a recipe's budget). Re-running continues where a stopped run ended.
# Usage: bash launch/oracles.sh [the demo's output folder, default runs]; the oracles go to <folder>/world_oracle_<w>.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs}"
source launch/train_adapter.sh
[ -f "$out/sweep_world/sweep.yaml" ] || { echo "oracles: no sweep in $out/sweep_world; run bash launch/demo.sh first" >&2; exit 2; }

oracles=()
for w in 0.25 0.5 0.75; do
    rest=$(python3 -c "print(round(1 - $w, 10))")
    folder="$out/world_oracle_$w"
    oracles+=("'$w,$rest': $folder/final")
    train_adapter "$folder" configs/train/world_oracle.yaml "reward.kwargs.weights=[$w,$rest]"
done
joined=$(IFS=,; echo "${oracles[*]}")
"$msdda" sweep --config configs/sweep/world.yaml "output_dir=$out/sweep_world" \
    "adapters=[$out/world_aesthetic/final,$out/world_thirds/final]" "oracles={$joined}"
"$msdda" report "$out/sweep_world"
echo "oracles: done; the report is $out/sweep_world/report.md (and report.html)"
