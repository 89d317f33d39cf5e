#!/usr/bin/env bash
# Fusion on the embedded flow world (base world-flow: an SD3 transformer sampled with Flow-GRPO's SDE): train the
# aesthetic and thirds adapters (configs/train/world_flow_*.yaml, betas 0.001 and 0.002) and the oracle retrained on
# their weighted sum at (0.5, 0.5) (configs/train/world_flow_oracle.yaml), measure each adapter against the base
# (msdda evaluate), sweep every method over the weights (configs/sweep/world_flow.yaml) and write the report.
# Re-running continues where a stopped run ended.   Usage: bash launch/world_flow.sh [output folder, default runs]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs}"

source launch/train_adapter.sh
for reward in aesthetic thirds; do
    train_adapter "$out/world_flow_$reward" "configs/train/world_flow_$reward.yaml"
    stage "$reward adapter trained"
    "$msdda" evaluate "$out/world_flow_$reward/final" --reward world-aesthetic --reward world-thirds \
        --reward world-consistency --num-prompts 32 --seeds 0-3 --out "$out/world_flow_$reward/evaluation"
    stage "$reward adapter evaluated"
done
train_adapter "$out/world_flow_oracle_0.5" configs/train/world_flow_oracle.yaml
stage "oracle at (0.5, 0.5) trained"
"$msdda" sweep --config configs/sweep/world_flow.yaml "output_dir=$out/sweep_world_flow" \
    "adapters=[$out/world_flow_aesthetic/final,$out/world_flow_thirds/final]" \
    "oracles={'0.5,0.5': $out/world_flow_oracle_0.5/final}"
stage "sweep done"
"$msdda" report "$out/sweep_world_flow"
echo "world_flow: done in $(( $(date +%s) - launch_started )) s; the report is $out/sweep_world_flow/report.md"
