#!/usr/bin/env bash
# Three rewards on the embedded world: train the aesthetic, consistency and rule-of-thirds adapters at three betas
# (0.001, 0.004 and 0.002), three retrained oracles on the weighted sum of the three rewards at interior weights,
# then sweep every fusion method over the 2-simplex and off it (configs/sweep/world3.yaml) and write the report.
# Estimated, not measured: 90-120 min on 2 CPU cores, from the times docs/training.md and README.md measured:
# aesthetic 7.5 min, consistency 11 min, thirds about 8 min (the aesthetic recipe's budget), three oracles about
# 25 min (as launch/oracles.sh's), and the sweep's 97 cells 40-65 min (configs/sweep/world.yaml's 28 cells take
# about 9 min; a third adapter, the reference kernel that unequal betas bring into MSDDA's product and the path
# KL measurements should cost 1.3-2 times as much per cell).
# Re-running continues where a stopped run ended: finished adapters are kept, interrupted training resumes from
# its checkpoints (--resume), and finished sweep cells are kept.
# Usage: bash launch/world3.sh [output folder, default runs]; it writes <folder>/world3_<reward>,
# <folder>/world3_oracle_<w_aesthetic>_<w_consistency>_<w_thirds> and the sweep with its report in <folder>/sweep_world3.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs}"
msdda="${MSDDA:-.venv/bin/msdda}"
[ -x "$msdda" ] || msdda=msdda
beta=0.002  # the sweep's fused objective KL weight (configs/sweep/world3.yaml), and the oracles' beta

source launch/train_adapter.sh

start=$(date +%s)
# the two existing recipes at their variant betas (only by override), the thirds recipe at its own 0.002
train_adapter "$out/world3_aesthetic" configs/train/world_aesthetic.yaml beta=0.001
train_adapter "$out/world3_consistency" configs/train/world_consistency.yaml beta=0.004
train_adapter "$out/world3_thirds" configs/train/world_thirds.yaml
# the oracles: the aesthetic and thirds recipes' estimator, step reward and budget (world_oracle.yaml's), the
# sweep's beta; weights (aesthetic, consistency, thirds) at three of the sweep's interior points
oracles=()
for weights in "0.3333333333333333,0.3333333333333333,0.3333333333333333" \
               "0.6666666666666666,0.16666666666666666,0.16666666666666666" \
               "0.16666666666666666,0.16666666666666666,0.6666666666666666"; do
    name=$(python3 -c "print('_'.join(f'{float(w):.4g}' for w in '$weights'.split(',')))")
    folder="$out/world3_oracle_$name"
    oracles+=("'$weights': '$folder/final'")
    train_adapter "$folder" configs/train/world_oracle.yaml "beta=$beta" \
        "reward.kwargs.rewards=[world-aesthetic,world-consistency,world-thirds]" "reward.kwargs.weights=[$weights]"
done
joined=$(IFS=,; echo "${oracles[*]}")
"$msdda" sweep --config configs/sweep/world3.yaml "output_dir=$out/sweep_world3" "beta=$beta" \
    "adapters=[$out/world3_aesthetic/final,$out/world3_consistency/final,$out/world3_thirds/final]" \
    "oracles={$joined}"
"$msdda" report "$out/sweep_world3"
echo "world3: done in $(( ($(date +%s) - start) / 60 )) min; the report is $out/sweep_world3/report.md (and report.html)"
