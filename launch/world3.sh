#!/usr/bin/env bash
# Three rewards on the embedded world: train the aesthetic, consistency and rule-of-thirds adapters with their
# recipes (three betas: 0.001, 0.0005 and 0.002), three retrained oracles on the weighted sum of the three rewards at
# interior weights (the same estimator, step reward and budget, at the sweep's beta 0.001), then sweep every fusion
# method inside the 2-simplex and off it (configs/sweep/world3.yaml) and write the report.
# The adapters go where the demo's do (runs/world_aesthetic, runs/world_thirds): after bash launch/demo.sh only
# the consistency adapter and the oracles are trained. 86 min on 2 CPU cores shared with other jobs (2026-12-02; the
# adapters about 3 min each alone): docs/notes/2026-12-02-where-exact-fusion-pays.md.
# Re-running continues where a stopped run ended: finished adapters are kept, interrupted training resumes from
# its checkpoints (--resume), and finished sweep cells are kept.
# Usage: bash launch/world3.sh [--calibrated] [output folder, default runs]; it writes <folder>/world_<reward>,
# <folder>/world3_oracle_<w_aesthetic>_<w_consistency>_<w_thirds> and the sweep with its report in <folder>/sweep_world3.
# --calibrated is the step-optimal experiment: every adapter and oracle, once trained, gets its per-step scales fitted
# at its own beta (msdda calibrate, 8 prompts x 4 draws, 3 rounds, into <folder>/<adapter>/calibrated), and the sweep
# fuses the calibrated adapters against the calibrated oracles with reward-gradient guidance (rgg) among the methods
# and without CoDe, 64 paired samples per cell, into <folder>/sweep_world3_calibrated.
set -euo pipefail
cd "$(dirname "$0")/.."
calibrated=false
if [ "${1:-}" = "--calibrated" ]; then
    calibrated=true
    shift
fi
out="${1:-runs}"
beta=0.001  # the sweep's fused objective KL weight (configs/sweep/world3.yaml), and the oracles' beta

source launch/train_adapter.sh

fused=final  # the folder of each trained adapter and oracle the sweep fuses
$calibrated && fused=calibrated
start=$(date +%s)
trained=()
for reward in aesthetic consistency thirds; do
    train_adapter "$out/world_$reward" "configs/train/world_$reward.yaml"
    trained+=("$out/world_$reward")
done
# the oracles: the recipes' estimator, step reward and budget (world_oracle.yaml), the sweep's beta; weights
# (aesthetic, consistency, thirds) at three of the sweep's interior points
oracles=()
for weights in "0.3333333333333333,0.3333333333333333,0.3333333333333333" \
               "0.6666666666666666,0.16666666666666666,0.16666666666666666" \
               "0.16666666666666666,0.16666666666666666,0.6666666666666666"; do
    name=$(python3 -c "print('_'.join(f'{float(w):.4g}' for w in '$weights'.split(',')))")
    folder="$out/world3_oracle_$name"
    oracles+=("'$weights': '$folder/$fused'")
    train_adapter "$folder" configs/train/world_oracle.yaml "beta=$beta" \
        "reward.kwargs.rewards=[world-aesthetic,world-consistency,world-thirds]" "reward.kwargs.weights=[$weights]"
    trained+=("$folder")
done
sweep="$out/sweep_world3"
settings=()
if $calibrated; then
    # each at the beta it was trained at (the adapters' own, the oracles' the sweep's), so that MSDDA's exponents
    # and the oracles' objective are the ones the calibrated adapters sit at the optimum of
    for folder in "${trained[@]}"; do
        calibrate_adapter "$folder/final" "$folder/calibrated" --num-prompts 8 --draws 4 --rounds 3
        stage "$folder calibrated"
    done
    sweep="$out/sweep_world3_calibrated"
    # rgg in, CoDe out (a search over candidates scored by the rewards: no Gaussian kernel, so no KL to the oracle,
    # and the most time per image), and 64 paired samples per cell instead of 128, so that the sweep takes about as
    # long as the uncalibrated one
    settings=("methods=[msdda,soup,output-average,diffusion-blend,rgg,single,base]" "seeds=0-3")
fi
joined=$(IFS=,; echo "${oracles[*]}")
"$msdda" sweep --config configs/sweep/world3.yaml "output_dir=$sweep" "beta=$beta" \
    "adapters=[$out/world_aesthetic/$fused,$out/world_consistency/$fused,$out/world_thirds/$fused]" \
    "oracles={$joined}" "${settings[@]}"
"$msdda" report "$sweep"
echo "world3: done in $(( ($(date +%s) - start) / 60 )) min; the report is $sweep/report.md (and report.html)"
