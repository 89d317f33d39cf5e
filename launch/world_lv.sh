#!/usr/bin/env bash
# Fusion where the adapters' step variances differ, on the learned-variance world (base world-lv): train the
# aesthetic and thirds adapters (configs/train/world_lv_*.yaml), measure each against the base with the variance
# it learned per step (msdda evaluate: variance_ratio_to_base), sweep msdda, output-average, soup, single and the
# base over the weights (configs/sweep/world_lv.yaml), with the KL of each (0.5, 0.5) sample to the retrained
# oracle there (configs/train/world_lv_oracle.yaml), and write the report.
# Re-running continues where a stopped run ended.   Usage: bash launch/world_lv.sh [output folder, default runs]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs}"

source launch/train_adapter.sh
for reward in aesthetic thirds; do
    train_adapter "$out/world_lv_$reward" "configs/train/world_lv_$reward.yaml"
    stage "$reward adapter trained"
    "$msdda" evaluate "$out/world_lv_$reward/final" --num-prompts 32 --seeds 0-3 --out "$out/world_lv_$reward/evaluation"
    stage "$reward adapter evaluated"
done
train_adapter "$out/world_lv_oracle_0.5" configs/train/world_lv_oracle.yaml
stage "oracle at (0.5, 0.5) trained"
"$msdda" sweep --config configs/sweep/world_lv.yaml "output_dir=$out/sweep_world_lv" \
    "adapters=[$out/world_lv_aesthetic/final,$out/world_lv_thirds/final]" \
    "oracles={'0.5,0.5': $out/world_lv_oracle_0.5/final}"
stage "sweep done"
"$msdda" report "$out/sweep_world_lv"
echo "world_lv: done in $(( $(date +%s) - launch_started )) s; the report is $out/sweep_world_lv/report.md"
